"""``unix://`` Redis URLs: the publisher, the workers and the retries share one socket path."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from eventbus import EventBus
from eventbus.health import HealthStatus
from eventbus.redis.backend import RedisBackend
from tests import redis_handlers as h

pytest.register_assert_rewrite("tests.redis_support")  # before it is imported below
from tests.redis_support import Workers, require_redis_server_binary, wait_until  # noqa: E402

pytest_plugins = ["tests.redis_support"]
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def unix_redis(tmp_path: Path) -> Iterator[Path]:
    """A redis-server listening on a Unix socket only (no TCP port)."""
    require_redis_server_binary()
    binary = shutil.which("redis-server")
    assert binary is not None
    sock = tmp_path / "redis.sock"
    process = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline, "redis-server did not create its socket"
            time.sleep(0.05)
        yield sock
    finally:
        process.terminate()
        process.wait(10)


async def test_publish_retry_and_health_over_a_unix_socket(
    unix_redis: Path, namespace: str, tmp_path: Path
) -> None:
    url = f"unix://{unix_redis}?db=0"
    workers = Workers(url, namespace, tmp_path)
    bus = EventBus(backend=RedisBackend(url=url, namespace=namespace))
    try:
        workers.start(redis_url=url)
        await bus.start()
        await bus.publish(h.Numbered(n=7))
        flaky = h.Flaky()
        await bus.publish(flaky)  # fails once: the retry goes through the workers' client
        r = redis.Redis.from_url(url)
        await asyncio.to_thread(
            wait_until,
            lambda: (
                r.sismember(h.key("handled", namespace), 7) == 1
                and r.get(h.key(f"ok:{flaky.event_id}", namespace)) == b"2"
            ),
            15,
            "the event and the retried event over a Unix socket",
        )
        # The web process's synchronous client (dead-letter store, health) connects too.
        results = await bus.health.check()
        assert all(r.status is HealthStatus.HEALTHY for r in results), results
        assert await asyncio.to_thread(bus.backend.sync_client.ping)  # type: ignore[attr-defined]
    finally:
        await bus.stop()
        workers.stop_all()
