"""Delayed publish (``publish(event, delay=...)`` / ``eta=...``) on every backend.

Embedded: a timer in the process.  Redis: the fan-out script puts the event's
messages in each queue's delayed set, so a delayed event outlives the worker
that would have run it; real ``dramatiq eventbus.actors`` processes here.
Kafka refuses.  The transactional outbox carries the due time through its relay.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import redis
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from eventbus import BaseEvent, EventBus, HealthStatus, PublishError
from eventbus.bus import MAX_PUBLISH_DELAY
from eventbus.health import HealthChecker
from eventbus.metrics import InMemoryMetricsCollector
from eventbus.outbox.outbox import Outbox
from tests.delay_handlers import Delayed
from tests.redis_keys import key

pytest.register_assert_rewrite("tests.redis_support")  # before it is imported below
from tests.redis_support import Workers, wait_settled, wait_until  # noqa: E402

pytest_plugins = ["tests.redis_support", "tests.pg_support", "tests.kafka_support"]

HANDLERS = ("tests.delay_handlers",)
#: Seconds a delivery may take once due (worker start included).
DELIVERY_TIMEOUT = 30.0


async def wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def recording_bus(
    make_bus: Callable[..., EventBus], topic: str, **options: object
) -> tuple[EventBus, dict[str, float]]:
    """A started embedded bus whose handler of ``topic`` records when each event ran."""
    bus = make_bus(**options)
    handled: dict[str, float] = {}

    async def record(event: BaseEvent) -> None:
        handled[event.event_id] = time.time()

    await bus.registry.register(topic, record)
    await bus.start()
    return bus, handled


# -- embedded ---------------------------------------------------------------------


async def test_embedded_delayed_event_waits_while_others_pass(
    make_bus: Callable[..., EventBus], topic: str
) -> None:
    bus, handled = await recording_bus(make_bus, topic)
    later = BaseEvent(topic=topic)
    now = BaseEvent(topic=topic)
    published = time.time()
    await bus.publish(later, delay=0.3)
    await bus.publish(now)
    await wait_for(lambda: now.event_id in handled, "the event without delay")
    assert later.event_id not in handled or handled[later.event_id] >= published + 0.3
    await bus.drain(DELIVERY_TIMEOUT)
    assert handled[later.event_id] >= published + 0.3
    assert handled[now.event_id] < handled[later.event_id]


async def test_embedded_eta_and_timedelta_on_publish_many(
    make_bus: Callable[..., EventBus], topic: str
) -> None:
    bus, handled = await recording_bus(make_bus, topic)
    events = [BaseEvent(topic=topic) for _ in range(3)]
    eta = datetime.now(UTC) + timedelta(milliseconds=250)
    await bus.publish_many(events, eta=eta)
    single = BaseEvent(topic=topic)
    published = time.time()
    await bus.publish(single, delay=timedelta(milliseconds=200))
    await bus.drain(DELIVERY_TIMEOUT)
    assert all(handled[e.event_id] >= eta.timestamp() for e in events)
    assert handled[single.event_id] >= published + 0.2


async def test_an_eta_in_the_past_or_a_zero_delay_is_delivered_at_once(
    make_bus: Callable[..., EventBus], topic: str
) -> None:
    bus, handled = await recording_bus(make_bus, topic)
    past = BaseEvent(topic=topic)
    zero = BaseEvent(topic=topic)
    await bus.publish(past, eta=datetime.now(UTC) - timedelta(hours=1))
    await bus.publish(zero, delay=0)
    await bus.drain(DELIVERY_TIMEOUT)
    assert set(handled) == {past.event_id, zero.event_id}


@pytest.mark.parametrize(
    ("arguments", "error", "named"),
    [
        ({"delay": -1}, ValueError, "delay=-1s"),
        ({"delay": float("nan")}, ValueError, "delay=nan"),
        ({"delay": MAX_PUBLISH_DELAY + 1}, ValueError, "longest delay"),
        ({"delay": timedelta(days=8)}, ValueError, "7 days"),
        ({"delay": "5"}, TypeError, "delay must be"),
        ({"delay": True}, TypeError, "delay must be"),
        ({"eta": datetime.now() + timedelta(minutes=1)}, ValueError, "naive datetime"),
        ({"eta": datetime.now(UTC) + timedelta(days=8)}, ValueError, "eta="),
        ({"eta": time.time() + 60}, TypeError, "eta must be a datetime"),
        ({"delay": 1, "eta": datetime.now(UTC)}, ValueError, "not both"),
    ],
)
async def test_bad_delays_are_refused_naming_the_argument(
    make_bus: Callable[..., EventBus],
    topic: str,
    arguments: dict[str, object],
    error: type[Exception],
    named: str,
) -> None:
    bus, handled = await recording_bus(make_bus, topic)
    with pytest.raises(error, match=named):
        await bus.publish(BaseEvent(topic=topic), **arguments)  # type: ignore[arg-type]
    with pytest.raises(error, match=named):
        await bus.publish_many([BaseEvent(topic=topic)], **arguments)  # type: ignore[arg-type]
    await bus.drain(1)
    assert handled == {}  # nothing was published


async def test_embedded_delayed_events_still_pending_at_stop_are_dead_lettered(
    make_bus: Callable[..., EventBus], topic: str
) -> None:
    bus, handled = await recording_bus(make_bus, topic)
    event = BaseEvent(topic=topic)
    await bus.publish(event, delay=60)
    await bus.stop()
    assert handled == {}
    [record] = bus.dlq.peek()
    assert record.event is not None and record.event.event_id == event.event_id
    assert record.error_type == "ShutdownError"


# -- Redis, real worker processes ---------------------------------------------------


def handled_at(redis_url: str, namespace: str) -> dict[int, float]:
    client = redis.Redis.from_url(redis_url)
    try:
        raw = client.hgetall(key("handled_at", namespace))
    finally:
        client.close()
    return {int(n): float(at) for n, at in raw.items()}


async def test_redis_delayed_event_outlives_a_worker_restart(
    make_redis_bus: Callable[..., EventBus], redis_url: str, namespace: str, workers: Workers
) -> None:
    metrics = InMemoryMetricsCollector()
    first = workers.start(HANDLERS, threads=2)
    bus = make_redis_bus()
    bus.metrics = metrics
    await bus.start()
    published = time.time()
    await bus.publish(Delayed(n=1), delay=3.0)
    await bus.publish(Delayed(n=2))
    await asyncio.to_thread(
        wait_until, lambda: 2 in handled_at(redis_url, namespace), 20, "the event without delay"
    )
    first.stop()  # the delayed event waits in Redis, not in this worker
    assert 1 not in handled_at(redis_url, namespace) or (
        handled_at(redis_url, namespace)[1] >= published + 3.0
    )
    workers.start(HANDLERS, threads=2)
    await asyncio.to_thread(wait_settled, redis_url, namespace, DELIVERY_TIMEOUT)
    times = handled_at(redis_url, namespace)
    assert set(times) == {1, 2}
    assert times[1] >= published + 3.0
    assert metrics.published.get(Delayed.model_fields["topic"].default) == 2
    assert await bus.dlq.asize() == 0
    # A generous timeout: the health check's own is 5 s, and this machine is shared.
    results = await HealthChecker(bus.backend, timeout=DELIVERY_TIMEOUT).check()
    health = {r.backend: r.status for r in results}
    assert health["redis"] is HealthStatus.HEALTHY, results
    assert health["redis.workers"] is HealthStatus.HEALTHY, results


async def test_redis_publish_many_with_a_delay_reaches_every_subscription_later(
    make_redis_bus: Callable[..., EventBus], redis_url: str, namespace: str, workers: Workers
) -> None:
    workers.start(HANDLERS, threads=2)
    bus = make_redis_bus()
    await bus.start()
    published = time.time()
    await bus.publish_many([Delayed(n=n) for n in range(5)], delay=timedelta(seconds=1.5))
    await asyncio.to_thread(wait_settled, redis_url, namespace, DELIVERY_TIMEOUT)
    times = handled_at(redis_url, namespace)
    assert set(times) == set(range(5))
    assert min(times.values()) >= published + 1.5


async def test_redis_delayed_event_of_a_topic_without_subscription_keeps_its_delay(
    make_redis_bus: Callable[..., EventBus], redis_url: str, namespace: str, workers: Workers
) -> None:
    bus = make_redis_bus()
    await bus.start()
    published = time.time()
    # No subscription yet: the event is kept in the unrouted window with its delay,
    # and handed to the subscription the worker writes when it boots.
    await bus.publish(Delayed(n=7), delay=5.0)
    workers.start(HANDLERS, threads=2)
    await asyncio.to_thread(wait_settled, redis_url, namespace, DELIVERY_TIMEOUT)
    times = handled_at(redis_url, namespace)
    assert set(times) == {7}
    assert times[7] >= published + 5.0


# -- Kafka refuses ------------------------------------------------------------------


async def test_kafka_refuses_a_delayed_publish_and_names_the_alternative(
    make_kafka_bus: Callable[..., EventBus], kafka_names: tuple[str, str]
) -> None:
    bus = make_kafka_bus(consume=False)
    await bus.start()
    event = BaseEvent(topic=kafka_names[0])
    with pytest.raises(PublishError, match=r"Kafka backend cannot delay.*Redis backend"):
        await bus.publish(event, delay=1)
    with pytest.raises(PublishError, match="Kafka backend cannot delay"):
        await bus.publish_many([event], eta=datetime.now(UTC) + timedelta(seconds=5))
    await bus.publish(event)  # without a delay it publishes


# -- the outbox carries the due time ------------------------------------------------


async def test_outbox_relay_keeps_the_delay_taken_at_publish(
    make_bus: Callable[..., EventBus], pg_engine: AsyncEngine, topic: str
) -> None:
    bus = make_bus()
    Outbox(bus, pg_engine)
    handled: dict[str, float] = {}

    async def record(event: BaseEvent) -> None:
        handled[event.event_id] = time.time()

    await bus.registry.register(topic, record)
    await bus.start()
    event = BaseEvent(topic=topic)
    published = time.time()
    async with async_sessionmaker(pg_engine)() as session, session.begin():
        await bus.publish(event, session=session, delay=0.5)
    await wait_for(lambda: event.event_id in handled, "the relayed event")
    assert handled[event.event_id] >= published + 0.5
