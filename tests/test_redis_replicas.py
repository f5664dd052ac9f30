"""Acknowledged means replicated, when asked (``EVENTBUS_REDIS_MIN_REPLICAS``).

Each test runs against a private primary and its replica (``redis-server
--replicaof``) on free loopback ports.  A replica that is SIGSTOPped stays
connected in the primary's eyes but acknowledges nothing: exactly the window in
which a primary that dies loses events it was told were published.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

import eventbus.redis.backend as backend_module
from eventbus import BaseEvent, EventBus, EventBusSettings, PublishError
from eventbus.exceptions import ConfigurationError
from eventbus.health import HealthResult, HealthStatus
from eventbus.outbox.outbox import Outbox
from eventbus.outbox.schema import outbox_table
from eventbus.redis.backend import REPLICA_HEALTH_MAX_LAG, RedisBackend
from eventbus.redis.scripts import bodies_key
from eventbus.redis.subscriptions import register
from tests import redis_handlers as h
from tests.outbox_events import Placed
from tests.redis_support import (
    HOST,
    RedisServer,
    queue_name,
    require_redis_server_binary,
    wait_until,
)

pytest_plugins = ["tests.pg_support"]
pytestmark = pytest.mark.timeout(60)

QUEUE = queue_name()
ACTOR = f"{h.RECORD}:tests.redis_handlers.record"
#: Seconds a publish waits for the replica in these tests.
REPLICA_TIMEOUT = 0.5
#: Seconds a publish that waited ``REPLICA_TIMEOUT`` may take on top (loaded CI machine).
SLACK = 1.5


class Padded(BaseEvent):
    """An event of RECORD's topic with some bulk (staged publishes)."""

    topic: str = h.RECORD
    n: int
    pad: str


class Pair:
    """A primary and its replica."""

    def __init__(self, primary: RedisServer, replica: RedisServer) -> None:
        self.primary = primary
        self.replica = replica
        self.p = redis.Redis(host=HOST, port=primary.port)
        self.r = redis.Redis(host=HOST, port=replica.port)

    def linked(self) -> bool:
        """The replica is in sync and the primary counts it as connected and online."""
        mine = self.r.info("replication")
        theirs = self.p.info("replication")
        return bool(
            mine.get("master_link_status") == "up"
            and theirs.get("connected_slaves") == 1
            and "online" in str(theirs.get("slave0", ""))
        )

    @contextlib.contextmanager
    def replica_paused(self) -> Iterator[None]:
        """SIGSTOP the replica: connected, silent; resumed (and caught up) afterwards."""
        assert self.replica.process is not None
        pid = self.replica.process.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)
            wait_until(self.caught_up, 15, "the replica to catch up")

    def caught_up(self) -> bool:
        offset = self.p.info("replication")["master_repl_offset"]
        return bool(self.linked() and self.r.info("replication")["slave_repl_offset"] >= offset)

    def acknowledging(self) -> bool:
        """The primary heard from the replica within the last second (INFO's lag)."""
        replica = self.p.info("replication").get("slave0", {})
        return bool(replica.get("state") == "online" and int(replica.get("lag", 99)) <= 1)

    def stored(self, client: redis.Redis, namespace: str) -> int:
        """Messages of the subscription's queue on that server."""
        return int(client.hlen(bodies_key(namespace, QUEUE)))

    def calls(self, command: str) -> int:
        """How many times the primary ran ``command`` since the last reset."""
        stats = self.p.info("commandstats")
        return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    require_redis_server_binary()
    primary = RedisServer().start()
    replica = RedisServer(args=("--replicaof", HOST, str(primary.port)))
    try:
        replica.start()
        servers = Pair(primary, replica)
        wait_until(servers.linked, 15, "the replica's link to the primary")
        yield servers
    finally:
        if replica.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(replica.process.pid, signal.SIGCONT)
        replica.stop()
        primary.stop()


