"""``EVENTBUS_TEST_REDIS_URL`` points the suite's shared-Redis fixtures at another
server: a pytest run with it set writes to that server, not to 127.0.0.1:6379;
set to a server that does not answer, the run fails saying so (never a silent
fallback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

pytest.register_assert_rewrite("tests.redis_support")
from tests.redis_support import (  # noqa: E402
    ROOT,
    URL_VARIABLE,
    RedisServer,
    free_port,
    require_redis_server_binary,
)

pytestmark = pytest.mark.timeout(120)

INNER = """
import redis
pytest_plugins = ["tests.redis_support"]

def test_inner(redis_url, namespace):
    client = redis.Redis.from_url(redis_url)
    client.set(f"marker-{MARK}", redis_url)
    client.close()
"""


def run_inner(tmp_path: Path, url: str, mark: str) -> subprocess.CompletedProcess[str]:
    test = tmp_path / "test_inner_url.py"
    test.write_text(INNER.replace("MARK", repr(mark)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), URL_VARIABLE: url}
    return subprocess.run(
        [sys.executable, "-m", "pytest", str(test), "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )


def test_the_variable_points_the_fixtures_at_another_redis(tmp_path: Path) -> None:
    require_redis_server_binary()
    server = RedisServer().start()
    try:
        url = f"redis://127.0.0.1:{server.port}/3"
        done = run_inner(tmp_path, url, "other")
        assert done.returncode == 0, done.stdout + done.stderr
        client = redis.Redis(host="127.0.0.1", port=server.port, db=3)
        assert client.get("marker-other") == url.encode()
        client.close()
    finally:
        server.stop()


def test_a_variable_naming_a_dead_redis_fails_the_run_saying_so(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    done = run_inner(tmp_path, url, "dead")
    assert done.returncode != 0
    assert f"{URL_VARIABLE}={url} does not answer PING" in done.stdout
