"""Unrouted is not lost: events published to a topic with no subscription *yet*
reach the subscription created moments later (a fresh deploy whose web process
starts first, a Redis restart without persistence), within a bounded window.

Also: the backlog counter of a handler never goes negative, and health degrades
whenever events wait with no live worker, whatever the counter says.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator

import pytest
import redis
from dramatiq import Message

from eventbus import EventBus, EventBusSettings, HealthStatus, UnroutedError
from eventbus.redis.backend import RedisBackend
from eventbus.redis.scripts import (
    WARM_FIELD,
    backlog_key,
    bodies_key,
    ready_key,
    topic_key,
)
from eventbus.redis.subscriptions import (
    UnroutedRetention,
    register,
    remove_subscription,
)
from tests import redis_handlers as h

pytest.register_assert_rewrite("tests.redis_support")  # before it is imported below
from tests.redis_support import Workers, queue_name  # noqa: E402

pytest_plugins = ["tests.redis_support"]
pytestmark = pytest.mark.timeout(60)

FIRST = queue_name()
SECOND = queue_name(h.OTHER_QUEUE)
RECORD_ACTOR = f"{h.RECORD}:tests.redis_handlers.record"
ASYNC_ACTOR = f"{h.RECORD}:tests.redis_handlers.record_async"


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def stored(r: redis.Redis, namespace: str, queue: str) -> list[int]:
    """The ``n`` of every message waiting on ``queue``, in queue order."""
    out = []
    for entry in r.lrange(ready_key(namespace, queue), 0, -1):
        body = r.hget(bodies_key(namespace, queue), entry)
        out.append(Message.decode(body).args[0]["event"]["n"])
    return out


def subscribe(
    r: redis.Redis,
    namespace: str,
    service: str,
    queue: str,
    retention: UnroutedRetention | None = None,
    *,
    again: bool = False,
) -> None:
    """Write the subscription of RECORD's sync handler for ``service`` on ``queue``,
    as a worker of that service does when it boots (``again``: when its heartbeat
    found that Redis forgot it)."""
    register(
        r, namespace, service, [(h.RECORD, RECORD_ACTOR, queue)], retention=retention, again=again
    )


async def started(make_redis_bus: Callable[..., EventBus], **options: object) -> EventBus:
    bus = make_redis_bus(**options)
    await bus.start()
    return bus


# -- a fresh deploy: the web process publishes before any worker exists --------------


async def test_events_published_before_any_worker_exists_reach_the_worker_started_later(
    make_redis_bus: Callable[..., EventBus], r: redis.Redis, namespace: str, workers: Workers
) -> None:
    bus = await started(make_redis_bus)
    await bus.publish_many([h.Numbered(n=i) for i in range(20)])  # nobody subscribes yet
    workers.start()  # writes its subscriptions at boot
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if len(r.smembers(h.key("handled", namespace))) == 20 and (
            len(r.smembers(h.key("handled_async", namespace))) == 20
        ):
            break
        await asyncio.sleep(0.05)
    assert {int(n) for n in r.smembers(h.key("handled", namespace))} == set(range(20))
    assert {int(n) for n in r.smembers(h.key("handled_async", namespace))} == set(range(20))
    await bus.drain(timeout=10)
    assert int(r.get(h.key("runs", namespace)) or 0) == 20  # each once


# -- Redis forgot the subscriptions: they come back one service at a time -------------


async def test_a_service_whose_subscription_comes_back_second_still_gets_every_event(
    make_redis_bus: Callable[..., EventBus], r: redis.Redis, namespace: str
) -> None:
    """After a Redis restart without persistence, service a's worker writes its
    subscription first, service b's a beat later: the events published in between
    went to a only, and b must get them too (once)."""
    bus = await started(make_redis_bus)
    await bus.publish_many([h.Numbered(n=i) for i in range(3)])  # no subscription at all
    subscribe(r, namespace, "a", "a.eventbus", again=True)
    await bus.publish_many([h.Numbered(n=i) for i in range(3, 7)])  # a only
    subscribe(r, namespace, "b", "b.eventbus", again=True)
    await bus.publish_many([h.Numbered(n=i) for i in range(7, 12)])  # both
    assert stored(r, namespace, "a.eventbus") == list(range(12))
    assert stored(r, namespace, "b.eventbus") == list(range(12))


async def test_rewriting_an_existing_subscription_hands_it_nothing_again(
    make_redis_bus: Callable[..., EventBus], r: redis.Redis, namespace: str
) -> None:
    """Workers rewrite their subscriptions at every boot and whenever Redis forgot
    the worker: only a subscription that did not exist gets the retained events."""
    bus = await started(make_redis_bus)
    await bus.publish_many([h.Numbered(n=i) for i in range(3)])
    subscribe(r, namespace, "a", "a.eventbus")
    await bus.publish(h.Numbered(n=3))
    for _ in range(3):
        subscribe(r, namespace, "a", "a.eventbus")
    assert stored(r, namespace, "a.eventbus") == [0, 1, 2, 3]
    assert int(r.hget(backlog_key(namespace, "a.eventbus"), RECORD_ACTOR) or 0) == 4


async def test_a_removed_subscription_written_again_gets_only_what_came_after(
    make_redis_bus: Callable[..., EventBus], r: redis.Redis, namespace: str
) -> None:
    bus = await started(make_redis_bus)
    subscribe(r, namespace, "a", "a.eventbus")
    await bus.publish_many([h.Numbered(n=i) for i in range(2)])  # retained: warm-up
    assert remove_subscription(r, namespace, "a", h.RECORD, RECORD_ACTOR, None) == 2
    await bus.publish(h.Numbered(n=2))  # unrouted now
    subscribe(r, namespace, "a", "a.eventbus")
    assert stored(r, namespace, "a.eventbus") == [2]  # 0 and 1 were dead-lettered


async def test_a_handler_deployed_on_a_subscribed_topic_starts_from_now(
    make_redis_bus: Callable[..., EventBus], r: redis.Redis, namespace: str
) -> None:
    """A handler gets events from the moment its worker first registered it, even
    while the topic warms up: a deploy is not a replay."""
    bus = await started(make_redis_bus)
    await bus.publish(h.Numbered(n=0))  # no subscription yet
    subscribe(r, namespace, "a", "a.eventbus")  # the first: it gets event 0
    assert r.hexists(topic_key(namespace, h.RECORD), WARM_FIELD)  # the topic warms up
    await bus.publish_many([h.Numbered(n=i) for i in range(1, 3)])
    subscribe(r, namespace, "b", "b.eventbus")  # deployed: not written again
    await bus.publish(h.Numbered(n=3))
    assert stored(r, namespace, "a.eventbus") == [0, 1, 2, 3]
    assert stored(r, namespace, "b.eventbus") == [3]


async def test_after_the_warmup_a_subscription_written_again_starts_from_now(
    make_redis_bus: Callable[..., EventBus], r: redis.Redis, namespace: str
) -> None:
    bus = await started(make_redis_bus, unrouted_warmup=0.2)
    retention = UnroutedRetention(warmup=0.2)
    subscribe(r, namespace, "a", "a.eventbus", retention, again=True)
    assert r.hexists(topic_key(namespace, h.RECORD), WARM_FIELD)
    await asyncio.sleep(0.2)  # the warm-up runs out
    await bus.publish_many([h.Numbered(n=i) for i in range(3)])
    subscribe(r, namespace, "b", "b.eventbus", retention, again=True)
    await bus.publish(h.Numbered(n=3))
    assert stored(r, namespace, "a.eventbus") == [0, 1, 2, 3]
    assert stored(r, namespace, "b.eventbus") == [3]


async def test_every_handler_of_a_service_written_together_gets_the_unrouted_events(
    make_redis_bus: Callable[..., EventBus], r: redis.Redis, namespace: str
) -> None:
    bus = await started(make_redis_bus)
    await bus.publish_many([h.Numbered(n=i) for i in range(2)])
    register(r, namespace, "a", [(h.RECORD, RECORD_ACTOR, "a.q1"), (h.RECORD, ASYNC_ACTOR, "a.q2")])
    assert stored(r, namespace, "a.q1") == [0, 1]
    assert stored(r, namespace, "a.q2") == [0, 1]


# -- the window is bounded ---------------------------------------------------------


async def test_retention_is_bounded_by_count_per_topic_and_drops_are_visible(
    make_redis_bus: Callable[..., EventBus],
    r: redis.Redis,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = await started(make_redis_bus, unrouted_max_events=5)
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        await bus.publish_many([h.Numbered(n=i) for i in range(8)])
    assert "3 unrouted event(s) of topic redis.test.record dropped" in caplog.text
    subscribe(r, namespace, "a", "a.eventbus", UnroutedRetention(max_events=5))
    assert stored(r, namespace, "a.eventbus") == [3, 4, 5, 6, 7]  # the newest 5
    results = {x.backend: x for x in await bus.health.check()}
    assert results["redis.unrouted"].status is HealthStatus.DEGRADED
    assert "3 unrouted event(s) dropped" in results["redis.unrouted"].detail
    assert h.RECORD in results["redis.unrouted"].detail


async def test_retention_is_bounded_by_age(
    make_redis_bus: Callable[..., EventBus], r: redis.Redis, namespace: str
) -> None:
    bus = await started(make_redis_bus, unrouted_retention=0.3)
    await bus.publish_many([h.Numbered(n=i) for i in range(3)])
    await asyncio.sleep(0.3)  # they expire
    await bus.publish(h.Numbered(n=3))  # still within the window
    subscribe(r, namespace, "a", "a.eventbus", UnroutedRetention(seconds=0.3))
    assert stored(r, namespace, "a.eventbus") == [3]
    results = {x.backend: x for x in await bus.health.check()}
    assert "3 unrouted event(s) dropped" in results["redis.unrouted"].detail


async def test_a_worker_heartbeat_sweeps_expired_unrouted_events(
    make_redis_bus: Callable[..., EventBus], r: redis.Redis, namespace: str
) -> None:
    """Nothing else publishes to the topic: a worker's sweep still drops and counts
    what expired, so memory is bounded by age, not only by the next publish."""
    publisher = await started(make_redis_bus, unrouted_retention=0.2)
    await publisher.publish_many([h.Numbered(n=i, topic="nobody.yet") for i in range(4)])
    worker = make_redis_bus(unrouted_retention=0.2)
    worker.backend.runs_worker = False  # type: ignore[attr-defined]
    await worker.start(consume=True)
    await asyncio.sleep(0.2)  # they expire
    assert worker.backend.broker.sweep_unrouted() == 4  # type: ignore[attr-defined]
    assert not r.exists(f"{namespace}:u:nobody.yet")


async def test_unrouted_error_mode_still_refuses_and_keeps_nothing(
    redis_url: str, r: redis.Redis, namespace: str
) -> None:
    backend = RedisBackend(url=redis_url, namespace=namespace)
    bus = EventBus(backend=backend, settings=EventBusSettings(unrouted="error"))
    await bus.start()
    try:
        with pytest.raises(UnroutedError):
            await bus.publish(h.Numbered(n=1))
        subscribe(r, namespace, "a", "a.eventbus")
        assert stored(r, namespace, "a.eventbus") == []  # refused means not kept either
        await bus.publish(h.Numbered(n=2))
        assert stored(r, namespace, "a.eventbus") == [2]
    finally:
        await bus.stop()


async def test_retention_off_drops_unrouted_events_at_once_and_counts_them(
    make_redis_bus: Callable[..., EventBus], r: redis.Redis, namespace: str
) -> None:
    bus = await started(make_redis_bus, unrouted_retention=0)
    await bus.publish(h.Numbered(n=1))
    subscribe(r, namespace, "a", "a.eventbus", UnroutedRetention(seconds=0))
    assert stored(r, namespace, "a.eventbus") == []
    results = {x.backend: x for x in await bus.health.check()}
    assert "1 unrouted event(s) dropped" in results["redis.unrouted"].detail


# -- the backlog counter and health ---------------------------------------------------


async def test_removing_a_subscription_while_a_worker_holds_its_events_keeps_the_backlog_true(
    make_redis_bus: Callable[..., EventBus], r: redis.Redis, namespace: str
) -> None:
    """The issue: `subscriptions remove` with 3 events in a worker's hands left the
    counter at -3 once they finished, so 3 new events waiting with no worker read
    as 0 and health said healthy."""
    bus = make_redis_bus()
    bus.backend.runs_worker = False  # type: ignore[attr-defined]  # we drive the consumer
    await bus.start(consume=True)
    await bus.publish_many([h.Numbered(n=i) for i in range(3)])
    broker = bus.broker
    consumer = broker.consume(FIRST, prefetch=3, timeout=100)
    held = []
    deadline = time.monotonic() + 5
    while len(held) < 3 and time.monotonic() < deadline:
        message = next(consumer)
        if message is not None:
            held.append(message)
    assert len(held) == 3
    assert remove_subscription(r, namespace, "tests", h.RECORD, RECORD_ACTOR, None) == 0
    for message in held:  # the worker finishes what it held
        consumer.ack(message)
    consumer.close()
    assert int(r.hget(backlog_key(namespace, FIRST), RECORD_ACTOR) or 0) == 0  # never < 0
    broker.release()  # the worker stops: nobody consumes the queue any more
    subscribe(r, namespace, "tests", FIRST)  # a worker booted once, then went away
    await bus.publish_many([h.Numbered(n=i) for i in range(3, 6)])
    workers_health = {x.backend: x for x in await bus.health.check()}["redis.workers"]
    assert workers_health.status is HealthStatus.DEGRADED, workers_health
    assert "waiting" in workers_health.detail
    # the state health reads: the handler's events wait and no live worker has it (the
    # detail names at most five handlers: other test modules' handlers of the topic may
    # come first in a full run)
    [row] = [s for s in bus.backend.subscription_list() if s.handler == RECORD_ACTOR]
    assert row.live_workers == 0
    assert max(row.backlog, row.waiting) >= 3


async def test_a_backlog_counter_found_below_zero_counts_from_zero_at_the_next_publish(
    make_redis_bus: Callable[..., EventBus], r: redis.Redis, namespace: str
) -> None:
    bus = await started(make_redis_bus)
    subscribe(r, namespace, "tests", FIRST)
    r.hset(backlog_key(namespace, FIRST), RECORD_ACTOR, -3)  # acks after a Redis restart
    await bus.publish_many([h.Numbered(n=i) for i in range(2)])
    assert int(r.hget(backlog_key(namespace, FIRST), RECORD_ACTOR)) == 2


@pytest.mark.parametrize("counter", ["0", "-5"])
async def test_health_degrades_when_events_wait_with_no_live_worker_whatever_the_counter_says(
    make_redis_bus: Callable[..., EventBus], r: redis.Redis, namespace: str, counter: str
) -> None:
    bus = await started(make_redis_bus)
    subscribe(r, namespace, "tests", FIRST)
    await bus.publish_many([h.Numbered(n=i) for i in range(2)])
    r.hset(backlog_key(namespace, FIRST), RECORD_ACTOR, counter)  # a counter gone wrong
    workers_health = {x.backend: x for x in await bus.health.check()}["redis.workers"]
    assert workers_health.status is HealthStatus.DEGRADED, workers_health
    assert RECORD_ACTOR in workers_health.detail
