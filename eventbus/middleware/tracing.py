"""The dramatiq middleware that restores the publisher's context around each handler
attempt: the correlation id, and a ``dispatch`` span parented on the publish span."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import Token
from typing import TYPE_CHECKING, Any

from dramatiq import Middleware

import eventbus.keys as keys
from eventbus.context import correlation_id_var
from eventbus.tracing import (
    EventSpan,
    EventTracer,
    SpanStatus,
    TakesSpanAttributes,
    reset_current_span,
    set_current_span,
)

if TYPE_CHECKING:
    from dramatiq import Broker
    from dramatiq.broker import MessageProxy


class Tracing(Middleware):
    """Starts a ``dispatch`` span before each handler attempt and finishes it after,
    with status error and the exception message when the attempt failed.

    Parameters:
      tracer: The tracer that creates and exports spans.
    """

    def __init__(self, tracer: EventTracer) -> None:
        self.tracer = tracer
        self._active: dict[str, tuple[EventSpan, Token[str], Any]] = {}
        # A tracer whose start_span takes ``attributes`` gets them at the start
        # (cheaper for the OpenTelemetry SDK); others find them on the span.
        self._with_attributes = (
            isinstance(tracer, TakesSpanAttributes) and tracer.takes_span_attributes
        )
        self._start: Callable[..., EventSpan] = tracer.start_span

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        options = message.options
        cid_token = correlation_id_var.set(str(options.get(keys.CORRELATION_ID, "")))
        context = options.get(keys.TRACE_CONTEXT)
        parent = EventSpan(
            span_id=str(options.get(keys.PARENT_SPAN_ID, "")),
            trace_id=str(options.get(keys.TRACE_ID, "")),
            context=dict(context) if isinstance(context, dict) else {},
        )
        attributes = {
            "handler": message.actor_name,
            "attempt": int(options.get(keys.ATTEMPTS, 0)) + 1,
            "message_id": message.message_id,
        }
        extra = {"attributes": attributes} if self._with_attributes else {}
        span = self._start(
            "dispatch",
            topic=str(options.get(keys.TOPIC, "")),
            event_id=_event_id(message),
            parent_span=parent if parent.span_id or parent.context else None,
            **extra,
        )
        for key, value in attributes.items():
            span.attributes.setdefault(key, value)
        self._active[message.message_id] = (span, cid_token, set_current_span(span))

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None:
            self._finish(message, SpanStatus.OK, None)
        else:
            self._finish(message, SpanStatus.ERROR, exception)

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        self._finish(message, SpanStatus.OK, None)

    def _finish(
        self, message: MessageProxy, status: SpanStatus, exception: BaseException | None
    ) -> None:
        active = self._active.pop(message.message_id, None)
        if active is None:
            return
        span, cid_token, span_token = active
        if exception is not None:
            span.exception = exception
            span.attributes["will_retry"] = not message.failed
        span.finish(status, (str(exception) or type(exception).__name__) if exception else "")
        try:
            self.tracer.finish_span(span)
        finally:
            reset_current_span(span_token)
            correlation_id_var.reset(cid_token)


def _event_id(message: MessageProxy) -> str:
    envelope = message.args[0] if message.args else None
    if isinstance(envelope, dict):
        event = envelope.get("event")
        if isinstance(event, dict):
            return str(event.get("event_id", ""))
    return ""
