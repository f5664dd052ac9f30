"""Redis production settings, against real servers: a full Redis (``maxmemory`` with
``maxmemory-policy noeviction``) refuses publishes loudly and keeps what it
acknowledged, all or none across handlers; an evicting policy (which would lose
events silently) is warned about at start and reported by health.

Each test starts its own redis-server (never reconfigures the session's); the
handlers of tests/production_handlers.py record on the session's Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

import eventbus.redis.memory as memory
from eventbus import EventBus, EventBusSettings, PublishError
from eventbus.health import HealthStatus
from eventbus.redis.backend import RedisBackend
from eventbus.redis.scripts import bodies_key
from eventbus.redis.subscriptions import register
from tests import production_handlers as ph

pytest.register_assert_rewrite("tests.redis_support")  # before it is imported below
from tests.redis_support import (  # noqa: E402
    TEST_SERVICE,
    RedisServer,
    Workers,
    queue_name,
    require_redis_server_binary,
    wait_until,
)

pytest_plugins = ["tests.redis_support"]
pytestmark = pytest.mark.timeout(90)

FIRST_QUEUE = queue_name()
SECOND_QUEUE = queue_name(ph.OTHER_QUEUE)
SUBSCRIPTIONS = [
    (ph.TOPIC, f"{ph.TOPIC}:tests.production_handlers.first", FIRST_QUEUE),
    (ph.TOPIC, f"{ph.TOPIC}:tests.production_handlers.second", SECOND_QUEUE),
]
#: A small maxmemory (an empty Redis uses about 1 MB of it), filled in a few hundred publishes.
MAXMEMORY = "4mb"
#: Bytes of padding per event.
PAD = "x" * 2000
#: Publishes after which a 3 MB Redis must have refused one (the premise of the test).
MOST_PUBLISHES = 5000


@contextlib.contextmanager
def server(policy: str, *extra: str) -> Iterator[RedisServer]:
    require_redis_server_binary()
    srv = RedisServer(args=("--maxmemory", MAXMEMORY, "--maxmemory-policy", policy, *extra))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def full_redis() -> Iterator[RedisServer]:
    with server("noeviction") as srv:
        yield srv


def make_bus(url: str, namespace: str) -> EventBus:
    return EventBus(
        backend=RedisBackend(url=url, namespace=namespace),
        settings=EventBusSettings(service=TEST_SERVICE),
    )


async def fill(bus: EventBus, client: redis.Redis, namespace: str) -> tuple[list[int], str]:
    """Publish until Redis refuses: (the events acknowledged, the refusal's message)."""
    register(client, namespace, TEST_SERVICE, SUBSCRIPTIONS)
    acknowledged: list[int] = []
    for n in range(MOST_PUBLISHES):
        try:
            await bus.publish(ph.Filler(n=n, pad=PAD))
        except PublishError as exc:
            return acknowledged, str(exc)
        acknowledged.append(n)
    raise AssertionError(f"a {MAXMEMORY} Redis took {MOST_PUBLISHES} events of 2 kB")


def stored(client: redis.Redis, namespace: str) -> tuple[int, int]:
    """Messages in each handler's queue."""
    return (
        int(client.hlen(bodies_key(namespace, FIRST_QUEUE))),
        int(client.hlen(bodies_key(namespace, SECOND_QUEUE))),
    )


def delivered(redis_url: str, namespace: str) -> tuple[set[int], set[int]]:
    recorder = redis.Redis.from_url(redis_url)
    try:
        return tuple(  # type: ignore[return-value]
            {int(n) for n in recorder.smembers(ph.record_key(name, namespace))}
            for name in ("first", "second")
        )
    finally:
        recorder.close()


async def test_full_redis_refuses_publish_as_out_of_memory_and_keeps_what_it_acknowledged(
    full_redis: RedisServer, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    client = redis.Redis(port=full_redis.port)
    bus = make_bus(full_redis.url, namespace)
    await bus.start()
    acknowledged, message = await fill(bus, client, namespace)
    assert len(acknowledged) > 20
    assert "out of memory (OOM)" in message and "maxmemory" in message, message
    assert "nothing was published" in message, message
    # All or none across the two handlers: the refused event reached neither queue.
    assert stored(client, namespace) == (len(acknowledged), len(acknowledged))

    # Still full: a publish_many and concurrent (grouped) publishes fail alike, and
    # write nothing.
    with pytest.raises(PublishError, match=r"out of memory"):
        await bus.publish_many([ph.Filler(n=-i, pad=PAD) for i in range(1, 6)])
    outcomes = await asyncio.gather(
        *(bus.publish(ph.Filler(n=-100 - i, pad=PAD)) for i in range(8)),
        return_exceptions=True,
    )
    assert all(isinstance(o, PublishError) and "out of memory" in str(o) for o in outcomes)
    assert stored(client, namespace) == (len(acknowledged), len(acknowledged))

    # Health says why before anyone reads a log.
    reported = [r for r in await bus.backend.health() if r.backend == "redis.memory"]
    assert reported and reported[0].status is HealthStatus.DEGRADED
    assert "full" in reported[0].detail and "PublishError" in reported[0].detail

    # The operator makes room: every acknowledged event reaches both handlers, once.
    client.config_set("maxmemory", "0")
    await bus.publish(ph.Filler(n=len(acknowledged)))
    expected = {*acknowledged, len(acknowledged)}
    workers = Workers(full_redis.url, namespace, tmp_path)
    try:
        workers.start(("tests.production_handlers",), env={"EVENTBUS_TEST_RECORD_URL": redis_url})
        await asyncio.to_thread(
            wait_until,
            lambda: delivered(redis_url, namespace) == (expected, expected),
            60,
            "every acknowledged event at both handlers",
        )
    finally:
        workers.stop_all()
    assert not [r for r in await bus.backend.health() if r.backend == "redis.memory"]
    await bus.stop()


@pytest.mark.parametrize("mode", ["loop", "threads"])
async def test_workers_drain_a_full_redis_without_more_memory(
    full_redis: RedisServer, redis_url: str, namespace: str, tmp_path: Path, mode: str
) -> None:
    """A worker started on a full noeviction Redis boots (its subscriptions and
    schemas are written), fetches and acks every event published before Redis
    refused one, and then publishing works again (both worker kinds: a full Redis
    refuses BLMOVE, so each polls with its fetch script)."""
    client = redis.Redis(port=full_redis.port)
    bus = make_bus(full_redis.url, namespace)
    await bus.start()
    acknowledged, _ = await fill(bus, client, namespace)
    await bus.stop()
    workers = Workers(full_redis.url, namespace, tmp_path)
    try:
        worker = workers.start(
            ("tests.production_handlers",),
            env={"EVENTBUS_TEST_RECORD_URL": redis_url, "EVENTBUS_REDIS_WORKER": mode},
            wait=False,
        )
        everything = set(acknowledged)

        def done() -> bool:
            if worker.process.poll() is not None:
                raise AssertionError(f"the worker exited:\n{worker.output()[-2000:]}")
            return delivered(redis_url, namespace) == (everything, everything)

        await asyncio.to_thread(wait_until, done, 30, "the workers to drain a full Redis")
        await bus.start()
        try:
            after = len(acknowledged) + 1_000_000
            await bus.publish(ph.Filler(n=after, pad=PAD))  # Redis has room again
            everything.add(after)
            await asyncio.to_thread(wait_until, done, 30, "the event published after")
        finally:
            await bus.stop()
    finally:
        workers.stop_all()


async def test_a_large_publish_many_refused_midway_leaves_no_staged_chunks(
    namespace: str,
) -> None:
    """A publish_many over 8 MiB goes to Redis in chunks, staged until its commit: when a
    full Redis refuses one, the chunks already staged are deleted at once (not left to
    their 5-minute expiry, keeping Redis full and failing every publish meanwhile)."""
    with server("noeviction", "--maxmemory", "30mb") as srv:
        client = redis.Redis(port=srv.port)
        register(client, namespace, TEST_SERVICE, SUBSCRIPTIONS)
        bus = make_bus(srv.url, namespace)
        await bus.start()
        big = [ph.Filler(n=i, pad="y" * 100_000) for i in range(400)]  # 40 MB
        with pytest.raises(PublishError, match=r"out of memory"):
            await bus.publish_many(big)
        assert stored(client, namespace) == (0, 0)
        assert not list(client.scan_iter(match=f"{namespace}:stage:*"))
        await bus.publish(ph.Filler(n=1))  # Redis has room again
        assert stored(client, namespace) == (1, 1)
        await bus.stop()


def test_an_evicting_policy_loses_acknowledged_events() -> None:
    """The premise of the warning below: with allkeys-lru, a Redis that fills up
    evicts queues of events it acknowledged, and nobody is told."""
    with server("allkeys-lru") as srv:
        client = redis.Redis(port=srv.port)
        namespace = "evicting"

        async def publish_all() -> int:
            bus = make_bus(srv.url, namespace)
            await bus.start()
            register(client, namespace, TEST_SERVICE, SUBSCRIPTIONS)
            count = 3000  # 6 MB of events (twice: two queues) into 4 MB: every publish returns OK
            for n in range(count):
                await bus.publish(ph.Filler(n=n, pad=PAD))
            await bus.stop()
            return count

        published = asyncio.run(publish_all())
        first, second = stored(client, namespace)
        assert first < published or second < published, (first, second, published)


async def test_an_evicting_policy_is_warned_about_at_start_and_degrades_health(
    namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    with server("allkeys-lru") as srv:
        bus = make_bus(srv.url, namespace)
        with caplog.at_level(logging.WARNING, logger="eventbus.redis.memory"):
            await bus.start()
        warned = [r.getMessage() for r in caplog.records if "allkeys-lru" in r.getMessage()]
        assert warned and "noeviction" in warned[0], caplog.text
        reported = [r for r in await bus.backend.health() if r.backend == "redis.memory"]
        assert reported and reported[0].status is HealthStatus.DEGRADED
        assert "allkeys-lru" in reported[0].detail and "noeviction" in reported[0].detail

        # Fixed on the server: health recovers without a restart of the publisher.
        redis.Redis(port=srv.port).config_set("maxmemory-policy", "noeviction")
        assert not [r for r in await bus.backend.health() if r.backend == "redis.memory"]
        # volatile-* evicts only keys with a time to live (eventbus's durable keys have none).
        redis.Redis(port=srv.port).config_set("maxmemory-policy", "volatile-lru")
        assert not [r for r in await bus.backend.health() if r.backend == "redis.memory"]
        await bus.stop()


async def test_a_server_that_refuses_info_and_config_still_publishes(
    namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Managed services disable CONFIG (some rename INFO): the policy is unknown, said
    once at start, and nothing else changes."""
    disabled = ("--rename-command", "CONFIG", "", "--rename-command", "INFO", "")
    with server("allkeys-lru", *disabled) as srv:
        client = redis.Redis(port=srv.port)
        register(client, namespace, TEST_SERVICE, SUBSCRIPTIONS)
        bus = make_bus(srv.url, namespace)
        with caplog.at_level(logging.INFO, logger="eventbus.redis.memory"):
            await bus.start()
        assert "Cannot read the eviction policy" in caplog.text
        await bus.publish(ph.Filler(n=1))
        assert stored(client, namespace) == (1, 1)
        results = {r.backend: r.status for r in await bus.backend.health()}
        assert results["redis"] is HealthStatus.HEALTHY and "redis.memory" not in results
        await bus.stop()


@pytest.mark.parametrize(
    ("policy", "loses_events"),
    [
        ("noeviction", False),
        ("volatile-lru", False),
        ("volatile-lfu", False),
        ("volatile-random", False),
        ("volatile-ttl", False),
        ("allkeys-lru", True),
        ("allkeys-lfu", True),
        ("allkeys-random", True),
    ],
)
def test_which_policies_may_evict_queued_events(policy: str, loses_events: bool) -> None:
    """Every policy Redis 7 knows: only allkeys-* may evict keys without a time to live
    (eventbus's queues, messages and subscriptions have none)."""
    assert memory.evicting(policy) is loses_events
