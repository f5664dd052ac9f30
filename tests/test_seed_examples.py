"""The seed README's examples for metrics, tracing, retries and dead letters, as written.

Each block below is the seed's code with ``fastapi_eventbus`` replaced by
``eventbus`` (and a unique topic), followed by what a user expects to see.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from eventbus import BaseEvent

# The Redis example needs the fixtures redis_url (starts redis-server when none answers)
# and namespace (deletes this test's keys).
pytest_plugins = ["tests.redis_support"]

# The 0.1.1 examples import a few names that moved (EventSpan, LoggingTracer, ...):
# they keep working, with a DeprecationWarning that tests/test_public_api.py checks.
pytestmark = pytest.mark.filterwarnings("ignore:eventbus.* moved:DeprecationWarning")


class UserCreated(BaseEvent):
    topic: str = "user.created"
    user_id: int = 1
    username: str = "alice"


async def test_retry_policy_and_dlq_example(topic: str, capsys: pytest.CaptureFixture[str]) -> None:
    from eventbus import EventBus, RetryPolicy
    from eventbus.config import EventBusSettings

    policy = RetryPolicy(
        max_retries=5,
        delay=0.5,
        backoff_factor=2.0,
        max_delay=30.0,
    )

    bus = EventBus(
        retry_policy=policy,
        settings=EventBusSettings(dlq_enabled=True),
    )
    # -- the test's part: a handler that always fails, quick retries
    bus = EventBus(
        retry_policy=RetryPolicy(max_retries=5, delay=0.001, max_delay=0.01),
        settings=EventBusSettings(dlq_enabled=True),
    )

    async def always_fails(event: BaseEvent) -> None:
        raise ValueError("payment service down")

    await bus.registry.register(topic, always_fails)
    await bus.start()
    await bus.publish(UserCreated(topic=topic))
    await bus.drain(timeout=5)

    # 查看 DLQ 中的失败事件
    failed = bus.dlq.peek(limit=20)
    for f in failed:
        print(f"事件 {f.event.event_id} 失败 {f.attempts} 次: {f.error}")  # type: ignore[union-attr]

    await bus.stop()
    out = capsys.readouterr().out
    assert "失败 6 次: payment service down" in out


async def test_in_memory_metrics_example(topic: str) -> None:
    from eventbus import EventBus, InMemoryMetricsCollector

    metrics = InMemoryMetricsCollector()
    bus = EventBus(metrics=metrics)

    async def handle(event: BaseEvent) -> None:
        pass

    await bus.registry.register(topic, handle)
    await bus.start()
    for _ in range(10):
        await bus.publish(UserCreated(topic=topic))
    await bus.drain(timeout=5)
    await bus.stop()

    snapshot = metrics.snapshot()
    assert snapshot["published"] == {topic: 10}
    assert snapshot["dispatched"] == {topic: 10}
    assert len(metrics.publish_durations[topic]) == 10


async def test_metrics_count_each_retry_and_dead_letter_once(topic: str) -> None:
    from eventbus import EventBus, InMemoryMetricsCollector, RetryPolicy

    metrics = InMemoryMetricsCollector()
    bus = EventBus(metrics=metrics, retry_policy=RetryPolicy(max_retries=2, delay=0.001))

    async def bad(event: BaseEvent) -> None:
        raise RuntimeError("x")

    async def good(event: BaseEvent) -> None:
        pass

    await bus.registry.register(topic, bad)
    await bus.registry.register(topic, good)
    await bus.start()
    await bus.publish(UserCreated(topic=topic))
    await bus.drain(timeout=5)
    await bus.stop()

    snapshot = metrics.snapshot()
    assert snapshot["published"] == {topic: 1}
    assert snapshot["dispatched"] == {topic: 1}
    assert snapshot["dispatch_errors"] == {topic: 3}
    assert snapshot["retries"] == {topic: 2}
    assert snapshot["dlq_count"] == {topic: 1}


async def test_custom_prometheus_collector_example(topic: str) -> None:
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from eventbus import EventBus

    registry = CollectorRegistry()  # the seed used the global registry; a test cannot

    class PrometheusCollector:
        def __init__(self) -> None:
            self.published = Counter(
                "eventbus_published_total", "Events published", ["topic"], registry=registry
            )
            self.dispatched = Counter(
                "eventbus_dispatched_total", "Events dispatched", ["topic"], registry=registry
            )
            self.errors = Counter(
                "eventbus_errors_total", "Dispatch errors", ["topic"], registry=registry
            )
            self.retries = Counter(
                "eventbus_retries_total", "Retries", ["topic"], registry=registry
            )
            self.dlq = Counter("eventbus_dlq_total", "DLQ events", ["topic"], registry=registry)
            self.pub_duration = Histogram(
                "eventbus_publish_seconds", "Publish duration", ["topic"], registry=registry
            )
            self.disp_duration = Histogram(
                "eventbus_dispatch_seconds", "Dispatch duration", ["topic"], registry=registry
            )

        def inc_published(self, topic: str) -> None:
            self.published.labels(topic=topic).inc()

        def inc_dispatched(self, topic: str) -> None:
            self.dispatched.labels(topic=topic).inc()

        def inc_dispatch_error(self, topic: str) -> None:
            self.errors.labels(topic=topic).inc()

        def inc_retry(self, topic: str, attempt: int) -> None:
            self.retries.labels(topic=topic).inc()

        def inc_dlq(self, topic: str) -> None:
            self.dlq.labels(topic=topic).inc()

        def observe_publish_duration(self, topic: str, duration: float) -> None:
            self.pub_duration.labels(topic=topic).observe(duration)

        def observe_dispatch_duration(self, topic: str, duration: float) -> None:
            self.disp_duration.labels(topic=topic).observe(duration)

    bus = EventBus(metrics=PrometheusCollector())

    async def handle(event: BaseEvent) -> None:
        pass

    await bus.registry.register(topic, handle)
    await bus.start()
    await bus.publish_many([UserCreated(topic=topic) for _ in range(3)])
    await bus.drain(timeout=5)
    await bus.stop()

    def value(name: str) -> float | None:
        return registry.get_sample_value(name, {"topic": topic})

    assert value("eventbus_published_total") == 3
    assert value("eventbus_dispatched_total") == 3
    assert value("eventbus_dispatch_seconds_count") == 3


async def test_logging_tracer_example(topic: str, caplog: pytest.LogCaptureFixture) -> None:
    from eventbus import EventBus, LoggingTracer

    tracer = LoggingTracer()
    bus = EventBus(tracer=tracer)

    async def handle(event: BaseEvent) -> None:
        pass

    async def broken(event: BaseEvent) -> None:
        raise RuntimeError("kaput")

    await bus.registry.register(topic, handle)
    await bus.registry.register(topic, broken, max_retries=0)
    await bus.start()
    with caplog.at_level(logging.DEBUG, logger="eventbus.tracing"):
        await bus.publish(UserCreated(topic=topic))
        await bus.drain(timeout=5)
    await bus.stop()

    # 查看所有 span
    spans = [span.to_dict() for span in tracer.spans]
    publish = [s for s in spans if s["operation"] == "publish"]
    dispatch = [s for s in spans if s["operation"] == "dispatch"]
    assert len(publish) == 1 and len(dispatch) == 2
    assert {s["trace_id"] for s in spans} == {publish[0]["trace_id"]}
    assert all(s["parent_span_id"] == publish[0]["span_id"] for s in dispatch)
    failed = next(s for s in dispatch if s["status"] == "error")
    assert failed["error_message"] == "kaput"
    assert any(r.message.startswith("SPAN START publish") for r in caplog.records)
    assert any("status=error" in r.message for r in caplog.records)


async def test_logging_tracer_trace_id_is_the_correlation_id(topic: str) -> None:
    from eventbus import EventBus, LoggingTracer
    from eventbus.context import correlation_id_var

    tracer = LoggingTracer()
    bus = EventBus(tracer=tracer)

    async def handle(event: BaseEvent) -> None:
        pass

    await bus.registry.register(topic, handle)
    await bus.start()
    token = correlation_id_var.set("request-7")
    try:
        await bus.publish(UserCreated(topic=topic))
    finally:
        correlation_id_var.reset(token)
    await bus.drain(timeout=5)
    await bus.stop()
    assert [s.trace_id for s in tracer.spans] == ["request-7", "request-7"]


async def test_otel_tracer_example(topic: str) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from eventbus import EventBus, EventSpan

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    otel_tracer = provider.get_tracer("fastapi-eventbus")  # seed: trace.get_tracer(...)

    class OTelTracer:
        def start_span(self, operation, topic="", event_id="", parent_span=None):  # type: ignore[no-untyped-def]
            otel_span = otel_tracer.start_span(
                operation,
                attributes={"topic": topic, "event_id": event_id},
            )
            span = EventSpan(operation=operation, topic=topic, event_id=event_id)
            span.attributes["otel_span"] = str(id(otel_span))
            self._otel_spans = getattr(self, "_otel_spans", {})
            self._otel_spans[span.span_id] = otel_span
            return span

        def finish_span(self, span):  # type: ignore[no-untyped-def]
            otel_span = getattr(self, "_otel_spans", {}).pop(span.span_id, None)
            if otel_span:
                if span.status.value == "error":
                    otel_span.set_status(trace.StatusCode.ERROR, span.error_message)
                otel_span.end()

    bus = EventBus(tracer=OTelTracer())

    async def broken(event: BaseEvent) -> None:
        raise RuntimeError("nope")

    await bus.registry.register(topic, broken, max_retries=0)
    await bus.start()
    await bus.publish(UserCreated(topic=topic))
    await bus.drain(timeout=5)
    await bus.stop()

    finished: Any = exporter.get_finished_spans()
    assert [s.name for s in finished] == ["publish", "dispatch"]
    assert finished[1].status.status_code is trace.StatusCode.ERROR
    assert finished[1].attributes["topic"] == topic


async def test_decorator_and_sync_handler_examples(topic: str) -> None:
    from eventbus import EventBus, on_event

    seen: list[str] = []

    @on_event(topic)
    async def handle_order(event: BaseEvent) -> None:
        seen.append(f"订单创建: {event.event_id}")

    # 同步处理器也支持(会自动在线程池中执行)
    @on_event(topic)
    def sync_handler(event: BaseEvent) -> None:
        seen.append("同步处理")

    bus = EventBus()
    await bus.start()
    event = UserCreated(topic=topic)
    await bus.publish(event)
    await bus.drain(timeout=5)
    await bus.stop()
    assert sorted(seen) == sorted([f"订单创建: {event.event_id}", "同步处理"])


async def test_get_current_span_inside_a_handler(topic: str) -> None:
    from eventbus import EventBus, LoggingTracer, get_current_span

    seen: list[str] = []
    bus = EventBus(tracer=LoggingTracer())

    async def handle(event: BaseEvent) -> None:
        span = get_current_span()
        assert span is not None
        seen.append(span.operation)

    await bus.registry.register(topic, handle)
    await bus.start()
    await bus.publish(UserCreated(topic=topic))
    await bus.drain(timeout=5)
    await bus.stop()
    assert seen == ["dispatch"]


async def test_redis_backend_example_publishes_to_a_real_redis(
    topic: str, redis_url: str, namespace: str
) -> None:
    from eventbus import EventBus, EventBusSettings
    from eventbus.redis.backend import RedisBackend

    # the seed: RedisBackend(url="redis://localhost:6379/0"); here the test server and a
    # namespace of this test only.  The seed ran handlers in the publishing process:
    # on Redis that is a single-process deployment, EVENTBUS_CONSUME=true.
    backend = RedisBackend(url=redis_url, namespace=namespace)
    bus = EventBus(backend=backend, settings=EventBusSettings(consume=True))
    seen: list[str] = []

    async def handle(event: BaseEvent) -> None:
        seen.append(event.event_id)

    await bus.registry.register(topic, handle)
    await bus.start()
    try:
        event = UserCreated(topic=topic)
        await bus.publish(event)
        await bus.drain(timeout=10)
        assert seen == [event.event_id]
    finally:
        await bus.stop()
        backend.broker.close()  # type: ignore[union-attr]


def test_kafka_backend_example_accepts_the_seeds_arguments() -> None:
    from eventbus import ConfigurationError, EventBus
    from eventbus.kafka.backend import KafkaBackend

    backend = KafkaBackend(
        bootstrap_servers="localhost:9092",
        group_id="my-service",
        auto_offset_reset="earliest",
        session_timeout_ms=30000,
        enable_auto_commit=False,  # 推荐:手动提交 offset
    )
    bus = EventBus(backend=backend)
    assert bus.backend is backend
    with pytest.raises(ConfigurationError, match="auto"):
        KafkaBackend(bootstrap_servers="localhost:9092", enable_auto_commit=True)
