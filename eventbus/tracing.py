"""Pluggable tracing: spans around every publish and every handler attempt.

The bus starts a ``publish`` span per published event and the dispatch middleware
a ``dispatch`` span per handler attempt, parented on the publish span.  Plug in
any object with ``start_span`` and ``finish_span`` (:class:`EventTracer`);
:class:`LoggingTracer` logs spans and keeps the finished ones.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Protocol, runtime_checkable

from eventbus.context import correlation_id_var

logger = logging.getLogger(__name__)

#: How many finished spans LoggingTracer keeps by default.
DEFAULT_MAX_SPANS = 10_000

#: The span of the publish or handler running in this context.
_current_span: ContextVar[EventSpan | None] = ContextVar("eventbus_current_span", default=None)


class SpanStatus(StrEnum):
    """Outcome of a span."""

    OK = "ok"
    ERROR = "error"


def _span_id() -> str:
    return os.urandom(8).hex()


@dataclass
class EventSpan:
    """A traced operation: ``publish`` or ``dispatch``."""

    span_id: str = field(default_factory=_span_id)
    trace_id: str = ""
    parent_span_id: str = ""
    operation: str = ""
    topic: str = ""
    event_id: str = ""
    status: SpanStatus = SpanStatus.OK
    start_time: float = field(default_factory=time.monotonic)
    end_time: float = 0.0
    attributes: dict[str, Any] = field(default_factory=dict)
    error_message: str = ""
    #: Propagation fields (W3C ``traceparent``, ``tracestate``, ``baggage``) a tracer
    #: sets on publish spans; they travel with the message to the dispatch side,
    #: where they arrive on the ``parent_span`` given to ``start_span``.
    context: dict[str, str] = field(default_factory=dict)
    #: The exception of a failed handler attempt (not exported by ``to_dict``).
    exception: BaseException | None = field(default=None, repr=False)

    @property
    def duration(self) -> float:
        """Seconds from start to finish (to now while the span runs)."""
        return (self.end_time or time.monotonic()) - self.start_time

    def finish(self, status: SpanStatus = SpanStatus.OK, error: str = "") -> None:
        """Mark the span finished with ``status``; ``error`` is the failure message."""
        self.end_time = time.monotonic()
        self.status = status
        if error:
            self.error_message = error

    def to_dict(self) -> dict[str, object]:
        """The span as a JSON-compatible dict."""
        return {
            "span_id": self.span_id,
            "trace_id": self.trace_id,
            "parent_span_id": self.parent_span_id,
            "operation": self.operation,
            "topic": self.topic,
            "event_id": self.event_id,
            "status": self.status.value,
            "duration_ms": round(self.duration * 1000, 2),
            "attributes": self.attributes,
            "error_message": self.error_message,
        }


@runtime_checkable
class EventTracer(Protocol):
    """What the bus needs of a tracer.

    A tracer that declares :class:`TakesSpanAttributes` gets the dispatch span's
    attributes (``handler``, ``attempt``, ``message_id``) at the start; for others
    the dispatch middleware sets them on the returned span.
    """

    def start_span(
        self,
        operation: str,
        topic: str = "",
        event_id: str = "",
        parent_span: EventSpan | None = None,
    ) -> EventSpan:
        """Create and start a span."""
        ...

    def finish_span(self, span: EventSpan) -> None:
        """Finish and export a span (its status is already set)."""
        ...


@runtime_checkable
class TakesSpanAttributes(Protocol):
    """A tracer whose ``start_span`` takes an ``attributes`` keyword (a mapping),
    declared with the class attribute ``takes_span_attributes = True``."""

    takes_span_attributes: ClassVar[bool]


class NoopTracer:
    """The default tracer: spans are created and dropped."""

    def start_span(
        self,
        operation: str,
        topic: str = "",
        event_id: str = "",
        parent_span: EventSpan | None = None,
    ) -> EventSpan:
        return EventSpan(operation=operation, topic=topic, event_id=event_id)

    def finish_span(self, span: EventSpan) -> None:
        pass


class LoggingTracer:
    """Logs every span and keeps the last ``max_spans`` finished ones in ``spans``.

    The trace id of a span is the correlation id current when it starts, so a
    request, its publish spans and its events' dispatch spans share one trace id.
    """

    def __init__(self, log_level: int = logging.DEBUG, max_spans: int = DEFAULT_MAX_SPANS) -> None:
        self._log_level = log_level
        self._spans: deque[EventSpan] = deque(maxlen=max_spans)

    def start_span(
        self,
        operation: str,
        topic: str = "",
        event_id: str = "",
        parent_span: EventSpan | None = None,
    ) -> EventSpan:
        span = EventSpan(
            trace_id=correlation_id_var.get() or os.urandom(16).hex(),
            parent_span_id=parent_span.span_id if parent_span else "",
            operation=operation,
            topic=topic,
            event_id=event_id,
        )
        logger.log(
            self._log_level,
            "SPAN START %s [%s] topic=%s event=%s",
            operation,
            span.span_id,
            topic,
            event_id,
        )
        return span

    def finish_span(self, span: EventSpan) -> None:
        if not span.end_time:
            span.finish()
        self._spans.append(span)
        logger.log(
            self._log_level,
            "SPAN END %s [%s] status=%s duration=%.2fms",
            span.operation,
            span.span_id,
            span.status.value,
            span.duration * 1000,
        )

    @property
    def spans(self) -> list[EventSpan]:
        """The finished spans, oldest first."""
        return list(self._spans)

    def clear(self) -> None:
        """Forget the finished spans."""
        self._spans.clear()


def get_current_span() -> EventSpan | None:
    """The span of the publish or handler attempt running in this context, if any."""
    return _current_span.get()


def set_current_span(span: EventSpan | None) -> Any:
    """Make ``span`` current; returns a token for :func:`reset_current_span`."""
    return _current_span.set(span)


def reset_current_span(token: Any) -> None:
    """Undo a :func:`set_current_span`."""
    _current_span.reset(token)
