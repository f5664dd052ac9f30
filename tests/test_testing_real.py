"""EventBusTestKit(bus, with_real=True): the kit's assertions against the real broker.

The same tests run in the three modes of the ``mode`` parameter: the kit's
in-memory broker, a real Redis with the bus's in-process worker, and a real
Kafka-protocol broker (Tansu) with the bus's in-process bridge.  Then the kit on
Redis with the handlers in a real worker process and the events published
through the outbox: ``drain()`` waits for the relay and the worker's queues.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from eventbus import BaseEvent, EventBus, EventBusSettings
from eventbus.backends.base import Backend
from eventbus.kafka.backend import KafkaBackend
from eventbus.outbox.outbox import Outbox
from eventbus.redis.backend import RedisBackend
from eventbus.testing import EventBusTestKit, InjectedFault
from tests.kafka_helpers import FAST, HEARTBEAT_INTERVAL_MS, SESSION_TIMEOUT_MS
from tests.outbox_events import Placed
from tests.outbox_support import count, redis_stack
from tests.redis_support import TEST_REDELIVERY_TIMEOUT

pytest_plugins = ["tests.pg_support", "tests.redis_support", "tests.kafka_support"]

_ids = itertools.count()


class Paid(BaseEvent):
    topic: str = "kit.real.paid"
    order_id: int


class Receipt(BaseEvent):
    topic: str = "kit.real.receipt"
    order_id: int


@dataclass
class Mode:
    """A bus of this test, and whether the kit runs it on its real backend."""

    name: str
    bus: EventBus
    real: bool
    #: The test's topics (unique per test: Kafka groups and topics are shared).
    paid: str
    receipt: str

    def kit(self, **options: object) -> EventBusTestKit:
        return EventBusTestKit(self.bus, with_real=self.real, **options)  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "redis", "kafka"])
async def mode(request: pytest.FixtureRequest) -> AsyncIterator[Mode]:
    """The kit's in-memory broker, or the real Redis or Kafka broker."""
    async for made in make_mode(request):
        yield made


@pytest.fixture(params=["redis", "kafka"])
async def real_mode(request: pytest.FixtureRequest) -> AsyncIterator[Mode]:
    """A real broker only."""
    async for made in make_mode(request):
        yield made


async def make_mode(request: pytest.FixtureRequest) -> AsyncIterator[Mode]:
    n = next(_ids)
    paid, receipt = f"kit.real.{os.getpid()}.{n}.paid", f"kit.real.{os.getpid()}.{n}.receipt"
    settings = EventBusSettings(service=f"kit-real-{n}", shutdown_timeout=3)
    if request.param == "memory":
        bus = EventBus(settings=settings, retry_policy=FAST)
    elif request.param == "redis":
        backend: Backend = RedisBackend(
            request.getfixturevalue("redis_url"),
            namespace=request.getfixturevalue("namespace"),
            redelivery_timeout=TEST_REDELIVERY_TIMEOUT,
        )
        bus = EventBus(backend=backend, settings=settings, retry_policy=FAST)
    else:
        _, group = request.getfixturevalue("kafka_names")
        backend = KafkaBackend(
            request.getfixturevalue("kafka_bootstrap"),
            group_id=group,
            idempotence=False,  # Tansu has no idempotent producer
            session_timeout_ms=SESSION_TIMEOUT_MS,
            heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS,
        )
        bus = EventBus(backend=backend, settings=settings, retry_policy=FAST)
    try:
        yield Mode(request.param, bus, request.param != "memory", paid, receipt)
    finally:
        await bus.stop()


async def register_shop(mode: Mode) -> list[int]:
    """``pay`` handles Paid and publishes a Receipt; ``file_receipt`` records it."""
    bus, receipts = mode.bus, []

    async def pay(event: Paid) -> None:
        await bus.publish(Receipt(topic=mode.receipt, order_id=event.order_id))

    async def file_receipt(event: Receipt) -> None:
        receipts.append(event.order_id)

    await bus.registry.register(mode.paid, pay, name=f"{mode.paid}:pay")
    await bus.registry.register(mode.receipt, file_receipt, name=f"{mode.receipt}:file")
    return receipts


# -- written once, run in every mode ------------------------------------------------------


async def test_published_events_and_handler_calls(mode: Mode) -> None:
    receipts = await register_shop(mode)
    async with mode.kit() as kit:
        await mode.bus.start(consume=True)
        for order_id in range(3):
            await mode.bus.publish(Paid(topic=mode.paid, order_id=order_id))
        await kit.adrain()
        # Everything is done once drain returns: no waiting loop in the test.
        assert sorted(receipts) == [0, 1, 2]
        assert sorted(e.order_id for e in kit.published(Paid)) == [0, 1, 2]
        kit.assert_published(Receipt, order_id=2)  # published by a handler
        kit.assert_not_published(Receipt, order_id=3)
        pay = kit.handler(f"{mode.paid}:pay")
        assert [c.ok for c in pay.calls] == [True] * 3
        assert pay.mock.call_count == 3
        assert sorted(c.event.order_id for c in pay.calls) == [0, 1, 2]  # type: ignore[attr-defined]
    assert not mode.bus.started


