"""The embedded backend: handlers as dramatiq actors in the app's process."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable

import pytest

from eventbus import (
    BaseEvent,
    EventBus,
    EventBusSettings,
    HealthStatus,
    PublishError,
    Retry,
    RetryPolicy,
    on_event,
)
from eventbus.exceptions import UnroutedError
from eventbus.metrics import InMemoryMetricsCollector

MakeBus = Callable[..., EventBus]


class Ping(BaseEvent):
    n: int = 0


async def wait_for(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll ``condition`` on the event loop until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.005)


async def test_failing_handler_retries_alone_while_sibling_ran_once(
    make_bus: MakeBus, topic: str
) -> None:
    calls = {"ok": 0, "bad": 0}

    async def ok(event: BaseEvent) -> None:
        calls["ok"] += 1

    async def bad(event: BaseEvent) -> None:
        calls["bad"] += 1
        raise RuntimeError("boom")

    bus = make_bus(retry_policy=RetryPolicy(max_retries=3, delay=0.01))
    await bus.registry.register(topic, ok)
    await bus.registry.register(topic, bad)
    await bus.start()

    await bus.publish(Ping(topic=topic))
    await bus.drain(timeout=5)

    assert calls == {"ok": 1, "bad": 4}  # 1 attempt + 3 retries; the sibling never again
    [failed] = bus.dlq.peek(limit=10)
    assert failed.attempts == 4
    assert failed.handler.endswith("bad")
    assert failed.error == "boom"
    assert failed.error_type == "RuntimeError"
    assert 'raise RuntimeError("boom")' in failed.traceback
    assert failed.event is not None and failed.event.topic == topic
    assert bus.dlq.size() == 1


async def test_retry_spacing_grows(make_bus: MakeBus, topic: str) -> None:
    times: list[float] = []

    async def flaky(event: BaseEvent) -> None:
        times.append(time.monotonic())
        raise RuntimeError("again")

    bus = make_bus(retry_policy=RetryPolicy(max_retries=3, delay=0.05, backoff_factor=2.0))
    await bus.registry.register(topic, flaky)
    await bus.start()
    await bus.publish(Ping(topic=topic))
    await bus.drain(timeout=5)

    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 3
    for gap, expected in zip(gaps, [0.05, 0.10, 0.20], strict=True):
        assert expected * 0.9 <= gap < expected + 0.1
    assert gaps[0] < gaps[1] < gaps[2]


async def test_max_delay_caps_the_backoff() -> None:
    policy = RetryPolicy(max_retries=10, delay=1.0, backoff_factor=3.0, max_delay=5.0)
    assert [policy.get_delay(k) for k in range(4)] == [1.0, 3.0, 5.0, 5.0]


async def test_default_policy_is_the_seeds(make_bus: MakeBus) -> None:
    bus = EventBus()
    assert (bus.retry_policy.max_retries, bus.retry_policy.delay) == (3, 1.0)
    assert (bus.retry_policy.backoff_factor, bus.retry_policy.max_delay) == (2.0, 60.0)


async def test_per_handler_max_retries_and_non_retryable(make_bus: MakeBus, topic: str) -> None:
    calls = {"once": 0, "picky": 0}

    async def once(event: BaseEvent) -> None:
        calls["once"] += 1
        raise RuntimeError("no retries for me")

    async def picky(event: BaseEvent) -> None:
        calls["picky"] += 1
        raise KeyError("not retryable")

    bus = make_bus(retry_policy=RetryPolicy(max_retries=3, delay=0.01))
    await bus.registry.register(topic, once, max_retries=0)
    await bus.registry.register(
        topic, picky, retry=RetryPolicy(max_retries=5, delay=0.01, retryable_exceptions=(OSError,))
    )
    await bus.start()
    await bus.publish(Ping(topic=topic))
    await bus.drain(timeout=5)

    assert calls == {"once": 1, "picky": 1}
    assert sorted(f.error_type for f in bus.dlq.peek(10)) == ["KeyError", "RuntimeError"]


async def test_handler_can_ask_for_a_specific_retry_delay(make_bus: MakeBus, topic: str) -> None:
    times: list[float] = []

    async def later(event: BaseEvent) -> None:
        times.append(time.monotonic())
        if len(times) == 1:
            raise Retry(delay=0.15)

    bus = make_bus(retry_policy=RetryPolicy(max_retries=3, delay=0.001))
    await bus.registry.register(topic, later)
    await bus.start()
    await bus.publish(Ping(topic=topic))
    await bus.drain(timeout=5)

    assert len(times) == 2
    assert times[1] - times[0] >= 0.14
    assert bus.dlq.size() == 0


async def test_typed_handler_receives_its_class(make_bus: MakeBus) -> None:
    class OrderPlaced(BaseEvent):
        topic: str = "order.placed.typed"
        order_id: int

    got: list[BaseEvent] = []

    async def handle(event: OrderPlaced) -> None:
        got.append(event)

    bus = make_bus()
    await bus.registry.register(OrderPlaced, handle)
    await bus.start()
    await bus.publish(OrderPlaced(order_id=42))
    await bus.drain(timeout=5)

    assert [type(e) for e in got] == [OrderPlaced]
    assert got[0].order_id == 42  # type: ignore[attr-defined]


async def test_async_handlers_run_on_the_application_loop(make_bus: MakeBus, topic: str) -> None:
    loops: list[asyncio.AbstractEventLoop] = []

    async def handle(event: BaseEvent) -> None:
        loops.append(asyncio.get_running_loop())

    bus = make_bus()
    await bus.registry.register(topic, handle)
    await bus.start()
    await bus.publish(Ping(topic=topic))
    await bus.drain(timeout=5)

    assert loops == [asyncio.get_running_loop()]


async def test_sync_handlers_run_in_a_thread_pool(make_bus: MakeBus, topic: str) -> None:
    threads: list[str] = []

    def handle(event: BaseEvent) -> None:
        time.sleep(0.05)
        threads.append(threading.current_thread().name)

    bus = make_bus()
    await bus.registry.register(topic, handle)
    await bus.start()
    started = time.monotonic()
    await bus.publish_many([Ping(topic=topic, n=i) for i in range(4)])
    await bus.drain(timeout=5)

    assert len(threads) == 4
    assert all(name.startswith("eventbus-handler") for name in threads)
    assert time.monotonic() - started < 0.19  # ran in parallel, not 4 x 50 ms


async def test_publish_rejects_non_events(make_bus: MakeBus) -> None:
    bus = make_bus()
    await bus.start()
    with pytest.raises(TypeError, match="BaseEvent"):
        await bus.publish({"topic": "x"})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await bus.publish_many([Ping(topic="a.b"), "not an event"])  # type: ignore[list-item]


async def test_publish_many_refuses_all_when_one_is_bad(make_bus: MakeBus, topic: str) -> None:
    seen: list[int] = []

    async def handle(event: Ping) -> None:
        seen.append(event.n)

    bus = make_bus()
    await bus.registry.register(topic, handle)
    await bus.start()
    with pytest.raises(TypeError):
        await bus.publish_many([Ping(topic=topic, n=1), object()])  # type: ignore[list-item]
    await bus.drain(timeout=5)
    assert seen == []


async def test_publish_before_start_is_a_clear_error(make_bus: MakeBus, topic: str) -> None:
    bus = make_bus()
    with pytest.raises(PublishError, match="not started"):
        await bus.publish(Ping(topic=topic))


async def test_unrouted_publish_is_counted_and_warned_once_per_topic_per_interval(
    make_bus: MakeBus, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = InMemoryMetricsCollector()
    bus = make_bus(metrics=metrics)
    await bus.start()
    with caplog.at_level("WARNING", logger="eventbus.bus"):
        for _ in range(3):
            await bus.publish(Ping(topic=topic))
        await bus.publish(Ping(topic=topic + ".other"))
    assert metrics.snapshot()["unrouted"] == {topic: 3, topic + ".other": 1}
    assert metrics.snapshot()["published"] == {topic: 3, topic + ".other": 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2  # one per topic, not one per event
    assert f"No subscription handles topic {topic!r}" in warnings[0]


async def test_unrouted_error_mode_refuses_the_publish(make_bus: MakeBus, topic: str) -> None:
    metrics = InMemoryMetricsCollector()
    bus = make_bus(metrics=metrics, settings=EventBusSettings(unrouted="error"))
    seen: list[int] = []

    async def handler(event: Ping) -> None:
        seen.append(event.n)

    await bus.registry.register(topic, handler)
    await bus.start()
    with pytest.raises(UnroutedError, match=topic + ".nobody") as caught:
        await bus.publish_many([Ping(topic=topic, n=1), Ping(topic=topic + ".nobody", n=2)])
    assert caught.value.topics == [topic + ".nobody"]
    await bus.drain(timeout=2)
    assert seen == []  # all or none: the routed event was not published either
    assert metrics.snapshot()["unrouted"] == {topic + ".nobody": 1}
    await bus.publish(Ping(topic=topic, n=3))
    await bus.drain(timeout=2)
    assert seen == [3]


async def test_event_without_topic_is_refused_naming_its_class(make_bus: MakeBus) -> None:
    class Untitled(BaseEvent):
        n: int = 0

    class Titled(Untitled):  # an intermediate base without a topic stays legal
        topic: str = "titled"

    bus = make_bus()
    await bus.start()
    with pytest.raises(PublishError, match="Untitled has no topic"):
        await bus.publish(Untitled())
    await bus.publish(Titled())
    await bus.publish(Untitled(topic="given"))


async def test_two_buses_both_dispatch_to_a_decorated_handler(
    make_bus: MakeBus, topic: str
) -> None:
    seen: list[str] = []

    @on_event(topic)
    async def handle(event: BaseEvent) -> None:
        seen.append(event.metadata["bus"])

    first, second = make_bus(), make_bus()
    await first.start()
    await second.start()
    await first.publish(Ping(topic=topic, metadata={"bus": "first"}))
    await second.publish(Ping(topic=topic, metadata={"bus": "second"}))
    await first.drain(timeout=5)
    await second.drain(timeout=5)

    assert sorted(seen) == ["first", "second"]


async def test_runtime_register_subscribe_and_unregister(make_bus: MakeBus, topic: str) -> None:
    seen: list[int] = []

    async def my_handler(event: Ping) -> None:
        seen.append(event.n)

    bus = make_bus()
    await bus.start()
    await bus.registry.register(topic, my_handler)
    await bus.subscribe(topic)
    await bus.publish(Ping(topic=topic, n=1))
    await bus.drain(timeout=5)

    assert await bus.registry.unregister(topic, my_handler)
    await bus.publish(Ping(topic=topic, n=2))
    await bus.drain(timeout=5)

    assert seen == [1]
    assert bus.registry.get_handlers(topic) == []


async def test_unregister_on_one_bus_leaves_the_other(make_bus: MakeBus, topic: str) -> None:
    seen: list[str] = []

    @on_event(topic)
    def handle(event: BaseEvent) -> None:
        seen.append(event.metadata["bus"])

    first, second = make_bus(), make_bus()
    assert await first.registry.unregister(topic, handle)
    await first.start()
    await second.start()
    await first.publish(Ping(topic=topic, metadata={"bus": "first"}))
    await second.publish(Ping(topic=topic, metadata={"bus": "second"}))
    await first.drain(timeout=5)
    await second.drain(timeout=5)
    assert seen == ["second"]


async def test_drain_times_out_with_a_count(make_bus: MakeBus, topic: str) -> None:
    release = asyncio.Event()

    async def blocked(event: BaseEvent) -> None:
        await release.wait()

    bus = make_bus()
    await bus.registry.register(topic, blocked)
    await bus.start()
    await bus.publish(Ping(topic=topic))
    with pytest.raises(TimeoutError, match="1 event deliveries still pending"):
        await bus.drain(timeout=0.05)
    release.set()
    await bus.drain(timeout=5)


async def test_stop_finishes_in_flight_work_and_leaves_no_thread(topic: str) -> None:
    before = set(threading.enumerate())
    started: list[str] = []
    done: list[str] = []

    async def slow_async(event: BaseEvent) -> None:
        started.append("async")
        await asyncio.sleep(0.1)
        done.append("async")

    def slow_sync(event: BaseEvent) -> None:
        started.append("sync")
        time.sleep(0.1)
        done.append("sync")

    bus = EventBus(settings=EventBusSettings(shutdown_timeout=5))
    await bus.registry.register(topic, slow_async)
    await bus.registry.register(topic, slow_sync)
    await bus.start()
    await bus.publish(Ping(topic=topic))
    await wait_for(lambda: len(started) == 2, "both handlers to be in flight")
    assert done == []  # otherwise stop() has no in-flight work to finish
    await bus.stop()

    assert sorted(done) == ["async", "sync"]
    assert set(threading.enumerate()) - before == set()


async def test_stop_is_bounded_and_dead_letters_what_it_cancels(topic: str) -> None:
    started: list[str] = []

    async def forever(event: BaseEvent) -> None:
        started.append("forever")
        await asyncio.sleep(60)

    metrics = InMemoryMetricsCollector()
    bus = EventBus(
        settings=EventBusSettings(shutdown_timeout=0.2),
        retry_policy=RetryPolicy(max_retries=3, delay=30),
        metrics=metrics,
    )

    async def fails(event: BaseEvent) -> None:
        raise RuntimeError("retried later")

    await bus.registry.register(topic, forever)
    await bus.registry.register(topic, fails)
    await bus.start()
    await bus.publish(Ping(topic=topic))
    await wait_for(
        lambda: started == ["forever"] and metrics.retries[topic] == 1,
        "one handler running and the other's retry scheduled",
    )
    stopping = time.monotonic()
    await bus.stop()

    assert time.monotonic() - stopping < 1.5
    reasons = sorted(f.error_type for f in bus.dlq.peek(10))
    assert reasons == ["ShutdownError", "ShutdownError"]  # the cancelled one and the pending retry


async def test_health_reports_a_dead_dispatcher(make_bus: MakeBus) -> None:
    bus = make_bus()
    [before] = await bus.health.check()
    assert before.status is HealthStatus.UNHEALTHY and before.detail == "not started"

    await bus.start()
    [ok] = await bus.health.check()
    assert (ok.backend, ok.status.value) == ("sync", "healthy")

    dispatcher = bus.backend.dispatcher  # type: ignore[attr-defined]
    dispatcher.task.cancel()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    [dead] = await bus.health.check()
    assert dead.status is HealthStatus.UNHEALTHY
    assert "dispatcher is dead" in dead.detail


async def test_handler_publishing_keeps_correlation_and_records_cause(
    make_bus: MakeBus, topic: str
) -> None:
    follow_up = topic + ".next"
    seen: list[BaseEvent] = []

    async def first(event: BaseEvent) -> None:
        await bus.publish(Ping(topic=follow_up))

    async def second(event: BaseEvent) -> None:
        seen.append(event)

    bus = make_bus()
    await bus.registry.register(topic, first)
    await bus.registry.register(follow_up, second)
    await bus.start()
    origin = Ping(topic=topic, metadata={"correlation_id": "req-123"})
    await bus.publish(origin)
    await bus.drain(timeout=5)

    [child] = seen
    assert child.metadata["correlation_id"] == "req-123"
    assert child.metadata["causation_id"] == origin.event_id


async def test_undecodable_message_is_dead_lettered_not_retried(
    make_bus: MakeBus, topic: str
) -> None:
    from dramatiq import Message

    calls: list[BaseEvent] = []

    async def handle(event: BaseEvent) -> None:
        calls.append(event)

    bus = make_bus()
    spec = await bus.registry.register(topic, handle)
    await bus.start()
    await bus.publish(Ping(topic=topic))
    await bus.drain(timeout=5)
    bus.broker.enqueue(
        Message(
            queue_name="eventbus", actor_name=spec.name, args=({"nope": 1},), kwargs={}, options={}
        )
    )
    await bus.drain(timeout=5)

    assert len(calls) == 1
    [failed] = bus.dlq.peek()
    assert failed.error_type == "EventDecodeError"
    assert failed.attempts == 1
    assert failed.event is None
    assert failed.envelope == {"nope": 1}


async def test_oversized_event_is_refused_with_nothing_enqueued(
    make_bus: MakeBus, topic: str
) -> None:
    from eventbus import EventTooLargeError

    seen: list[BaseEvent] = []

    async def handle(event: BaseEvent) -> None:
        seen.append(event)

    bus = make_bus(settings=EventBusSettings(max_event_bytes=4096, shutdown_timeout=1))
    await bus.registry.register(topic, handle)
    await bus.start()
    with pytest.raises(EventTooLargeError, match="EVENTBUS_MAX_EVENT_BYTES=4096"):
        await bus.publish(Ping(topic=topic, metadata={"blob": "x" * 5000}))
    with pytest.raises(EventTooLargeError):
        await bus.publish_many(
            [Ping(topic=topic), Ping(topic=topic, metadata={"blob": "x" * 5000})]
        )
    await bus.publish(Ping(topic=topic, metadata={"blob": "x" * 3000}))
    await bus.drain(timeout=5)
    assert len(seen) == 1


async def test_invalid_topic_is_refused_at_publish(make_bus: MakeBus) -> None:
    bus = make_bus()
    await bus.start()
    with pytest.raises(PublishError, match="cannot publish to topic 'has space'"):
        await bus.publish(Ping(topic="has space"))
