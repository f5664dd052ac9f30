"""Dead-letter records: :class:`FailedEvent`, and the helpers that read and write it.

A :class:`FailedEvent` is written once per (event, handler) when the handler's
retry policy gives up, the payload cannot be decoded, or the bus stops before
delivering it.  Every store keeps them (:mod:`eventbus.dlq.store`); ``bus.dlq``
reads and replays them (:mod:`eventbus.dlq.queue`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from eventbus.events import BaseEvent, decode_event, too_deep
from eventbus.exceptions import EventDecodeError

#: Characters kept of the JSON text of an envelope nested too deeply to decode
#: (such payloads are written as text; 16 MiB: well over any broker's message size).
MAX_ENVELOPE_TEXT = 16 * 1024 * 1024
#: Envelope key of a dead letter whose payload was dropped to fit its store
#: (:func:`eventbus.dlq.cut.fit_record`).
PAYLOAD_DROPPED = "payload_dropped"


def now() -> datetime:
    """The current time, UTC (when a record or an audit entry is written)."""
    return datetime.now(UTC)


@dataclass
class FailedEvent:
    """One handler's final failure on one event.

    Attributes:
      id: Stable id of the record (the id of the failed message).
      event: The decoded event, or None when the payload could not be decoded
        (``envelope`` still holds it).  Events of a type the reading process does
        not know decode to :class:`~eventbus.events.UnknownEvent`.
      envelope: The payload exactly as it was enqueued; replay sends this.  A
        payload nested deeper than :data:`~eventbus.events.MAX_DEPTH` (it cannot
        be decoded, nor replayed) is written by :meth:`to_dict` as its JSON text.
      topic: The event's topic.
      handler: The actor name of the handler that failed.
      queue: The handler's dramatiq queue.
      attempts: How many times the handler ran.
      error: The final attempt's exception message.
      error_type: The final exception's type name.
      traceback: The final exception's formatted traceback.
      first_failed_at, last_failed_at: When the first and the last attempt failed.
      correlation_id: The correlation id of the publishing request.
      trace_id: The trace id of the publish span.
      partition, offset: Where a Kafka record came from (None elsewhere).
      replay_of: The id of the dead letter whose replay this is ("" when the event
        failed on its first delivery): a replay that failed again names the
        record it came from.
      field_errors: When the payload failed validation into the handler's class,
        each failing field: ``{"path", "expected", "got"}`` (``got`` cut and
        redacted; see :func:`eventbus.events.field_errors`); else empty.
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
    first_failed_at: datetime = field(default_factory=now)
    last_failed_at: datetime = field(default_factory=now)
    correlation_id: str = ""
    trace_id: str = ""
    partition: int | None = None
    offset: int | None = None
    #: Each failed attempt, oldest first: ``{"at": datetime, "error_type": str,
    #: "error": str}`` (the last one is the final failure; older records have none).
    attempt_log: list[dict[str, Any]] = field(default_factory=list)
    replay_of: str = ""
    field_errors: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-compatible dict (the event as its envelope).

        Safe for ``json.dumps`` whatever the envelope's depth: one too deeply
        nested is given as its JSON text.
        """
        envelope = self.envelope
        if too_deep(envelope):
            envelope = json_text(envelope)
        return {
            "id": self.id,
            "envelope": envelope,
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
            "partition": self.partition,
            "offset": self.offset,
            "attempt_log": [{**entry, "at": entry["at"].isoformat()} for entry in self.attempt_log],
            "replay_of": self.replay_of,
            "field_errors": self.field_errors,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FailedEvent:
        """Rebuild a record from :meth:`to_dict` output; the event is decoded again."""
        envelope = data.get("envelope")
        try:
            event: BaseEvent | None = decode_event(envelope)
        except EventDecodeError:
            event = None
        return cls(
            id=str(data["id"]),
            event=event,
            envelope=envelope,
            topic=str(data.get("topic", "")),
            handler=str(data.get("handler", "")),
            queue=str(data.get("queue", "")),
            attempts=int(data.get("attempts", 0)),
            error=str(data.get("error", "")),
            error_type=str(data.get("error_type", "")),
            traceback=str(data.get("traceback", "")),
            first_failed_at=parse_time(data.get("first_failed_at")),
            last_failed_at=parse_time(data.get("last_failed_at")),
            correlation_id=str(data.get("correlation_id", "")),
            trace_id=str(data.get("trace_id", "")),
            partition=_whole(data.get("partition")),
            offset=_whole(data.get("offset")),
            attempt_log=[
                {
                    "at": parse_time(entry.get("at")),
                    "error_type": str(entry.get("error_type", "")),
                    "error": str(entry.get("error", "")),
                }
                for entry in data.get("attempt_log") or []
                if isinstance(entry, dict)
            ],
            replay_of=str(data.get("replay_of") or ""),
            field_errors=[
                {
                    "path": str(entry.get("path", "")),
                    "expected": str(entry.get("expected", "")),
                    "got": str(entry.get("got", "")),
                }
                for entry in data.get("field_errors") or []
                if isinstance(entry, dict)
            ],
        )

    def matches(
        self, topic: str | None = None, handler: str | None = None, error_type: str | None = None
    ) -> bool:
        """Whether the record passes every filter that is not None."""
        return (
            (topic is None or self.topic == topic)
            and (handler is None or self.handler == handler)
            and (error_type is None or self.error_type == error_type)
        )


def newest(records: list[FailedEvent], limit: int | None) -> list[FailedEvent]:
    """The last ``limit`` of ``records`` (oldest first), all of them when None."""
    if limit is None:
        return records
    return records[-limit:] if limit > 0 else []


class _Raw(str):
    """JSON text that :func:`json_text` writes as is."""


def json_text(value: Any, limit: int = MAX_ENVELOPE_TEXT) -> str:
    """``value`` as compact JSON text, for any nesting depth (``json.dumps`` is
    recursive and fails past ~1,000 levels).  At most ``limit`` characters."""
    out: list[str] = []
    size = 0
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if type(item) is _Raw:
            piece: str = item
        elif isinstance(item, dict):
            piece = "{"
            stack.append(_Raw("}"))
            entries = list(item.items())
            for i in range(len(entries) - 1, -1, -1):
                key, child = entries[i]
                stack.append(child)
                stack.append(_Raw(("," if i else "") + json.dumps(str(key)) + ":"))
        elif isinstance(item, list | tuple):
            piece = "["
            stack.append(_Raw("]"))
            for i in range(len(item) - 1, -1, -1):
                stack.append(item[i])
                if i:
                    stack.append(_Raw(","))
        else:
            piece = json.dumps(item, default=str)
        out.append(piece)
        size += len(piece)
        if size > limit:
            return "".join(out)[:limit] + "…"
    return "".join(out)


def _whole(value: object) -> int | None:
    """``value`` when it is an integer (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def refuse_constants(name: str) -> Any:
    """``json.loads(..., parse_constant=refuse_constants)``: NaN and infinities are
    not JSON; text holding them is refused (ValueError)."""
    raise ValueError(f"{name} is not JSON (send a number, null, or a string)")


def non_finite_path(value: Any, path: str = "") -> str | None:
    """The path of a NaN or infinite float inside ``value`` (dicts and lists), or None."""
    pending: list[tuple[str, Any]] = [(path, value)]
    while pending:
        where, item = pending.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return where or "(the value)"
        if isinstance(item, dict):
            pending += [(f"{where}.{key}" if where else str(key), v) for key, v in item.items()]
        elif isinstance(item, list | tuple):
            pending += [(f"{where}[{i}]", v) for i, v in enumerate(item)]
    return None


def payload_dropped(record: FailedEvent) -> dict[str, Any] | None:
    """What a dead letter whose payload was dropped keeps of it (reason, bytes,
    sha256, event type and id), or None when the payload is there (see
    :mod:`eventbus.dlq.cut`)."""
    envelope = record.envelope
    if isinstance(envelope, dict) and len(envelope) == 1:
        kept = envelope.get(PAYLOAD_DROPPED)
        if isinstance(kept, dict):
            return kept
    return None


def parse_time(value: object) -> datetime:
    """``value`` (ISO 8601 text) as a datetime; now when it is anything else."""
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            pass
    return now()
