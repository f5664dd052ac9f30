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

Cost: the SDK spends 15-20 us on a span with a batch processor in a tight loop,
30-100 us inside a running service; the tracer adds little to it.  With the global
propagator left at its default (W3C trace context and baggage) it writes and reads
``traceparent`` itself, several times cheaper than the propagator API, and falls
back to that API for anything else (another propagator, baggage, ``tracestate``).
At high volume, sample: under a ``ParentBased(TraceIdRatioBased(r))`` sampler an
unsampled span costs a few times less than a recorded one, and a handler attempt of
an unsampled event makes no SDK call at all (see ``follow_unsampled_parent``).
"""

from __future__ import annotations

from eventbus.extras import requires_extra

with requires_extra("otel", __name__):
    from opentelemetry import baggage, propagate, trace
    from opentelemetry import context as otel_context
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.trace import (
        NonRecordingSpan,
        SpanContext,
        SpanKind,
        Status,
        StatusCode,
        TraceFlags,
    )
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import random
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from eventbus.context import correlation_id_var
from eventbus.tracing import EventSpan, SpanStatus

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

_TRACEPARENT = "traceparent"
_TRACEPARENT_RE = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_NONE: frozenset[str] = frozenset()
#: Span ids of unsampled handler attempts (what the SDK's RandomIdGenerator uses).
_random = random.Random()
#: Stands for the OpenTelemetry span of an unsampled attempt in ``_live``.
_UNSAMPLED_SPAN = NonRecordingSpan(SpanContext(0, 0, is_remote=False))
#: Span names cached per (topic, operation), up to this many.
_MAX_CACHED_NAMES = 4096
#: The carrier fields of W3C trace context and baggage, the default propagators.
_W3C_FIELDS = frozenset({"traceparent", "tracestate", "baggage"})


def _is_w3c(textmap: TextMapPropagator) -> bool:
    """Whether ``textmap`` is W3C trace context (and baggage) only, as by default."""
    if type(textmap) is TraceContextTextMapPropagator:
        return True
    if type(textmap) is not CompositePropagator:
        return False
    # Its public ``fields``: the union of its propagators' (no private attribute read).
    fields = set(textmap.fields)
    return _TRACEPARENT in fields and fields <= _W3C_FIELDS


def _parse_traceparent(value: str) -> SpanContext | None:
    """The remote span context of a version-00 ``traceparent``; None if it is not one."""
    match = _TRACEPARENT_RE.fullmatch(value)
    if match is None:
        return None
    trace_id, span_id = int(match[1], 16), int(match[2], 16)
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(match[3], 16)))


def _to_otel(attributes: Mapping[str, Any]) -> dict[str, Any]:
    exported: dict[str, Any] = {}
    for key, value in attributes.items():
        if key == "attempt" and isinstance(value, int):
            exported["messaging.retry_count"] = value - 1
        elif key in _EXPORTED and isinstance(value, str | bool | int | float):
            exported[f"eventbus.{key}"] = value
    return exported


class OpenTelemetryTracer:
    """An :class:`~eventbus.tracing.EventTracer` on the OpenTelemetry API.

    Parameters:
      tracer_provider: Defaults to the global provider.
      messaging_system: The ``messaging.system`` attribute (``dramatiq``, ``kafka``).
      follow_unsampled_parent: A handler attempt whose publish span was not sampled
        is not recorded either, as the SDK's default sampler (``ParentBased``)
        decides, but without a call into the SDK: the attempt only carries the trace
        context on (a non-recording span, so spans the handler starts are dropped
        alike).  Set False for a sampler that records children of unsampled remote
        parents; every dispatch span then asks the SDK.
    """

    #: ``start_span`` takes the span's attributes (see TakesSpanAttributes).
    takes_span_attributes: ClassVar[bool] = True

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        messaging_system: str = DEFAULT_MESSAGING_SYSTEM,
        *,
        follow_unsampled_parent: bool = True,
    ) -> None:
        self._tracer = trace.get_tracer(INSTRUMENTATION_NAME, tracer_provider=tracer_provider)
        self._system = messaging_system
        self._follow_unsampled = follow_unsampled_parent
        self._live: dict[int, tuple[EventSpan, trace.Span, object | None, frozenset[str]]] = {}
        self._names: dict[tuple[str, str], tuple[str, SpanKind]] = {}
        self._textmap: TextMapPropagator | None = None
        self._w3c = False

    @property
    def messaging_system(self) -> str:
        """The ``messaging.system`` attribute of this tracer's spans."""
        return self._system

    def _w3c_textmap(self) -> bool:
        """Whether the global propagator is plain W3C (checked again when it changes)."""
        textmap = propagate.get_global_textmap()
        if textmap is not self._textmap:
            self._textmap, self._w3c = textmap, _is_w3c(textmap)
        return self._w3c

    def _extract(self, carrier: dict[str, str]) -> otel_context.Context:
        if len(carrier) == 1 and self._w3c_textmap():
            value = carrier.get(_TRACEPARENT)
            remote = _parse_traceparent(value) if isinstance(value, str) else None
            if remote is not None:
                return trace.set_span_in_context(NonRecordingSpan(remote))
        return propagate.extract(carrier)

    def _inject(
        self, otel_span: trace.Span, parent_ctx: otel_context.Context | None
    ) -> dict[str, str]:
        span_ctx = otel_span.get_span_context()
        if (
            span_ctx.is_valid
            and not span_ctx.trace_state
            and self._w3c_textmap()
            and not baggage.get_all(parent_ctx)
        ):
            return {
                _TRACEPARENT: f"00-{span_ctx.trace_id:032x}-{span_ctx.span_id:016x}-"
                f"{span_ctx.trace_flags:02x}"
            }
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(otel_span, parent_ctx))
        return carrier

    def start_span(
        self,
        operation: str,
        topic: str = "",
        event_id: str = "",
        parent_span: EventSpan | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> EventSpan:
        """Start the OpenTelemetry span of ``operation`` (``publish``: PRODUCER,
        ``dispatch``: CONSUMER, parented on ``parent_span``'s propagated context).

        ``attributes`` (``handler``, ``attempt``) are exported with the span's start,
        which costs the SDK less than setting them later.
        """
        name_kind = self._names.get((topic, operation))
        if name_kind is None:
            op_name, kind = _OPERATIONS.get(operation, (operation, SpanKind.INTERNAL))
            name_kind = (f"{topic} {op_name}", kind)
            if len(self._names) < _MAX_CACHED_NAMES:
                self._names[(topic, operation)] = name_kind
        name, kind = name_kind
        parent_ctx = None
        if parent_span is not None and parent_span.context:
            carrier = parent_span.context
            if (
                kind is SpanKind.CONSUMER
                and self._follow_unsampled
                and len(carrier) == 1
                and self._w3c_textmap()
            ):
                value = carrier.get(_TRACEPARENT)
                remote = _parse_traceparent(value) if isinstance(value, str) else None
                if remote is not None and not remote.trace_flags.sampled:
                    return self._unsampled(
                        remote, parent_span, operation, topic, event_id, attributes
                    )
            parent_ctx = self._extract(carrier)
        # Each attribute costs the SDK ~1 us: the messaging conventions' essentials only.
        otel_attributes: dict[str, Any] = {
            "messaging.system": self._system,
            "messaging.destination.name": topic,
            "messaging.message.id": event_id,
        }
        cid = correlation_id_var.get()
        if cid:
            otel_attributes["eventbus.correlation_id"] = cid
        if attributes:
            otel_attributes.update(_to_otel(attributes))
        otel_span = self._tracer.start_span(
            name, context=parent_ctx, kind=kind, attributes=otel_attributes
        )
        span_ctx = otel_span.get_span_context()
        span = EventSpan(
            span_id=f"{span_ctx.span_id:016x}",
            trace_id=f"{span_ctx.trace_id:032x}",
            parent_span_id=parent_span.span_id if parent_span else "",
            operation=operation,
            topic=topic,
            event_id=event_id,
            attributes=dict(attributes) if attributes else {},
        )
        token = None
        if kind is SpanKind.PRODUCER:
            span.context = self._inject(otel_span, parent_ctx)
        else:  # spans the handler starts become children of this one
            token = otel_context.attach(trace.set_span_in_context(otel_span, parent_ctx))
        # Keyed by the object: spans of an unconfigured (no-op) provider share one id.
        self._live[id(span)] = (
            span,
            otel_span,
            token,
            frozenset(attributes) if attributes else _NONE,
        )
        return span

    def _unsampled(
        self,
        remote: SpanContext,
        parent_span: EventSpan,
        operation: str,
        topic: str,
        event_id: str,
        attributes: Mapping[str, Any] | None,
    ) -> EventSpan:
        """The span of a handler attempt whose publisher did not sample the trace: a
        non-recording span in the same trace, current while the handler runs."""
        span_id = _random.getrandbits(64) or 1
        own = SpanContext(remote.trace_id, span_id, is_remote=False, trace_flags=remote.trace_flags)
        token = otel_context.attach(
            trace.set_span_in_context(NonRecordingSpan(own), otel_context.Context())
        )
        span = EventSpan(
            span_id=f"{span_id:016x}",
            trace_id=f"{remote.trace_id:032x}",
            parent_span_id=parent_span.span_id,
            operation=operation,
            topic=topic,
            event_id=event_id,
            attributes=dict(attributes) if attributes else {},
        )
        self._live[id(span)] = (span, _UNSAMPLED_SPAN, token, _NONE)
        return span

    def finish_span(self, span: EventSpan) -> None:
        """End the OpenTelemetry span: attributes added since the start, the status,
        and on failure an exception event."""
        live = self._live.pop(id(span), None)
        if live is None:
            return
        _, otel_span, token, exported = live
        if not otel_span.is_recording():  # sampled out: nothing to add
            if token is not None:
                otel_context.detach(token)  # type: ignore[arg-type]
            return
        later = {k: v for k, v in span.attributes.items() if k not in exported}
        if later:
            attributes = _to_otel(later)
            if attributes:
                otel_span.set_attributes(attributes)
        if span.status is SpanStatus.ERROR:
            otel_span.set_status(Status(StatusCode.ERROR, span.error_message))
            if span.exception is not None:
                otel_span.record_exception(span.exception)
        otel_span.end()
        if token is not None:
            otel_context.detach(token)  # type: ignore[arg-type]
