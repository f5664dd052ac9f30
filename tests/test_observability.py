"""Prometheus metrics, OpenTelemetry traces and correlation ids in logs (embedded backend)."""

from __future__ import annotations

import logging

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from eventbus import (
    BaseEvent,
    EventBus,
    EventBusMiddleware,
    EventBusSettings,
    RetryPolicy,
    create_lifespan,
)
from eventbus.context import CorrelationIdFilter
from eventbus.otel import OpenTelemetryTracer
from eventbus.prometheus import PrometheusMetricsCollector, metrics_router


class Ordered(BaseEvent):
    item: str = "book"


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = client.get("/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_route_shows_exact_counts_after_retry_and_dead_letter(topic: str) -> None:
    registry = CollectorRegistry()
    bus = EventBus(
        metrics=PrometheusMetricsCollector(registry=registry),
        retry_policy=RetryPolicy(max_retries=1, delay=0.001),
        settings=EventBusSettings(shutdown_timeout=1),
    )
    attempts = {"flaky": 0}

    async def flaky(event: BaseEvent) -> None:  # fails once, then succeeds
        attempts["flaky"] += 1
        if attempts["flaky"] == 1:
            raise RuntimeError("transient")

    async def poison(event: BaseEvent) -> None:  # always fails: 1 retry, then dead letter
        raise ValueError("poison")

    async def fine(event: BaseEvent) -> None:
        pass

    app = FastAPI(lifespan=create_lifespan(bus))
    app.include_router(metrics_router(registry))

    with TestClient(app) as client:
        for handler in (flaky, poison, fine):
            client.portal.call(bus.registry.register, topic, handler)  # type: ignore[union-attr]
        client.portal.call(bus.subscribe, topic)  # type: ignore[union-attr]
        client.portal.call(bus.publish, Ordered(topic=topic))  # type: ignore[union-attr]
        client.portal.call(bus.drain, 5)  # type: ignore[union-attr]
        samples = scrape(client)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    flaky_name = bus.registry.get_handlers(topic)[0].name
    poison_name = bus.registry.get_handlers(topic)[1].name
    assert value("eventbus_published_total", topic=topic) == 1
    assert value("eventbus_dispatched_total", topic=topic, handler=flaky_name) == 1
    assert value("eventbus_errors_total", topic=topic, handler=flaky_name) == 1
    assert value("eventbus_errors_total", topic=topic, handler=poison_name) == 2
    assert value("eventbus_retries_total", topic=topic) == 2  # flaky once, poison once
    assert value("eventbus_dlq_total", topic=topic) == 1
    assert value("eventbus_dispatch_seconds_count", topic=topic, handler=poison_name) == 2
    assert value("eventbus_publish_seconds_count", topic=topic) == 1
    assert value("eventbus_in_progress", topic=topic, handler=poison_name) == 0
    assert value("eventbus_dlq_size") == 1
    assert value("eventbus_backlog", queue="embedded") == 0


def test_two_collectors_on_one_registry_share_metrics(topic: str) -> None:
    registry = CollectorRegistry()
    first = PrometheusMetricsCollector(registry=registry)
    second = PrometheusMetricsCollector(registry=registry)
    first.inc_published(topic)
    second.inc_published(topic)
    assert registry.get_sample_value("eventbus_published_total", {"topic": topic}) == 2


def test_one_request_one_trace_producer_and_a_consumer_per_handler(
    topic: str, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    bus = EventBus(
        tracer=OpenTelemetryTracer(tracer_provider=provider),
        retry_policy=RetryPolicy(max_retries=0),
        settings=EventBusSettings(shutdown_timeout=1),
    )
    inner = provider.get_tracer("handler-code")

    async def audit(event: BaseEvent) -> None:
        with inner.start_as_current_span("write audit row"):
            pass

    async def broken(event: BaseEvent) -> None:
        raise RuntimeError("mail server down")

    app = FastAPI(lifespan=create_lifespan(bus))
    app.add_middleware(EventBusMiddleware)

    @app.post("/order")
    async def order() -> None:
        await bus.publish(Ordered(topic=topic))
        await bus.drain(timeout=5)

    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
    with TestClient(app) as client:
        client.portal.call(bus.registry.register, topic, audit)  # type: ignore[union-attr]
        client.portal.call(bus.registry.register, topic, broken)  # type: ignore[union-attr]
        client.portal.call(bus.subscribe, topic)  # type: ignore[union-attr]
        client.post("/order", headers={"X-Correlation-ID": "req-9"})

    finished = exporter.get_finished_spans()
    assert len({s.context.trace_id for s in finished}) == 1
    server = next(s for s in finished if s.kind is SpanKind.SERVER)
    [producer] = [s for s in finished if s.kind is SpanKind.PRODUCER]
    consumers = [s for s in finished if s.kind is SpanKind.CONSUMER]
    assert producer.parent is not None and producer.parent.span_id == server.context.span_id
    assert len(consumers) == 2
    assert all(c.parent and c.parent.span_id == producer.context.span_id for c in consumers)
    assert producer.attributes["messaging.destination.name"] == topic
    assert producer.attributes["eventbus.correlation_id"] == "req-9"
    failed = next(c for c in consumers if c.status.status_code is StatusCode.ERROR)
    assert failed.status.description == "mail server down"
    assert [e.name for e in failed.events] == ["exception"]
    assert failed.attributes["messaging.retry_count"] == 0
    row = next(s for s in finished if s.name == "write audit row")
    ok = next(c for c in consumers if c is not failed)
    assert row.parent is not None and row.parent.span_id == ok.context.span_id


async def test_traceparent_travels_in_the_message_options(
    topic: str, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    import eventbus.keys as keys

    provider, _ = spans
    bus = EventBus(tracer=OpenTelemetryTracer(tracer_provider=provider))

    async def handle(event: BaseEvent) -> None:
        pass

    await bus.registry.register(topic, handle)
    await bus.start()
    seen: list[dict[str, str]] = []
    original = bus.broker.enqueue

    def spy(message, delay=None):  # type: ignore[no-untyped-def]
        seen.append(message.options[keys.TRACE_CONTEXT])
        return original(message, delay=delay)

    bus.broker.enqueue = spy  # type: ignore[method-assign]
    with trace.get_tracer("t", tracer_provider=provider).start_as_current_span("outer"):
        await bus.publish(Ordered(topic=topic))
    await bus.drain(timeout=5)
    await bus.stop()
    [carrier] = seen
    assert carrier["traceparent"].startswith("00-")


async def test_log_records_inside_a_handler_carry_the_correlation_id(
    topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    from eventbus.context import correlation_id_var

    log = logging.getLogger("test.handler")

    async def handle(event: BaseEvent) -> None:
        log.info("handling %s", event.event_id)

    def sync_handle(event: BaseEvent) -> None:
        log.info("sync handling")

    bus = EventBus(settings=EventBusSettings(shutdown_timeout=1))
    await bus.registry.register(topic, handle)
    await bus.registry.register(topic, sync_handle)
    await bus.start()
    caplog.handler.addFilter(CorrelationIdFilter())
    with caplog.at_level(logging.INFO, logger="test.handler"):
        token = correlation_id_var.set("req-77")
        try:
            await bus.publish(Ordered(topic=topic))
        finally:
            correlation_id_var.reset(token)
        await bus.drain(timeout=5)
    await bus.stop()

    records = [r for r in caplog.records if r.name == "test.handler"]
    assert len(records) == 2
    assert {r.correlation_id for r in records} == {"req-77"}  # type: ignore[attr-defined]


def test_settings_select_collector_and_tracer() -> None:
    from eventbus.metrics import InMemoryMetricsCollector
    from eventbus.tracing import LoggingTracer

    bus = EventBus(settings=EventBusSettings(metrics="memory", tracing="logging"))
    assert isinstance(bus.metrics, InMemoryMetricsCollector)
    assert isinstance(bus.tracer, LoggingTracer)
    otel = EventBus(settings=EventBusSettings(tracing="otel"))
    assert isinstance(otel.tracer, OpenTelemetryTracer)