@pytest.fixture
def namespace(pair: Pair) -> str:
    """A namespace with one subscription of RECORD, written on the primary."""
    ns = f"ebrepl-{uuid.uuid4().hex[:8]}"
    register(pair.p, ns, "tests", [(h.RECORD, ACTOR, QUEUE)])
    wait_until(pair.caught_up, 15, "the subscription on the replica")
    pair.p.config_resetstat()
    return ns


@pytest.fixture
async def make_bus(pair: Pair, namespace: str) -> AsyncIterator[Callable[..., EventBus]]:
    buses: list[EventBus] = []

    def factory(**options: Any) -> EventBus:
        options.setdefault("replica_timeout", REPLICA_TIMEOUT)
        # Every script call these tests count is a publish: the live schema check's
        # reads (read-only, no WAIT) are issue 20's, tested in tests/test_live_schemas.py.
        options.setdefault("schema_check", "off")
        bus = EventBus(
            backend=RedisBackend(url=pair.primary.url, namespace=namespace, **options),
            settings=EventBusSettings(shutdown_timeout=2.0),
        )
        buses.append(bus)
        return bus

    yield factory
    for bus in buses:
        await bus.stop()
        broker = bus.backend.broker  # type: ignore[attr-defined]
        if broker is not None:
            broker.close()


async def test_publish_returns_once_the_replica_has_the_event(
    pair: Pair, namespace: str, make_bus: Callable[..., EventBus]
) -> None:
    bus = make_bus(min_replicas=1)
    await bus.start()
    await bus.publish(h.Numbered(n=1))
    # Read at once, no waiting: the publish returned only after the replica had it.
    assert pair.stored(pair.r, namespace) == 1
    # One WAIT with each script call (the first may be EVALSHA's NOSCRIPT, then EVAL).
    assert pair.calls("wait") == pair.calls("evalsha") + pair.calls("eval")


async def test_publish_fails_within_the_timeout_when_no_replica_acknowledges(
    pair: Pair, namespace: str, make_bus: Callable[..., EventBus]
) -> None:
    bus = make_bus(min_replicas=1)
    await bus.start()
    with pair.replica_paused():
        started = time.monotonic()
        with pytest.raises(PublishError) as caught:
            await bus.publish(h.Numbered(n=1))
        elapsed = time.monotonic() - started
        # The event is on the primary: it may still be delivered (at least once).
        assert pair.stored(pair.p, namespace) == 1
    message = str(caught.value)
    assert "written on the Redis primary" in message
    assert "may still be delivered (at least once)" in message
    assert "only 0 replica(s)" in message and "1 required" in message
    assert "EVENTBUS_REDIS_MIN_REPLICAS" in message
    assert REPLICA_TIMEOUT * 0.9 <= elapsed < REPLICA_TIMEOUT + SLACK
    # Once resumed, the replica has it too: nothing was lost, nothing rolled back.
    assert pair.stored(pair.r, namespace) == 1


async def test_min_replicas_zero_does_not_wait_for_replicas(
    pair: Pair, namespace: str, make_bus: Callable[..., EventBus]
) -> None:
    bus = make_bus()  # the default: 0
    await bus.start()
    with pair.replica_paused():
        started = time.monotonic()
        await bus.publish_many([h.Numbered(n=1), h.Numbered(n=2)])
        assert time.monotonic() - started < REPLICA_TIMEOUT
        assert pair.stored(pair.p, namespace) == 2
    assert pair.calls("wait") == 0