async def test_injected_failures_are_retried(mode: Mode) -> None:
    receipts = await register_shop(mode)
    async with mode.kit() as kit:
        kit.fail(handler=f"{mode.paid}:pay", times=1, error=ConnectionError)
        await mode.bus.start(consume=True)
        await mode.bus.publish(Paid(topic=mode.paid, order_id=1))
        await kit.adrain()
        calls = kit.handler(f"{mode.paid}:pay").calls
        assert [(c.attempt, c.ok, c.injected) for c in calls] == [
            (1, False, True),
            (2, True, False),
        ]
        assert isinstance(calls[0].error, ConnectionError)
        assert receipts == [1]


async def test_a_handler_that_fails_for_good_fails_the_drain(mode: Mode) -> None:
    await register_shop(mode)
    attempts = mode.bus.retry_policy.max_retries + 1
    async with mode.kit() as kit:
        kit.fail(handler=f"{mode.paid}:pay", times=attempts)
        await mode.bus.start(consume=True)
        await mode.bus.publish(Paid(topic=mode.paid, order_id=1))
        with pytest.raises(InjectedFault):
            await kit.adrain()
        (failure,) = kit.failures
        assert failure.handler == f"{mode.paid}:pay" and failure.attempts == attempts
        kit.assert_not_published(Receipt)


# -- real mode only -------------------------------------------------------------------------


async def test_faults_only_the_in_memory_broker_can_make_are_refused(real_mode: Mode) -> None:
    mode = real_mode
    await register_shop(mode)
    async with mode.kit() as kit:
        for inject in (kit.deliver_twice, kit.crash_after):
            with pytest.raises(RuntimeError, match="in-memory broker"):
                inject()
        with pytest.raises(RuntimeError, match="in-memory broker"):
            kit.delay(seconds=0.1)


async def test_leaving_restores_the_real_broker(real_mode: Mode) -> None:
    mode = real_mode
    receipts = await register_shop(mode)
    broker = mode.bus.broker

    def kits() -> int:
        return sum(type(m).__module__ == "eventbus.testing" for m in broker.middleware)

    assert kits() == 0
    async with mode.kit() as kit:
        assert kits() == 2
        await mode.bus.start(consume=True)
        await mode.bus.publish(Paid(topic=mode.paid, order_id=1))
        await kit.adrain()
    assert kits() == 0  # the kit's two middlewares are gone
    assert "publish" not in vars(mode.bus.backend)  # the recording wrapper too
    await mode.bus.start(consume=True)  # the bus works on its own afterwards
    await mode.bus.publish(Paid(topic=mode.paid, order_id=2))
    await mode.bus.backend.drain(30)
    assert sorted(receipts) == [1, 2]
    assert len(kit.published(Paid)) == 1  # recorded while the kit was active only


# -- a real worker process and the outbox ---------------------------------------------------


async def test_real_redis_worker_process_and_the_outbox(
    pg_url: str,
    pg_engine: AsyncEngine,
    redis_url: str,
    namespace: str,
    workers: object,
    tmp_path: Path,
) -> None:
    topic = f"kit.real.outbox.{os.getpid()}.{next(_ids)}"
    stack = redis_stack(pg_url, redis_url, namespace, tmp_path, topic, workers)  # type: ignore[arg-type]
    try:
        await stack.start_worker()  # tests.outbox_handlers in a dramatiq process
        bus = stack.make_bus()  # publishes only: the handlers run in the worker
        Outbox(bus, pg_engine, listen=False, poll_interval=60.0)  # only drain wakes it
        async with EventBusTestKit(bus, with_real=True) as kit:
            await bus.start()
            async with pg_engine.begin() as conn:
                events = [Placed(topic=topic, key="k", seq=i) for i in range(5)]
                await bus.publish_many(events, session=conn)
            assert [e.seq for e in kit.published(Placed)] == list(range(5))  # at commit
            await kit.adrain(timeout=60)
            # The relay sent the rows and the worker process handled every event.
            sql = "SELECT count(*) FROM outbox_test_deliveries WHERE handler = :h"
            assert await count(pg_engine, sql, h="record") == 5
            assert await count(pg_engine, "SELECT count(*) FROM eventbus_outbox") == 0
            assert len(kit.published(Placed)) == 5  # the relay's publish not recorded twice
    finally:
        stack.stop_all()


async def test_real_mode_drain_names_an_outbox_topic_nobody_subscribes(
    pg_engine: AsyncEngine, redis_url: str, namespace: str
) -> None:
    backend = RedisBackend(
        redis_url, namespace=namespace, redelivery_timeout=TEST_REDELIVERY_TIMEOUT
    )
    bus = EventBus(backend=backend, settings=EventBusSettings(service="kit-real-nobody"))
    Outbox(bus, pg_engine)
    topic = f"kit.real.nobody.{os.getpid()}.{next(_ids)}"
    try:
        async with EventBusTestKit(bus, with_real=True, raise_errors=False, drain_timeout=1) as kit:
            await bus.start()
            async with pg_engine.begin() as conn:
                await bus.publish(Paid(topic=topic, order_id=1), session=conn)
            kit.assert_published(Paid, order_id=1)  # committed
            with pytest.raises(TimeoutError, match=f"no subscription handles {topic}"):
                await kit.adrain()
    finally:
        await bus.stop()
    # The real relay keeps the row for a subscription to come: nothing is lost.
    assert await count(pg_engine, "SELECT count(*) FROM eventbus_outbox") == 1
