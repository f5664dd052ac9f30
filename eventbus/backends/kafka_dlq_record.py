"""A dead letter as a Kafka record, cut to fit the record size limit.

The value of a DLQ record is :meth:`FailedEvent.to_dict` as compact JSON; its key
is the record id; its headers repeat the failure for tools that only see headers.

**Size.**  A record larger than the producer's ``max_request_size`` (or the
broker's ``message.max.bytes``) can never be written, and the failed event's
offset is committed only after its dead letter is: written as is, a large event
with a long traceback would stall its partition for good.  So
:func:`fit_dead_letter` cuts a dead letter to fit, in two steps:

1. the traceback and the error message keep their first and last characters
   (:data:`CUT_TRACEBACK_CHARS`, :data:`CUT_ERROR_CHARS` in all) around a
   ``… [N characters cut] …`` mark;
2. if the record is still too large, the payload is dropped: the envelope
   becomes ``{"payload_dropped": {"reason", "bytes", "sha256", "event_type",
   "event_id"}}`` and the error starts with the reason, ``payload dropped: N
   bytes over the limit of M``.  ``sha256`` and ``bytes`` are those of the payload
   as compact JSON: for an event eventbus published, the value of the original
   record, which stays in the event's topic until its retention deletes it.

A record whose payload was dropped cannot be replayed (``bus.dlq.replay`` refuses
it and keeps it); ``replay_edited`` with the event found again works.  The
``eventbus-cut`` header names what was cut (``traceback``, ``error``,
``payload``) and ``eventbus-payload-dropped`` repeats the reason.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Any

from ..dlq import FailedEvent

#: Headers repeating the failure on every dead-letter record.
HEADER_ERROR_TYPE = "eventbus-error-type"
HEADER_ERROR = "eventbus-error"
HEADER_HANDLER = "eventbus-handler"
HEADER_ATTEMPTS = "eventbus-attempts"
HEADER_ORIGINAL_TOPIC = "eventbus-original-topic"
HEADER_ORIGINAL_PARTITION = "eventbus-original-partition"
HEADER_ORIGINAL_OFFSET = "eventbus-original-offset"
#: On a dead letter cut to fit: what was cut, comma-separated (``traceback``,
#: ``error``, ``payload``).
HEADER_CUT = "eventbus-cut"
#: On a dead letter whose payload was dropped: why (``payload dropped: ...``).
HEADER_PAYLOAD_DROPPED = "eventbus-payload-dropped"
#: Longest error message copied into a header, in characters (the value has it all).
MAX_HEADER_ERROR = 1_000

#: Largest dead-letter record written, in bytes as the producer counts them (key,
#: value, headers and framing): aiokafka's default ``max_request_size``, which the
#: Kafka backend's producers keep (Kafka's ``message.max.bytes`` is 1,048,588).
DEFAULT_MAX_RECORD_BYTES = 1_048_576
#: Smallest limit the store goes down to when a broker refuses dead letters as too
#: large (it halves its limit for that topic each time, not below this), in bytes.
MIN_RECORD_BYTES = 64 * 1024
#: Bytes counted for the batch and record framing around key, value and headers
#: (aiokafka's own estimate stays below it).
RECORD_OVERHEAD = 512
#: Characters a cut traceback keeps: the first half and the last half.
CUT_TRACEBACK_CHARS = 8_000
#: Characters a cut error message keeps: the first half and the last half.
CUT_ERROR_CHARS = 2_000
#: Envelope key of a dead letter whose payload was dropped.
PAYLOAD_DROPPED = "payload_dropped"


def _header(text: str) -> bytes:
    # An exception's message may hold lone surrogates (a file name decoded with
    # surrogateescape): a strict encode would fail the write forever.
    return text.encode("utf-8", "backslashreplace")


def dead_letter_headers(record: FailedEvent) -> list[tuple[str, bytes]]:
    """The headers of ``record``'s DLQ record."""
    headers = [
        (HEADER_ERROR_TYPE, _header(record.error_type)),
        (HEADER_ERROR, _header(record.error[:MAX_HEADER_ERROR])),
        (HEADER_HANDLER, _header(record.handler)),
        (HEADER_ATTEMPTS, str(record.attempts).encode()),
        (HEADER_ORIGINAL_TOPIC, _header(record.topic)),
    ]
    if record.partition is not None:
        headers.append((HEADER_ORIGINAL_PARTITION, str(record.partition).encode()))
    if record.offset is not None:
        headers.append((HEADER_ORIGINAL_OFFSET, str(record.offset).encode()))
    return headers