async def test_grouped_publishes_share_one_wait_per_call(
    pair: Pair, namespace: str, make_bus: Callable[..., EventBus]
) -> None:
    bus = make_bus(min_replicas=1)
    await bus.start()
    pair.p.config_resetstat()
    await asyncio.gather(*(bus.publish(h.Numbered(n=n)) for n in range(40)))
    assert pair.stored(pair.r, namespace) == 40
    scripts = pair.calls("evalsha") + pair.calls("eval")
    assert pair.calls("wait") == scripts
    assert scripts < 40  # grouped: the premise of "one WAIT per grouped call"

    with pair.replica_paused():
        results = await asyncio.gather(
            *(bus.publish(h.Numbered(n=n)) for n in range(10)), return_exceptions=True
        )
        assert all(isinstance(r, PublishError) for r in results), results
        assert all("may still be delivered" in str(r) for r in results)
        assert pair.stored(pair.p, namespace) == 50


async def test_a_staged_publish_waits_after_its_commit(
    pair: Pair, namespace: str, make_bus: Callable[..., EventBus], monkeypatch: Any
) -> None:
    monkeypatch.setattr(backend_module, "MAX_CALL_BYTES", 4096)
    bus = make_bus(min_replicas=1)
    await bus.start()
    events = [Padded(n=n, pad="x" * 1000) for n in range(8)]
    await bus.publish_many(events)
    assert pair.calls("rpush") >= 2  # staged in chunks (the premise)
    assert pair.stored(pair.r, namespace) == 8
    # After the commit call only (EVALSHA, or NOSCRIPT then EVAL), not the chunks.
    assert pair.calls("wait") == pair.calls("evalsha") + pair.calls("eval")

    with pair.replica_paused():
        with pytest.raises(PublishError, match="may still be delivered"):
            await bus.publish_many([Padded(n=n, pad="y" * 1000) for n in range(8)])
        assert pair.stored(pair.p, namespace) == 16


