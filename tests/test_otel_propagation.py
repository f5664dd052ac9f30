"""The trace context the OpenTelemetry tracer writes into messages and reads back.

The tracer writes and parses ``traceparent`` itself while the global propagator
is plain W3C; these tests hold it to what the OpenTelemetry propagators do, and
check that baggage, ``tracestate`` and another propagator still travel.
"""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from eventbus import BaseEvent, EventBus
from eventbus.otel import OpenTelemetryTracer
from eventbus.tracing import EventSpan, SpanStatus

W3C = TraceContextTextMapPropagator()


class Paid(BaseEvent):
    amount: int = 5


def by_kind(exporter: InMemorySpanExporter, kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind is kind]


def publish_span(tracer: OpenTelemetryTracer, topic: str = "orders") -> EventSpan:
    span = tracer.start_span("publish", topic=topic, event_id="e1")
    span.finish(SpanStatus.OK)
    tracer.finish_span(span)
    return span


def test_traceparent_written_is_the_one_the_w3c_propagator_reads(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    tp, exporter = spans
    tracer = OpenTelemetryTracer(tracer_provider=tp)
    with tp.get_tracer("app").start_as_current_span("request"):
        carrier = publish_span(tracer).context

    assert set(carrier) == {"traceparent"}
    [producer] = by_kind(exporter, SpanKind.PRODUCER)
    read = trace.get_current_span(W3C.extract(carrier)).get_span_context()
    assert (read.trace_id, read.span_id, read.trace_flags) == (
        producer.context.trace_id,
        producer.context.span_id,
        producer.context.trace_flags,
    )
    expected: dict[str, str] = {}
    W3C.inject(expected, context=trace.set_span_in_context(trace.NonRecordingSpan(read)))
    assert carrier == expected


VALID = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize(
    "traceparent",
    [
        VALID,
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",  # not sampled
        VALID.upper(),  # upper-case hex is invalid
        "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # zero trace id
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # zero span id
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # forbidden version
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",  # future version
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",  # 00 with extra
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01",  # short span id
        " 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b71_9203331-01",
        "garbage",
        "",
    ],
)
def test_consumer_span_parent_matches_the_w3c_propagator(
    traceparent: str, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    tp, exporter = spans
    tracer = OpenTelemetryTracer(tracer_provider=tp)
    carrier = {"traceparent": traceparent}
    span = tracer.start_span("dispatch", topic="orders", parent_span=EventSpan(context=carrier))
    span.finish(SpanStatus.OK)
    tracer.finish_span(span)

    consumers = by_kind(exporter, SpanKind.CONSUMER)
    expected = trace.get_current_span(propagate.extract(carrier)).get_span_context()
    if expected.is_valid and not expected.trace_flags.sampled:
        assert consumers == []  # the publisher's "not sampled" is honoured
        return
    [consumer] = consumers
    if expected.is_valid:
        assert consumer.parent is not None
        assert consumer.parent.is_remote
        assert (consumer.parent.trace_id, consumer.parent.span_id) == (
            expected.trace_id,
            expected.span_id,
        )
        assert consumer.parent.trace_flags == expected.trace_flags
        assert consumer.context.trace_id == expected.trace_id
    else:  # a malformed parent starts a new trace, it does not fail the handler
        assert consumer.parent is None


async def test_baggage_and_tracestate_reach_the_handler(
    topic: str, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    tp, exporter = spans
    bus = EventBus(tracer=OpenTelemetryTracer(tracer_provider=tp))
    seen: dict[str, object] = {}

    async def handle(event: BaseEvent) -> None:
        seen["tenant"] = baggage.get_baggage("tenant")
        seen["state"] = trace.get_current_span().get_span_context().trace_state.get("vendor")

    await bus.registry.register(topic, handle)
    await bus.start()
    incoming = {"traceparent": VALID, "tracestate": "vendor=abc", "baggage": "tenant=acme"}
    token = otel_context.attach(propagate.extract(incoming))
    try:
        await bus.publish(Paid(topic=topic))
    finally:
        otel_context.detach(token)
    await bus.drain(timeout=5)
    await bus.stop()

    assert seen == {"tenant": "acme", "state": "abc"}
    [consumer] = by_kind(exporter, SpanKind.CONSUMER)
    assert consumer.context.trace_id == int(VALID[3:35], 16)


class _HeaderPropagator(TextMapPropagator):
    """A non-W3C propagator: ``x-trace: <trace id>:<span id>``."""

    def extract(
        self,
        carrier: CarrierT,
        context: otel_context.Context | None = None,
        getter: Getter[CarrierT] = default_getter,
    ) -> otel_context.Context:
        [value] = getter.get(carrier, "x-trace") or [""]
        if ":" not in value:
            return context or otel_context.get_current()
        trace_id, span_id = (int(part, 16) for part in value.split(":"))
        remote = trace.SpanContext(
            trace_id, span_id, is_remote=True, trace_flags=trace.TraceFlags(1)
        )
        return trace.set_span_in_context(trace.NonRecordingSpan(remote), context)

    def inject(
        self,
        carrier: CarrierT,
        context: otel_context.Context | None = None,
        setter: Setter[CarrierT] = default_setter,
    ) -> None:
        ctx = trace.get_current_span(context).get_span_context()
        setter.set(carrier, "x-trace", f"{ctx.trace_id:032x}:{ctx.span_id:016x}")

    @property
    def fields(self) -> set[str]:
        return {"x-trace"}


def test_another_global_propagator_is_used_on_both_sides(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    tp, exporter = spans
    tracer = OpenTelemetryTracer(tracer_provider=tp)
    publish_span(tracer)  # W3C first: the tracer must notice the change
    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(_HeaderPropagator())
    try:
        carrier = publish_span(tracer).context
        span = tracer.start_span("dispatch", topic="orders", parent_span=EventSpan(context=carrier))
        span.finish(SpanStatus.OK)
        tracer.finish_span(span)
    finally:
        propagate.set_global_textmap(previous)

    assert set(carrier) == {"x-trace"}
    producer = by_kind(exporter, SpanKind.PRODUCER)[-1]
    [consumer] = by_kind(exporter, SpanKind.CONSUMER)
    assert consumer.parent is not None
    assert consumer.parent.span_id == producer.context.span_id


async def test_overlapping_handlers_without_a_configured_sdk_log_no_context_errors(
    topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    # EVENTBUS_TRACING=otel before the app configured a TracerProvider: every span is
    # the API's invalid one, all with span id 0.  Handler attempts still each restore
    # their own context.
    bus = EventBus(tracer=OpenTelemetryTracer(tracer_provider=trace.NoOpTracerProvider()))

    second_started, first_done = asyncio.Event(), asyncio.Event()
    order: list[str] = []

    async def first(event: BaseEvent) -> None:  # starts first, finishes first
        await second_started.wait()
        order.append("first")
        first_done.set()

    async def second(event: BaseEvent) -> None:
        second_started.set()
        await first_done.wait()
        order.append("second")

    await bus.registry.register(topic, first)
    await bus.registry.register(topic, second)
    await bus.start()
    with caplog.at_level("ERROR"):
        await bus.publish(Paid(topic=topic))
        await bus.drain(timeout=5)
    await bus.stop()

    assert order == ["first", "second"]
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []


UNSAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"


async def test_an_unsampled_event_carries_its_trace_to_the_handler_and_records_nothing(
    topic: str,
) -> None:
    """A ratio sampler that drops the publish span: the handler attempt is not
    recorded either, its spans are dropped alike, and they stay in the same trace."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    exporter = InMemorySpanExporter()
    tp = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.0)))
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    bus = EventBus(tracer=OpenTelemetryTracer(tracer_provider=tp))
    seen: list[tuple[int, bool, bool]] = []

    async def handle(event: BaseEvent) -> None:
        current = trace.get_current_span()
        with tp.get_tracer("app").start_as_current_span("db query") as inner:
            seen.append(
                (
                    current.get_span_context().trace_id,
                    current.is_recording(),
                    inner.is_recording(),
                )
            )

    await bus.registry.register(topic, handle)
    await bus.start()
    token = otel_context.attach(propagate.extract({"traceparent": UNSAMPLED}))
    try:
        await bus.publish(Paid(topic=topic))
    finally:
        otel_context.detach(token)
    await bus.drain(timeout=5)
    await bus.stop()
    tp.shutdown()

    assert seen == [(int(UNSAMPLED[3:35], 16), False, False)]
    assert exporter.get_finished_spans() == ()
    # And after the handler, nothing of its trace is left current.
    assert not trace.get_current_span().get_span_context().is_valid


def test_a_sampler_recording_children_of_unsampled_parents_can_be_followed() -> None:
    """``follow_unsampled_parent=False`` asks the SDK for every handler attempt."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    exporter = InMemorySpanExporter()
    tp = TracerProvider(sampler=ALWAYS_ON)  # not parent-based: records them all
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    parent = EventSpan(span_id=UNSAMPLED[36:52], context={"traceparent": UNSAMPLED})
    for follow in (True, False):
        tracer = OpenTelemetryTracer(tracer_provider=tp, follow_unsampled_parent=follow)
        span = tracer.start_span("dispatch", topic="orders", parent_span=parent)
        span.finish(SpanStatus.OK)
        tracer.finish_span(span)
        assert span.trace_id == UNSAMPLED[3:35]
        assert span.parent_span_id == UNSAMPLED[36:52]
    [consumer] = by_kind(exporter, SpanKind.CONSUMER)  # only the one the SDK was asked for
    assert consumer.context.trace_id == int(UNSAMPLED[3:35], 16)
    tp.shutdown()
