"""Dead letters: events a handler failed on for good, kept for inspection and replay.

A :class:`FailedEvent` is written once per (event, handler) when the handler's
retry policy gives up or the message cannot be decoded.  ``bus.dlq`` is the
store; the embedded backend keeps it in memory, bounded (oldest evicted, and
counted in ``evicted``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from .events import BaseEvent


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class FailedEvent:
    """One handler's final failure on one event.

    Attributes:
      id: Stable id of the record (the id of the failed message).
      event: The decoded event, or None when the payload could not be decoded.
      envelope: The payload exactly as it was enqueued.
      topic: The event's topic.
      handler: The actor name of the handler that failed.
      queue: The handler's queue.
      attempts: How many times the handler ran.
      error: The final attempt's exception message.
      error_type: The final exception's type name.
      traceback: The final exception's formatted traceback.
      first_failed_at, last_failed_at: When the first and the last attempt failed.
      correlation_id: The correlation id of the publishing request.
      trace_id: The trace id of the publish span.
    """

    id: str
    event: BaseEvent | None
    envelope: Any
    topic: str
    handler: str
    queue: str
    attempts: int
    error: str
    error_type: str
    traceback: str = ""
    first_failed_at: datetime = field(default_factory=_now)
    last_failed_at: datetime = field(default_factory=_now)
    correlation_id: str = ""
    trace_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-compatible dict (the event as its envelope)."""
        return {
            "id": self.id,
            "envelope": self.envelope,
            "topic": self.topic,
            "handler": self.handler,
            "queue": self.queue,
            "attempts": self.attempts,
            "error": self.error,
            "error_type": self.error_type,
            "traceback": self.traceback,
            "first_failed_at": self.first_failed_at.isoformat(),
            "last_failed_at": self.last_failed_at.isoformat(),
            "correlation_id": self.correlation_id,
            "trace_id": self.trace_id,
        }


@runtime_checkable
class DeadLetterStore(Protocol):
    """Where dead letters go.  ``add`` is called from the dispatching thread."""

    def add(self, record: FailedEvent) -> None: ...

    def peek(self, limit: int = 10) -> list[FailedEvent]: ...

    def get(self, record_id: str) -> FailedEvent | None: ...

    def remove(self, record_id: str) -> FailedEvent | None: ...

    def size(self) -> int: ...

    def clear(self) -> None: ...


class MemoryDeadLetterStore:
    """Keeps the newest ``max_size`` dead letters in memory; safe across threads.

    Parameters:
      max_size: Records kept; adding one more evicts the oldest and counts it in
        ``evicted``.
    """

    def __init__(self, max_size: int = 10_000) -> None:
        self.max_size = max_size
        self.evicted = 0
        self._records: OrderedDict[str, FailedEvent] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, record: FailedEvent) -> None:
        """Store ``record``, replacing one with the same id."""
        with self._lock:
            self._records.pop(record.id, None)
            self._records[record.id] = record
            while len(self._records) > self.max_size:
                self._records.popitem(last=False)
                self.evicted += 1

    def peek(self, limit: int = 10) -> list[FailedEvent]:
        """The ``limit`` newest records, oldest first."""
        with self._lock:
            records = list(self._records.values())
        return records[-limit:] if limit > 0 else []

    def get(self, record_id: str) -> FailedEvent | None:
        """The record with ``record_id``, or None."""
        with self._lock:
            return self._records.get(record_id)

    def remove(self, record_id: str) -> FailedEvent | None:
        """Remove and return the record with ``record_id``."""
        with self._lock:
            return self._records.pop(record_id, None)

    def size(self) -> int:
        """How many records are stored."""
        with self._lock:
            return len(self._records)

    def clear(self) -> None:
        """Remove every record."""
        with self._lock:
            self._records.clear()
