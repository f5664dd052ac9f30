"""OpenTelemetry tracing: a PRODUCER span per publish, a CONSUMER span per handler attempt.

Example::

    from eventbus.otel import OpenTelemetryTracer

    bus = EventBus(tracer=OpenTelemetryTracer())   # the global TracerProvider

The publish span is a child of whatever span is current (the HTTP server span of
an app instrumented with opentelemetry-instrumentation-fastapi).  Its W3C
``traceparent``, ``tracestate`` and ``baggage`` travel in the message, so in the
worker process each handler attempt's CONSUMER span continues the same trace, and
spans the handler itself starts nest under it.  A failed attempt's span has
status ERROR and an exception event.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode, format_span_id, format_trace_id

from .asgi import correlation_id_var
from .tracing import EventSpan, SpanStatus

#: Instrumentation scope name of the spans.
INSTRUMENTATION_NAME = "eventbus"
#: ``messaging.system`` of spans (a backend-specific value may be given instead).
DEFAULT_MESSAGING_SYSTEM = "dramatiq"

#: EventSpan attributes exported as ``eventbus.<name>`` (``attempt`` becomes
#: ``messaging.retry_count``).
_EXPORTED = frozenset({"handler", "will_retry"})

_OPERATIONS = {
    "publish": ("publish", SpanKind.PRODUCER),
    "dispatch": ("process", SpanKind.CONSUMER),
}


class OpenTelemetryTracer:
    """An :class:`~eventbus.tracing.EventTracer` on the OpenTelemetry API.

    Parameters:
      tracer_provider: Defaults to the global provider.
      messaging_system: The ``messaging.system`` attribute (``dramatiq``, ``kafka``).
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        messaging_system: str = DEFAULT_MESSAGING_SYSTEM,
    ) -> None:
        self._tracer = trace.get_tracer(INSTRUMENTATION_NAME, tracer_provider=tracer_provider)
        self._system = messaging_system
        self._live: dict[str, tuple[trace.Span, object | None]] = {}

    def start_span(
        self,
        operation: str,
        topic: str = "",
        event_id: str = "",
        parent_span: EventSpan | None = None,
    ) -> EventSpan:
        op_name, kind = _OPERATIONS.get(operation, (operation, SpanKind.INTERNAL))
        parent_ctx = None
        if parent_span is not None and parent_span.context:
            parent_ctx = propagate.extract(parent_span.context)
        # Each attribute costs the SDK ~6 us: the messaging conventions' essentials only.
        attributes: dict[str, Any] = {
            "messaging.system": self._system,
            "messaging.destination.name": topic,
            "messaging.message.id": event_id,
        }
        cid = correlation_id_var.get()
        if cid:
            attributes["eventbus.correlation_id"] = cid
        otel_span = self._tracer.start_span(
            f"{topic} {op_name}", context=parent_ctx, kind=kind, attributes=attributes
        )
        span_ctx = otel_span.get_span_context()
        span = EventSpan(
            span_id=format_span_id(span_ctx.span_id),
            trace_id=format_trace_id(span_ctx.trace_id),
            parent_span_id=parent_span.span_id if parent_span else "",
            operation=operation,
            topic=topic,
            event_id=event_id,
        )
        current = trace.set_span_in_context(otel_span, parent_ctx)
        token = None
        if kind is SpanKind.PRODUCER:
            carrier: dict[str, str] = {}
            propagate.inject(carrier, context=current)
            span.context = carrier
        else:  # spans the handler starts become children of this one
            token = otel_context.attach(current)
        self._live[span.span_id] = (otel_span, token)
        return span

    def finish_span(self, span: EventSpan) -> None:
        live = self._live.pop(span.span_id, None)
        if live is None:
            return
        otel_span, token = live
        attributes: dict[str, Any] = {}
        for key, value in span.attributes.items():
            if key == "attempt" and isinstance(value, int):
                attributes["messaging.retry_count"] = value - 1
            elif key in _EXPORTED and isinstance(value, str | bool | int | float):
                attributes[f"eventbus.{key}"] = value
        if attributes:
            otel_span.set_attributes(attributes)
        if span.status is SpanStatus.ERROR:
            otel_span.set_status(Status(StatusCode.ERROR, span.error_message))
            if span.exception is not None:
                otel_span.record_exception(span.exception)
        otel_span.end()
        if token is not None:
            otel_context.detach(token)  # type: ignore[arg-type]
