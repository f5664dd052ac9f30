"""Redis Sentinel: the ``redis+sentinel://`` URL, and a publisher, a worker and
health that follow a failover without a restart (a primary, a replica and three
sentinels on loopback: :class:`tests.sentinel_support.SentinelCluster`)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from eventbus import EventBus, EventBusSettings
from eventbus.dlq import FailedEvent
from eventbus.exceptions import ConfigurationError
from eventbus.health import HealthStatus
from eventbus.redact import redact_url
from eventbus.redis.backend import RedisBackend
from eventbus.redis.resp import SENTINEL_RECHECK_INTERVAL, RespClient
from eventbus.redis.sentinel import SentinelAddress, is_sentinel_url, parse_sentinel_url
from tests.reliability.handlers import Tracked
from tests.reliability.support import Ledger

pytest.register_assert_rewrite("tests.redis_support", "tests.sentinel_support")
from tests.redis_support import Workers, require_redis_server_binary  # noqa: E402
from tests.sentinel_support import MASTER, SentinelCluster  # noqa: E402

pytest_plugins = ["tests.redis_support"]

MODULES = ("tests.reliability.handlers",)
SCRIPT = Path(sys.executable).with_name("eventbus")
#: Seconds a failover may take here (down-after 1 s, then the election).
FAILOVER_BOUND = 15.0


# -- the URL ---------------------------------------------------------------------------


def test_sentinel_url_names_sentinels_master_db_and_both_passwords() -> None:
    address = parse_sentinel_url(
        "redis+sentinel://app:s3cret@10.0.0.1:26379,10.0.0.2:26380,[::1]/prod-master/3"
        "?sentinel_password=sent%40pw&sentinel_username=watch&socket_timeout=2"
    )
    assert address == SentinelAddress(
        sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26380), ("::1", 26379)),
        master="prod-master",
        db=3,
        username="app",
        password="s3cret",
        sentinel_username="watch",
        sentinel_password="sent@pw",
        options={"socket_timeout": 2.0},
    )
    assert not address.tls


@pytest.mark.parametrize(
    "url",
    [
        "rediss+sentinel://h:26379/m",
        "redis+sentinel://h:26379/m?ssl=true",
        "sentinel://h:26379/m?ssl=yes",
    ],
)
def test_sentinel_url_turns_tls_on_for_sentinels_and_data_nodes(url: str) -> None:
    address = parse_sentinel_url(url)
    assert address.tls and address.master == "m" and address.db == 0


def test_sentinel_url_tls_options_are_typed_as_redis_py_types_them() -> None:
    address = parse_sentinel_url(
        "rediss+sentinel://h/m?ssl_cert_reqs=none&ssl_check_hostname=false&ssl_ca_certs=/ca.pem"
    )
    assert address.options["ssl_check_hostname"] is False
    assert address.options["ssl_ca_certs"] == "/ca.pem"
    client = RespClient.from_url(
        "rediss+sentinel://h/m?ssl_cert_reqs=none&ssl_check_hostname=false"
    )
    assert client.sentinel is not None and client.ssl_context is not None


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://h:26379", "names no master"),
        ("redis+sentinel://h:26379/", "names no master"),
        ("redis+sentinel:///m", "names no sentinel"),
        ("redis+sentinel://h:99999/m", "invalid port"),
        ("redis+sentinel://h/m/x", "not a number"),
        ("redis+sentinel://h/m/0/extra", r"/<master-name>\[/db\]"),
        ("redis+sentinel://h/m?ssl=maybe", "ssl=true or ssl=false"),
    ],
)
def test_bad_sentinel_url_says_what_to_write(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_sentinel_url(url)
    with pytest.raises(ConfigurationError, match="invalid EVENTBUS_REDIS_URL"):
        RedisBackend(url=url)


def test_only_sentinel_schemes_are_sentinel_urls() -> None:
    assert is_sentinel_url("redis+sentinel://h/m") and is_sentinel_url("SENTINEL://h/m")
    assert not is_sentinel_url("redis://h:6379/0") and not is_sentinel_url("rediss://h")


def test_sentinel_url_shown_without_either_password() -> None:
    url = "redis+sentinel://app:s3cret@h1,h2/m?sentinel_password=t0p"
    shown = RedisBackend(url=url).address()
    assert shown == redact_url(url)
    assert "s3cret" not in shown and "t0p" not in shown


# -- against real servers ----------------------------------------------------------------


def dead_letter(record_id: str) -> FailedEvent:
    return FailedEvent(
        id=record_id,
        event=None,
        envelope={"type": "x.Charge", "event": {"topic": "charges"}},
        topic="charges",
        handler="charges:ledger",
        queue="tests.eventbus",
        attempts=1,
        error="ledger unavailable",
        error_type="ConnectionError",
        traceback="Traceback (most recent call last):\nConnectionError: ledger unavailable\n",
    )


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")}
    return subprocess.run(
        [str(SCRIPT), *args], env={**full_env, **env}, capture_output=True, text=True, timeout=30
    )


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    require_redis_server_binary()
    started = SentinelCluster(tmp_path).start()
    try:
        yield started
    finally:
        started.stop()


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:g}s waiting for {what}"
        await asyncio.sleep(0.05)


async def test_publisher_and_worker_follow_a_coordinated_failover(
    cluster: SentinelCluster,
    make_redis_bus: Callable[..., EventBus],
    namespace: str,
    tmp_path: Path,
) -> None:
    """``SENTINEL FAILOVER`` demotes the primary while the publisher and the
    worker hold connections to it: the publisher's next call meets ``READONLY``
    (or a closed connection) and must land on the new primary, first time."""
    ledger_dir = tmp_path / "ledger"
    ledger_dir.mkdir()
    ledger = Ledger(ledger_dir)
    workers = Workers(cluster.url, namespace, tmp_path)
    try:
        worker = workers.start(
            MODULES, threads=2, env={"RELIABILITY_LEDGER": str(ledger_dir)}, wait=False
        )
        workers.wait_registered(worker, 1, url=cluster.primary.url)
        bus = make_redis_bus(url=cluster.url)
        await bus.start()
        await bus.publish(Tracked(n=1))
        await wait_for(lambda: not ledger.missing({1}), 10, "the event before the failover")
        old = redis.Redis.from_url(cluster.primary.url)
        assert old.role()[0] == b"master"  # otherwise the test proves nothing
        # A dead letter written through the backend's store (the Sentinel client).
        store = bus.backend.dead_letter_store(EventBusSettings())  # type: ignore[attr-defined]
        store.add(dead_letter("before-failover"))
        # No worker during the switch: an event published to the old primary would
        # stay there and vanish with the demotion instead of being handled there.
        worker.stop()

        assert cluster.sentinel().execute_command("SENTINEL", "FAILOVER", MASTER)
        await asyncio.to_thread(cluster.wait_promoted, FAILOVER_BOUND)
        # Sentinel demotes the old primary (and closes its clients) when it next
        # polls it, up to 10 s later; until then it still takes writes, which the
        # demotion discards.  The publisher asks the sentinels again at most
        # SENTINEL_RECHECK_INTERVAL after its last check (in the background of a
        # call): the call that starts the check may still go to the old primary.
        assert old.role()[0] == b"master"  # otherwise the window is not tested
        await bus.publish(Tracked(n=2))
        await asyncio.sleep(SENTINEL_RECHECK_INTERVAL)  # the check, started by that call
        await bus.publish(Tracked(n=3))  # no PublishError, and on the new primary
        await wait_for(lambda: old.role()[0] == b"slave", FAILOVER_BOUND, "the demotion")

        new = redis.Redis.from_url(cluster.replica.url)
        worker = workers.start(
            MODULES, threads=2, env={"RELIABILITY_LEDGER": str(ledger_dir)}, wait=False
        )
        workers.wait_registered(worker, 1, url=cluster.replica.url)
        await wait_for(lambda: not ledger.missing({3}), 15, "the event after the failover")
        assert await bus.backend.pending() == 0  # type: ignore[attr-defined]
        # The worker's heartbeat and the subscriptions are on the new primary.
        assert new.hlen(f"{namespace}:workers") >= 1 and new.hlen(f"{namespace}:subs") >= 1
        assert ledger.refresh().done[3] == 1
        # The dead letter survived, and the CLI finds it through the Sentinel URL.
        assert store.get("before-failover") is not None
        done = run_cli(
            {
                "EVENTBUS_BACKEND": "redis",
                "EVENTBUS_REDIS_URL": cluster.url,
                "EVENTBUS_REDIS_NAMESPACE": namespace,
            },
            "dlq",
            "list",
        )
        assert done.returncode == 0, done.stderr
        assert "before-failover" in done.stdout
    finally:
        workers.stop_all()


async def test_health_is_degraded_while_the_primary_is_down_and_healthy_after(
    cluster: SentinelCluster, make_redis_bus: Callable[..., EventBus]
) -> None:
    bus = make_redis_bus(url=cluster.url, publish_timeout=0.5)
    await bus.start()
    [ping, *_] = await bus.health.check()
    assert ping.status is HealthStatus.HEALTHY, ping  # otherwise the test proves nothing

    cluster.primary.kill()
    [ping, *_] = await bus.health.check()
    assert ping.status is HealthStatus.DEGRADED, ping
    assert "failover" in ping.detail

    # Healthy again once every client agrees on the new primary: redis-py's (the
    # workers', the dead-letter store's) also wants the sentinels to report it up
    # and not down, a moment after the promotion.
    deadline = time.monotonic() + FAILOVER_BOUND
    while True:
        [ping, *_] = await bus.health.check()
        if ping.status is HealthStatus.HEALTHY or time.monotonic() > deadline:
            break
        assert ping.status is HealthStatus.DEGRADED, ping
        await asyncio.sleep(0.1)
    assert ping.status is HealthStatus.HEALTHY, ping
    assert cluster.promoted() is not None


async def test_health_is_unhealthy_when_no_sentinel_answers(
    make_redis_bus: Callable[..., EventBus],
) -> None:
    from tests.redis_support import free_port

    bus = make_redis_bus(url=f"redis+sentinel://127.0.0.1:{free_port()}/{MASTER}")
    await bus.start()
    [ping, *_] = await bus.health.check()
    assert ping.status is HealthStatus.UNHEALTHY, ping
    assert "no sentinel" in ping.detail