async def pending_rows(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        count = await conn.scalar(
            select(func.count()).select_from(outbox_table).where(outbox_table.c.sent_at.is_(None))
        )
    return int(count or 0)


async def test_outbox_relay_keeps_the_row_until_the_replica_has_the_event(
    pair: Pair, namespace: str, make_bus: Callable[..., EventBus], pg_engine: AsyncEngine
) -> None:
    bus = make_bus(min_replicas=1)
    outbox = Outbox(bus, pg_engine)
    await bus.start()
    relay = outbox.relay
    assert relay is not None
    register(pair.p, namespace, "tests", [("outbox.replicas", ACTOR, QUEUE)])
    with pair.replica_paused():
        async with async_sessionmaker(pg_engine)() as session, session.begin():
            await bus.publish(Placed(topic="outbox.replicas", key="k", seq=1), session=session)
        deadline = time.monotonic() + 15
        while "may still be delivered" not in (relay.last_error or ""):
            assert time.monotonic() < deadline, relay.last_error
            await asyncio.sleep(0.02)
        # The relay's publish failed on the replica count: its row stays.
        assert await pending_rows(pg_engine) == 1
        assert pair.stored(pair.p, namespace) >= 1  # written on the primary all the same
    deadline = time.monotonic() + 15
    while await pending_rows(pg_engine):
        assert time.monotonic() < deadline, "the relay did not send the row once resumed"
        await asyncio.sleep(0.02)
    # At least once: the row's event is on the replica (maybe more than once).
    assert pair.stored(pair.r, namespace) >= 1


async def test_fsync_on_a_server_without_waitaof_fails_the_start(
    pair: Pair, make_bus: Callable[..., EventBus]
) -> None:
    version = tuple(int(p) for p in pair.p.info("server")["redis_version"].split("."))
    if version >= (7, 2):
        pytest.skip("this Redis has WAITAOF")
    bus = make_bus(min_replicas=1, replica_fsync=True)
    with pytest.raises(ConfigurationError, match=r"EVENTBUS_REDIS_REPLICA_FSYNC.*7\.2") as caught:
        await bus.start()
    # It names the setting, the server's version and what to do instead.
    message = str(caught.value)
    assert f"runs {pair.p.info('server')['redis_version']}" in message
    assert "set EVENTBUS_REDIS_REPLICA_FSYNC=false" in message and "(WAIT)" in message


async def test_fsync_asked_of_a_server_unreachable_at_start_fails_the_first_publish(
    pair: Pair,
) -> None:
    version = tuple(int(p) for p in pair.p.info("server")["redis_version"].split("."))
    if version >= (7, 2):
        pytest.skip("this Redis has WAITAOF")
    late = RedisServer()  # a free port, nothing listening yet
    bus = EventBus(
        backend=RedisBackend(
            url=late.url, min_replicas=1, replica_fsync=True, replica_timeout=REPLICA_TIMEOUT
        ),
        settings=EventBusSettings(shutdown_timeout=2.0),
    )
    try:
        await bus.start()  # publishing only: an unreachable Redis is a warning
        late.start()
        with pytest.raises(PublishError, match=r"EVENTBUS_REDIS_REPLICA_FSYNC.*7\.2") as caught:
            await bus.publish(h.Numbered(n=1))
        assert "nothing was published" in str(caught.value)
        # No event anywhere (the topic a publisher notes in {ns}:ptopics is no event).
        keys = redis.Redis(host=HOST, port=late.port).keys("*")
        assert [k for k in keys if not k.endswith(b":ptopics")] == []
    finally:
        await bus.stop()
        broker = bus.backend.broker  # type: ignore[attr-defined]
        if broker is not None:
            broker.close()
        late.stop()


def replicas_health(results: list[HealthResult]) -> HealthResult:
    [result] = [r for r in results if r.backend == "redis.replicas"]
    return result


async def test_health_is_degraded_while_the_primary_has_too_few_replicas_in_sync(
    pair: Pair, namespace: str, make_bus: Callable[..., EventBus]
) -> None:
    """Every publish fails while fewer replicas than EVENTBUS_REDIS_MIN_REPLICAS are
    there to acknowledge it: health says so, naming the setting and the count."""
    bus = make_bus(min_replicas=1)
    await bus.start()
    ready = replicas_health(await bus.health.check())
    assert ready.status is HealthStatus.HEALTHY, ready  # otherwise the test proves nothing
    assert ready.detail == "1 replica(s) in sync, 1 required"

    pair.replica.stop()  # a replica that is down: the primary drops its link
    try:
        wait_until(
            lambda: pair.p.info("replication")["connected_slaves"] == 0, 15, "the link's drop"
        )
        down = replicas_health(await bus.health.check())
        assert down.status is HealthStatus.DEGRADED, down
        assert "EVENTBUS_REDIS_MIN_REPLICAS=1" in down.detail
        assert "0 connected, in-sync replica(s) (0 connected" in down.detail
        # What health warns of: the publish fails (the event is on the primary).
        with pytest.raises(PublishError, match="may still be delivered"):
            await bus.publish(h.Numbered(n=1))
    finally:
        pair.replica.start()
        wait_until(pair.caught_up, 15, "the restarted replica to catch up")
    back = replicas_health(await bus.health.check())
    assert back.status is HealthStatus.HEALTHY, back
    await bus.publish(h.Numbered(n=2))

    # A replica that is connected but silent (SIGSTOP): its lag grows until health
    # no longer counts it in sync, about REPLICA_HEALTH_MAX_LAG seconds.
    with pair.replica_paused():
        deadline = time.monotonic() + REPLICA_HEALTH_MAX_LAG + 15
        while (paused := replicas_health(await bus.health.check())).status is not (
            HealthStatus.DEGRADED
        ):
            assert time.monotonic() < deadline, paused
            await asyncio.sleep(0.2)
        assert "0 connected, in-sync replica(s) (1 connected" in paused.detail
    # Resumed, it acknowledges again within a second or so.
    wait_until(pair.acknowledging, 15, "the resumed replica's acknowledgement")
    back = replicas_health(await bus.health.check())
    assert back.status is HealthStatus.HEALTHY, back


async def test_health_counts_replicas_against_the_setting(
    pair: Pair, make_bus: Callable[..., EventBus]
) -> None:
    wait_until(pair.acknowledging, 15, "the replica's acknowledgement")
    two = make_bus(min_replicas=2)  # one replica exists
    await two.start()
    result = replicas_health(await two.health.check())
    assert result.status is HealthStatus.DEGRADED, result
    assert "EVENTBUS_REDIS_MIN_REPLICAS=2" in result.detail
    assert "1 connected, in-sync replica(s) (1 connected" in result.detail
    assert "EVENTBUS_REDIS_REPLICA_TIMEOUT=0.5s" in result.detail
    # Without replicas to wait for, there is nothing to report.
    zero = make_bus()
    await zero.start()
    assert not [r for r in await zero.health.check() if r.backend == "redis.replicas"]


# -- settings ---------------------------------------------------------------------------


def test_settings_default_to_no_replica_wait() -> None:
    settings = EventBusSettings()
    assert settings.redis_min_replicas == 0
    backend = RedisBackend.from_settings(settings)
    assert backend.min_replicas == 0 and backend.replica_fsync is False


def test_settings_reach_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTBUS_REDIS_MIN_REPLICAS", "2")
    monkeypatch.setenv("EVENTBUS_REDIS_REPLICA_TIMEOUT", "0.25")
    monkeypatch.setenv("EVENTBUS_REDIS_REPLICA_FSYNC", "true")
    backend = RedisBackend.from_settings(EventBusSettings())
    assert (backend.min_replicas, backend.replica_timeout, backend.replica_fsync) == (
        2,
        0.25,
        True,
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("EVENTBUS_REDIS_MIN_REPLICAS", "-1"),
        ("EVENTBUS_REDIS_MIN_REPLICAS", "101"),
        ("EVENTBUS_REDIS_MIN_REPLICAS", "one"),
        ("EVENTBUS_REDIS_REPLICA_TIMEOUT", "0"),
        ("EVENTBUS_REDIS_REPLICA_TIMEOUT", "nan"),
        ("EVENTBUS_REDIS_REPLICA_TIMEOUT", "inf"),
        ("EVENTBUS_REDIS_REPLICA_TIMEOUT", "3601"),
    ],
)
def test_invalid_values_are_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=f"{variable}=") as caught:
        EventBusSettings()
    assert "allowed:" in str(caught.value)


