"""The Kafka backend in one process, against a real Kafka-protocol broker (Tansu)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from eventbus import BaseEvent, EventBus, EventBusSettings, HealthStatus, PublishError
from eventbus.exceptions import BackendError
from eventbus.kafka.backend import KafkaBackend
from eventbus.kafka.dlq import HEADER_ERROR, HEADER_ERROR_TYPE, HEADER_ORIGINAL_OFFSET
from eventbus.tracing import LoggingTracer
from tests.kafka_events import Numbered
from tests.kafka_helpers import (
    HEARTBEAT_INTERVAL_MS,
    SESSION_TIMEOUT_MS,
    TansuBroker,
    bridge_went_round,
    committed_offsets,
    create_topic,
    read_topic,
    wait_for,
)

pytest_plugins = ["tests.kafka_support"]


async def test_round_trip_typed_event_with_key_and_headers(
    make_kafka_bus: Callable[..., EventBus], kafka_bootstrap: str, kafka_names: tuple[str, str]
) -> None:
    topic, group = kafka_names
    await create_topic(kafka_bootstrap, topic, 3)
    got: list[Numbered] = []

    async def handler(event: Numbered) -> None:
        got.append(event)

    tracer = LoggingTracer()
    bus = make_kafka_bus(tracer=tracer)
    await bus.registry.register(topic, handler, name=f"{topic}.typed")
    await bus.start()
    event = Numbered(topic=topic, n=7, key="order-42")
    await bus.publish(event)
    await bus.drain(timeout=20)

    assert [(type(e), e.event_id, e.n) for e in got] == [(Numbered, event.event_id, 7)]
    cid = got[0].metadata["correlation_id"]
    [record] = await read_topic(kafka_bootstrap, topic, 1)
    assert record.key == b"order-42"  # type: ignore[attr-defined]
    headers = dict(record.headers)  # type: ignore[attr-defined]
    assert headers["eventbus-type"] == b"tests.kafka.Numbered"
    assert headers["eventbus-event-id"] == event.event_id.encode()
    assert headers["eventbus-correlation-id"] == cid.encode()
    envelope = json.loads(record.value)  # type: ignore[attr-defined]
    assert envelope["type"] == "tests.kafka.Numbered" and envelope["event"]["n"] == 7
    publish, dispatch = [(s.operation, s) for s in tracer.spans]
    assert publish[0] == "publish" and dispatch[0] == "dispatch"
    assert dispatch[1].parent_span_id == publish[1].span_id  # via the traceparent header
    assert headers["traceparent"] == f"00-{publish[1].trace_id}-{publish[1].span_id}-01".encode()
    committed = await committed_offsets(kafka_bootstrap, group, topic, 3)
    assert sum(max(o, 0) for o in committed.values()) == 1


async def test_backpressure_holds_in_flight_records_to_max_in_flight(
    make_kafka_bus: Callable[..., EventBus], kafka_bootstrap: str, kafka_names: tuple[str, str]
) -> None:
    topic, _ = kafka_names
    await create_topic(kafka_bootstrap, topic, 2)
    release = asyncio.Event()
    started: list[int] = []

    async def slow(event: Numbered) -> None:
        started.append(event.n)
        await release.wait()

    bus = make_kafka_bus(max_in_flight=8)
    await bus.registry.register(topic, slow, name=f"{topic}.slow")
    await bus.start()
    await bus.publish_many([Numbered(topic=topic, n=i, key=str(i)) for i in range(40)])
    backend = bus.backend
    assert isinstance(backend, KafkaBackend)
    await wait_for(lambda: len(started) == 8, 20, "the first 8 handlers to start")
    assert backend.bridge is not None
    await bridge_went_round(backend.bridge)  # where it would fetch more, were it not held back
    assert backend.bridge.in_flight == 8
    assert len(started) == 8

    release.set()
    await wait_for(lambda: len(started) == 40, 20, "every handler to start")
    await bus.drain(timeout=20)
    assert sorted(started) == list(range(40))
    assert backend.bridge.in_flight == 0


async def test_non_ascii_text_round_trips_as_utf8_json(
    make_kafka_bus: Callable[..., EventBus], kafka_bootstrap: str, kafka_names: tuple[str, str]
) -> None:
    topic, _ = kafka_names
    await create_topic(kafka_bootstrap, topic, 1)
    got: list[Numbered] = []

    async def handler(event: Numbered) -> None:
        got.append(event)

    bus = make_kafka_bus()
    await bus.registry.register(topic, handler, name=f"{topic}.utf8")
    await bus.start()
    await bus.publish(Numbered(topic=topic, n=3, key="新用户-ü-😀"))
    await bus.drain(timeout=20)

    assert [(e.n, e.key) for e in got] == [(3, "新用户-ü-😀")]
    [record] = await read_topic(kafka_bootstrap, topic, 1)
    assert record.key == "新用户-ü-😀".encode()  # type: ignore[attr-defined]
    assert json.loads(record.value)["event"]["key"] == "新用户-ü-😀"  # type: ignore[attr-defined]


async def test_opentelemetry_trace_crosses_kafka_in_the_record_headers(
    make_kafka_bus: Callable[..., EventBus], kafka_bootstrap: str, kafka_names: tuple[str, str]
) -> None:
    from opentelemetry import baggage, propagate, trace
    from opentelemetry import context as otel_context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from eventbus.otel import OpenTelemetryTracer

    topic, _ = kafka_names
    await create_topic(kafka_bootstrap, topic, 1)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    seen: list[object] = []

    async def handler(event: Numbered) -> None:
        seen.append(baggage.get_baggage("tenant"))

    bus = make_kafka_bus(tracer=OpenTelemetryTracer(provider, messaging_system="kafka"))
    await bus.registry.register(topic, handler, name=f"{topic}.otel")
    await bus.start()
    with provider.get_tracer("app").start_as_current_span("POST /orders") as request:
        token = otel_context.attach(baggage.set_baggage("tenant", "acme"))
        try:
            await bus.publish(Numbered(topic=topic, n=1))
        finally:
            otel_context.detach(token)
    await bus.drain(timeout=20)
    provider.shutdown()

    assert seen == ["acme"]  # baggage travelled in a header too
    spans = exporter.get_finished_spans()
    [producer] = [s for s in spans if s.kind is SpanKind.PRODUCER]
    [consumer] = [s for s in spans if s.kind is SpanKind.CONSUMER]
    trace_id = request.get_span_context().trace_id
    assert producer.context.trace_id == consumer.context.trace_id == trace_id
    assert consumer.parent is not None and consumer.parent.span_id == producer.context.span_id
    assert producer.attributes["messaging.system"] == consumer.attributes["messaging.system"]
    assert consumer.attributes["messaging.system"] == "kafka"
    assert consumer.attributes["messaging.destination.name"] == topic
    [record] = await read_topic(kafka_bootstrap, topic, 1)
    headers = dict(record.headers)  # type: ignore[attr-defined]
    carrier = {"traceparent": headers["traceparent"].decode()}
    parent = trace.get_current_span(propagate.extract(carrier)).get_span_context()
    assert parent.span_id == producer.context.span_id
    assert headers["baggage"] == b"tenant=acme"


def test_otel_tracing_from_settings_names_kafka_as_the_messaging_system() -> None:
    from eventbus.otel import OpenTelemetryTracer

    bus = EventBus(
        settings=EventBusSettings(
            backend="kafka", tracing="otel", kafka_bootstrap_servers="127.0.0.1:1"
        )
    )
    assert isinstance(bus.tracer, OpenTelemetryTracer)
    assert bus.tracer.messaging_system == "kafka"
    embedded = EventBus(settings=EventBusSettings(tracing="otel")).tracer
    assert isinstance(embedded, OpenTelemetryTracer)
    assert embedded.messaging_system == "dramatiq"


async def test_publish_many_keeps_per_key_order_for_ordered_handlers(
    make_kafka_bus: Callable[..., EventBus], kafka_bootstrap: str, kafka_names: tuple[str, str]
) -> None:
    topic, _ = kafka_names
    await create_topic(kafka_bootstrap, topic, 2)
    seen: dict[str, list[int]] = {}
    running: dict[str, int] = {}
    overlaps = 0

    async def ordered(event: Numbered) -> None:
        nonlocal overlaps
        running[event.key] = running.get(event.key, 0) + 1
        if running[event.key] > 1:
            overlaps += 1
        await asyncio.sleep(0.002 * (event.n % 3))
        seen.setdefault(event.key, []).append(event.n)
        running[event.key] -= 1

    bus = make_kafka_bus()
    await bus.registry.register(topic, ordered, ordered=True)
    await bus.start()
    events = [Numbered(topic=topic, n=i, key=f"k{i % 4}") for i in range(120)]
    await bus.publish_many(events)
    await bus.drain(timeout=30)

    assert overlaps == 0
    assert {k: v for k, v in seen.items()} == {
        f"k{j}": [i for i in range(120) if i % 4 == j] for j in range(4)
    }


async def test_poison_records_go_to_the_dlq_topic_and_the_stream_goes_on(
    make_kafka_bus: Callable[..., EventBus], kafka_bootstrap: str, kafka_names: tuple[str, str]
) -> None:
    from aiokafka import AIOKafkaProducer

    topic, group = kafka_names
    await create_topic(kafka_bootstrap, topic, 1)
    got: list[int] = []

    async def handler(event: Numbered) -> None:
        got.append(event.n)

    bus = make_kafka_bus()
    await bus.registry.register(topic, handler)
    await bus.start()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"\x00not json")
        await producer.send_and_wait(
            topic, json.dumps({"type": "nobody.Knows", "event": {"topic": topic}}).encode()
        )
        await producer.send_and_wait(
            topic, json.dumps({"type": "tests.kafka.Numbered", "event": {"n": "x"}}).encode()
        )
    finally:
        await producer.stop()
    await bus.publish(Numbered(topic=topic, n=1))
    await bus.drain(timeout=20)

    assert got == [1]
    dead: list[Any] = await read_topic(kafka_bootstrap, f"{topic}.dlq", 3)
    dead.sort(key=lambda r: int(dict(r.headers)[HEADER_ORIGINAL_OFFSET]))
    reasons = [dict(r.headers)[HEADER_ERROR].decode() for r in dead]
    assert "not UTF-8 JSON" in reasons[0]
    assert "unknown event type 'nobody.Knows'" in reasons[1]
    assert "invalid fields" in reasons[2]
    assert {dict(r.headers)[HEADER_ERROR_TYPE] for r in dead} == {b"EventDecodeError"}
    assert await committed_offsets(kafka_bootstrap, group, topic) == {0: 4}
    records = sorted(await bus.dlq.apeek(limit=10), key=lambda r: r.offset or 0)
    assert [r.offset for r in records] == [0, 1, 2]
    assert records[0].event is None and records[2].event is None
    assert records[1].event is not None and records[1].event.event_type == "nobody.Knows"
    assert records[0].envelope == "\x00not json"


async def test_failed_handler_is_dead_lettered_to_kafka_and_its_offset_committed(
    make_kafka_bus: Callable[..., EventBus], kafka_bootstrap: str, kafka_names: tuple[str, str]
) -> None:
    topic, group = kafka_names
    await create_topic(kafka_bootstrap, topic, 1)
    calls: list[int] = []

    async def fails(event: Numbered) -> None:
        calls.append(event.n)
        raise RuntimeError("payment service down")

    bus = make_kafka_bus()
    await bus.registry.register(topic, fails, name=f"{topic}.fails")
    await bus.start()
    await bus.publish(Numbered(topic=topic, n=5))
    await bus.drain(timeout=20)

    assert calls == [5, 5]  # one retry
    [failed] = await bus.dlq.apeek()
    assert failed.handler == f"{topic}.fails"
    assert failed.attempts == 2 and failed.error == "payment service down"
    assert isinstance(failed.event, Numbered) and failed.event.n == 5
    assert await committed_offsets(kafka_bootstrap, group, topic) == {0: 1}

    # Replay goes back through Kafka, to the failed handler only.
    calls.clear()
    result = await bus.dlq.areplay([failed.id])
    assert result.replayed == [failed.id]
    await wait_for(lambda: len(calls) == 2, 20, "the replayed event")
    assert calls == [5, 5]


async def test_health_reports_producer_and_bridge(
    make_kafka_bus: Callable[..., EventBus], kafka_bootstrap: str, kafka_names: tuple[str, str]
) -> None:
    topic, _ = kafka_names
    await create_topic(kafka_bootstrap, topic, 2)

    async def handler(event: BaseEvent) -> None:
        pass

    bus = make_kafka_bus()
    await bus.registry.register(topic, handler)
    await bus.start()
    await bus.publish(Numbered(topic=topic))
    await bus.drain(timeout=20)
    results = {r.backend: r for r in await bus.health.check()}
    assert results["kafka"].status is HealthStatus.HEALTHY
    bridge = results["kafka-bridge"]
    assert bridge.status is HealthStatus.HEALTHY, bridge.detail
    assert "partition(s) assigned" in bridge.detail and "last poll" in bridge.detail
    assert isinstance(bus.backend, KafkaBackend) and bus.backend.bridge is not None
    # Decorated handlers of other test modules subscribe their topics too.
    assert {tp.partition for tp in bus.backend.bridge.assignment if tp.topic == topic} == {0, 1}


async def test_unreachable_broker_raises_publish_error_in_bounded_time(
    kafka_names: tuple[str, str],
) -> None:
    broker = TansuBroker.start()
    topic, group = kafka_names
    backend = KafkaBackend(broker.bootstrap, group, publish_timeout=1.5, idempotence=False)
    bus = EventBus(backend=backend, settings=EventBusSettings(shutdown_timeout=1))
    try:
        await bus.start()
        await bus.publish(Numbered(topic=topic))
        broker.stop()
        started = time.monotonic()
        with pytest.raises(PublishError, match="did not acknowledge"):
            await bus.publish(Numbered(topic=topic))
        assert time.monotonic() - started < 3
        health = {r.backend: r for r in await bus.health.check()}
        assert health["kafka"].status is HealthStatus.UNHEALTHY
    finally:
        broker.stop()
        await bus.stop()


async def test_start_fails_clearly_without_a_broker(kafka_names: tuple[str, str]) -> None:
    from tests.kafka_helpers import free_port

    backend = KafkaBackend(f"127.0.0.1:{free_port()}", kafka_names[1], publish_timeout=1)
    bus = EventBus(backend=backend)
    started = time.monotonic()
    with pytest.raises(BackendError, match="cannot reach Kafka"):
        await bus.start()
    assert time.monotonic() - started < 3


async def test_worker_thread_consumes_until_stopped(
    make_kafka_bus: Callable[..., EventBus], kafka_bootstrap: str, kafka_names: tuple[str, str]
) -> None:
    from eventbus.kafka import start_worker_thread

    topic, group = kafka_names
    await create_topic(kafka_bootstrap, topic, 2)
    got: list[int] = []

    def handler(event: Numbered) -> None:  # a sync handler: runs in the worker's pool
        got.append(event.n)

    worker_bus = EventBus(
        backend=KafkaBackend(
            kafka_bootstrap,
            group,
            idempotence=False,
            session_timeout_ms=SESSION_TIMEOUT_MS,
            heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS,
        ),
        settings=EventBusSettings(shutdown_timeout=3),
    )
    await worker_bus.registry.register(topic, handler)
    stop = start_worker_thread(worker_bus)
    try:
        publisher = make_kafka_bus(consume=False)
        await publisher.start()
        await publisher.publish_many([Numbered(topic=topic, n=i) for i in range(10)])
        await wait_for(lambda: len(got) == 10, 20, "10 events in the worker thread")
    finally:
        await asyncio.to_thread(stop, 10)
    assert sorted(got) == list(range(10))
    assert not worker_bus.started
    committed = await committed_offsets(kafka_bootstrap, group, topic, 2)
    assert sum(max(o, 0) for o in committed.values()) == 10


async def test_a_broker_without_idempotent_producers_is_named_at_start(
    kafka_bootstrap: str, kafka_names: tuple[str, str]
) -> None:
    # Tansu cannot give out producer ids: the default (idempotence on, as real Kafka
    # supports it) fails at start with the setting to change, not "unreachable".
    bus = EventBus(backend=KafkaBackend(kafka_bootstrap, kafka_names[1], publish_timeout=2))
    with pytest.raises(BackendError, match="EVENTBUS_KAFKA_IDEMPOTENCE=false") as raised:
        await bus.start()
    assert "cannot reach" not in str(raised.value)
    assert not bus.started
