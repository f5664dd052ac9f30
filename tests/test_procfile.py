"""The Procfile works as documented: ``PORT=8000 honcho start`` (honcho comes with the
``demo`` extra) runs the example's web process on $PORT and its worker, against a
real Redis; the web answers /health and a POST reaches the worker's handler."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis

pytest.register_assert_rewrite("tests.redis_support")
from tests.redis_support import ROOT, free_port  # noqa: E402

pytest_plugins = ["tests.redis_support"]
pytestmark = pytest.mark.timeout(90)

HONCHO = Path(sys.executable).with_name("honcho")
#: Seconds the web and the worker may take to come up.
STARTUP = 40.0


def test_the_procfile_lists_web_first_so_that_it_gets_port() -> None:
    names = [line.split(":")[0] for line in (ROOT / "Procfile").read_text().splitlines()]
    # honcho gives $PORT to the first process, $PORT+100 to the next...
    assert names[0] == "web"
    # ...and stops every process when one exits: no one-shot (release:) step.
    assert names == ["web", "worker"]


def test_honcho_start_serves_the_example_on_port_with_its_worker(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")}
    env |= {
        # as in an activated venv: the Procfile names uvicorn and dramatiq
        "PATH": f"{HONCHO.parent}{os.pathsep}{env.get('PATH', '')}",
        "PORT": str(port),
        "PYTHONUNBUFFERED": "1",
        "EVENTBUS_BACKEND": "redis",
        "EVENTBUS_REDIS_URL": redis_url,
        "EVENTBUS_REDIS_NAMESPACE": namespace,
    }
    log = tmp_path / "honcho.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(HONCHO), "start", "--no-colour"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    client = redis.Redis.from_url(redis_url)
    try:
        base = f"http://127.0.0.1:{port}"
        wait(lambda: answers(f"{base}/health"), process, log, "the web process on $PORT")
        wait(lambda: bool(client.hkeys(f"{namespace}:workers")), process, log, "the worker")

        health = httpx.get(f"{base}/health", timeout=5)
        created = httpx.post(f"{base}/users", headers={"X-Correlation-ID": "procfile-1"})

        assert health.status_code == 200, health.text
        assert {c["backend"] for c in health.json()["backends"]} >= {"redis", "redis.workers"}
        assert created.json() == {"status": "ok"}
        wait(lambda: "correlation id procfile-1" in log.read_text(), process, log, "the handler")
    finally:
        client.close()
        stop(process)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def wait(
    condition: Callable[[], bool], process: subprocess.Popen[bytes], log: Path, what: str
) -> None:
    deadline = time.monotonic() + STARTUP
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what} did not come up:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM honcho (it stops its processes), then kill what is left."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