def test_a_replica_wait_as_long_as_the_publish_call_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EVENTBUS_REDIS_MIN_REPLICAS", "1")
    monkeypatch.setenv("EVENTBUS_REDIS_REPLICA_TIMEOUT", "2")
    with pytest.raises(ConfigurationError) as caught:
        EventBusSettings()  # the publish timeout is 2 s by default
    message = str(caught.value)
    assert "EVENTBUS_REDIS_REPLICA_TIMEOUT=2" in message
    assert "under EVENTBUS_REDIS_PUBLISH_TIMEOUT=2" in message
    with pytest.raises(ConfigurationError, match="under publish_timeout"):
        RedisBackend(min_replicas=1, replica_timeout=3.0, publish_timeout=2.0)
    # Without replicas to wait for, the timeout is not used and not checked.
    monkeypatch.setenv("EVENTBUS_REDIS_MIN_REPLICAS", "0")
    assert EventBusSettings().redis_replica_timeout == 2.0


# -- benchmark --------------------------------------------------------------------------


def test_replicas_bench_smoke_prints_both_settings_measured() -> None:
    """bench/redis_replicas_bench.py runs: publish/s with MIN_REPLICAS=1 next to 0."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, str(root / "bench" / "redis_replicas_bench.py"), "--smoke"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for row in ("| publish one by one |", "| publish, 64 concurrent callers |"):
        [line] = [line for line in done.stdout.splitlines() if line.startswith(row)]
        cells = [cell.strip().replace(",", "") for cell in line.strip("|").split("|")]
        zero, one = float(cells[1]), float(cells[2])
        assert zero > 0 and one > 0, line