def dead_letter_value(record: FailedEvent) -> bytes:
    """The value of ``record``'s DLQ record: its dict as compact JSON."""
    return json.dumps(record.to_dict(), separators=(",", ":"), default=str).encode()


def record_size(key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> int:
    """Bytes a record takes in a produce request, framing included (an upper bound)."""
    size = RECORD_OVERHEAD + len(key) + len(value)
    return size + sum(len(name.encode()) + len(data) for name, data in headers)


def cut_text(text: str, keep: int) -> str:
    """``text`` with its middle replaced by a ``… [N characters cut] …`` mark, so
    that ``keep`` of its characters remain (its first and last halves); unchanged
    when it is not longer than that."""
    if len(text) <= keep:
        return text
    head = keep // 2
    tail = keep - head
    return f"{text[:head]} … [{len(text) - keep} characters cut] … {text[len(text) - tail :]}"


def payload_dropped(record: FailedEvent) -> dict[str, Any] | None:
    """What a dead letter whose payload was dropped keeps of it (reason, bytes,
    sha256, event type and id), or None when the payload is there."""
    envelope = record.envelope
    if isinstance(envelope, dict) and len(envelope) == 1:
        kept = envelope.get(PAYLOAD_DROPPED)
        if isinstance(kept, dict):
            return kept
    return None


@dataclass(frozen=True, slots=True)
class Fitted:
    """A dead letter ready to write.

    Attributes:
      record: The dead letter as written (cut when ``cut`` is not empty).
      value, headers: Its record's value and headers.
      size: The record's size, as :func:`record_size` counts it.
      cut: What was cut: ``traceback``, ``error``, ``payload`` (in that order).
    """

    record: FailedEvent
    value: bytes
    headers: list[tuple[str, bytes]]
    size: int
    cut: tuple[str, ...] = ()

    @property
    def dropped(self) -> str | None:
        """Why the payload was dropped, or None when it was kept."""
        kept = payload_dropped(self.record) if "payload" in self.cut else None
        return str(kept["reason"]) if kept is not None else None


def _encode(record: FailedEvent, cut: tuple[str, ...], reason: str | None = None) -> Fitted:
    value = dead_letter_value(record)
    headers = dead_letter_headers(record)
    if cut:
        headers.append((HEADER_CUT, ",".join(cut).encode()))
    if reason is not None:
        headers.append((HEADER_PAYLOAD_DROPPED, reason.encode()))
    return Fitted(record, value, headers, record_size(record.id.encode(), value, headers), cut)


def fit_dead_letter(record: FailedEvent, limit: int) -> Fitted:
    """``record`` as a DLQ record of at most ``limit`` bytes (see the module's
    docstring): unchanged when it fits, else with its traceback and error cut,
    else with its payload dropped too.

    The result can still exceed a ``limit`` far below :data:`MIN_RECORD_BYTES`
    (ids, attempt log and headers are never cut): check :attr:`Fitted.size`.
    """
    fitted = _encode(record, ())
    if fitted.size <= limit:
        return fitted
    changes: dict[str, Any] = {}
    traceback = cut_text(record.traceback, min(CUT_TRACEBACK_CHARS, limit // 8))
    if traceback != record.traceback:
        changes["traceback"] = traceback
    error = cut_text(record.error, min(CUT_ERROR_CHARS, limit // 32))
    if error != record.error:
        changes["error"] = error
    if changes:
        record = replace(record, **changes)
        fitted = _encode(record, tuple(changes))
        if fitted.size <= limit:
            return fitted
    reason = f"payload dropped: {fitted.size - limit} bytes over the limit of {limit}"
    payload = json.dumps(
        record.to_dict()["envelope"], separators=(",", ":"), ensure_ascii=False, default=str
    ).encode("utf-8", "surrogatepass")
    envelope = record.envelope
    event = envelope.get("event") if isinstance(envelope, dict) else None
    kept = {
        "reason": reason,
        "bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "event_type": str(envelope.get("type", "")) if isinstance(envelope, dict) else "",
        "event_id": str(event.get("event_id", "")) if isinstance(event, dict) else "",
    }
    record = replace(
        record, envelope={PAYLOAD_DROPPED: kept}, event=None, error=f"{reason}; {record.error}"
    )
    return _encode(record, (*changes, "payload"), reason)


def too_large(exc: BaseException) -> bool:
    """Whether ``exc`` is the producer or the broker refusing a record as too large
    (a smaller record would be accepted; anything else may pass by retrying)."""
    from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError

    return isinstance(exc, MessageSizeTooLargeError | RecordListTooLargeError)
