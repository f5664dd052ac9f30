"""A dead letter as a Kafka record, cut to fit the record size limit.

The value of a DLQ record is :meth:`FailedEvent.to_dict` as compact JSON; its key
is the record id; its headers repeat the failure for tools that only see headers.

**Size.**  A record larger than the producer's ``max_request_size`` (or the
broker's ``message.max.bytes``) can never be written, and the failed event's
offset is committed only after its dead letter is: written as is, a large event
with a long traceback would stall its partition for good.  So
:func:`fit_dead_letter` cuts a dead letter to fit by the rules every dead-letter
store shares (:func:`eventbus.dlq.cut.fit_record`): its traceback and error
first, then its payload, whose reason reads ``payload dropped: N bytes over the
limit of M`` followed by a hint (:data:`DROP_HINT`, :data:`DROP_HINT_LOWERED`).
What is Kafka's own: the size counted is the whole record's, headers and framing
included (:func:`record_size`), and ``sha256`` and ``bytes`` of a dropped payload
are, for an event eventbus published, those of the value of the original record,
which stays in the event's topic until its retention deletes it.

A record whose payload was dropped cannot be replayed (``bus.dlq.replay`` refuses
it and keeps it); ``replay_edited`` with the event found again works.  The
``eventbus-cut`` header names what was cut (``traceback``, ``error``,
``payload``) and ``eventbus-payload-dropped`` repeats the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from eventbus.dlq.cut import fit_record
from eventbus.dlq.records import FailedEvent, payload_dropped

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
#: Follows the reason of a dead letter whose payload was dropped to fit the limit.
DROP_HINT = "the largest Kafka dead-letter record; the original stays in the event topic"
#: The same, once the broker refused a larger record and the limit was lowered.
DROP_HINT_LOWERED = (
    "the DLQ topic limit, lowered after the broker refused a larger record; "
    "the original stays in the event topic"
)


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


def _encode(record: FailedEvent, cut: tuple[str, ...]) -> Fitted:
    value = dead_letter_value(record)
    headers = dead_letter_headers(record)
    if cut:
        headers.append((HEADER_CUT, ",".join(cut).encode()))
    kept = payload_dropped(record) if "payload" in cut else None
    if kept is not None:
        headers.append((HEADER_PAYLOAD_DROPPED, _header(str(kept["reason"]))))
    return Fitted(record, value, headers, record_size(record.id.encode(), value, headers), cut)


def fit_dead_letter(record: FailedEvent, limit: int, hint: str = DROP_HINT) -> Fitted:
    """``record`` as a DLQ record of at most ``limit`` bytes, headers and framing
    included: unchanged when it fits, else cut by
    :func:`~eventbus.dlq.cut.fit_record` (``hint`` follows the reason of a
    dropped payload).

    The result can still exceed a ``limit`` far below :data:`MIN_RECORD_BYTES`
    (ids, attempt log and headers are never cut): check :attr:`Fitted.size`.
    """
    encoded: list[Fitted] = []

    def size(candidate: FailedEvent, cut: tuple[str, ...]) -> int:
        encoded.append(_encode(candidate, cut))
        return encoded[-1].size

    record, cut = fit_record(record, limit, size, hint)
    last = encoded[-1]
    return last if last.record is record and last.cut == cut else _encode(record, cut)


def too_large(exc: BaseException) -> bool:
    """Whether ``exc`` is the producer or the broker refusing a record as too large
    (a smaller record would be accepted; anything else may pass by retrying)."""
    from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError

    return isinstance(exc, MessageSizeTooLargeError | RecordListTooLargeError)
