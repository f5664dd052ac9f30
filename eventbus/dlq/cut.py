"""Cutting a dead letter to fit a store's limit on one record.

Every durable dead-letter store has a largest record it can keep: the Redis
store a share of ``EVENTBUS_DLQ_MAX_BYTES``, the Kafka store the producer's and
the broker's record size.  Refusing a dead letter over it would lose the failure
itself (and on Kafka stall its partition, whose offset is committed only once
the dead letter is written), so :func:`fit_record` cuts it to fit, in two steps,
the same on every store:

1. the traceback and the error message keep their first and last characters
   (:data:`CUT_TRACEBACK_CHARS`, :data:`CUT_ERROR_CHARS` in all, less for a small
   limit) around a ``… [N characters cut] …`` mark (:func:`cut_text`); the event
   stays whole and replays as any other;
2. if the record is still too large, the payload is dropped: the envelope becomes
   ``{"payload_dropped": {"reason", "bytes", "sha256", "event_type",
   "event_id"}}`` (:data:`~eventbus.dlq.records.PAYLOAD_DROPPED`) and the error starts
   with the reason, ``payload dropped: N bytes over the limit of M`` (N: how far
   the record, texts cut, was over), followed by the store's hint in brackets
   when it gives one.  ``bytes`` and ``sha256`` are those of the payload as
   compact UTF-8 JSON, to find the original again.

A record whose payload was dropped cannot be replayed (``bus.dlq.replay`` refuses
it and keeps it; :func:`~eventbus.dlq.records.payload_dropped` reads what it kept);
``replay_edited`` with the event found again works.

Example::

    record, cut = fit_record(record, 100_000, lambda r, cut: len(json.dumps(r.to_dict())))
    if "payload" in cut:
        print(payload_dropped(record)["reason"])
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from eventbus.dlq.records import PAYLOAD_DROPPED, FailedEvent

#: Characters a cut traceback keeps (its first and last halves).
CUT_TRACEBACK_CHARS = 8_000
#: Characters a cut error message keeps (its first and last halves).
CUT_ERROR_CHARS = 2_000
#: Share of the limit a cut traceback may take at most (a small limit keeps less
#: than :data:`CUT_TRACEBACK_CHARS`): one character per this many bytes.
TRACEBACK_SHARE = 8
#: Share of the limit a cut error message may take at most: one character per
#: this many bytes.
ERROR_SHARE = 32

#: ``size(record, cut)``: the bytes ``record`` takes once written by a store, with
#: ``cut`` naming what was cut so far (``traceback``, ``error``, ``payload``) for a
#: store whose framing says so (the Kafka store's ``eventbus-cut`` header).
RecordSize = Callable[[FailedEvent, tuple[str, ...]], int]


def cut_text(text: str, keep: int) -> str:
    """``text`` with its middle replaced by a ``… [N characters cut] …`` mark, so
    that ``keep`` of its characters remain (its first and last halves); unchanged
    when it is not longer than that."""
    if len(text) <= keep:
        return text
    head = keep // 2
    tail = keep - head
    return f"{text[:head]} … [{len(text) - keep} characters cut] … {text[len(text) - tail :]}"


def drop_reason(over: int, limit: int, hint: str = "") -> str:
    """Why a payload was dropped: ``payload dropped: N bytes over the limit of M``,
    then `` (hint)`` when ``hint`` is given."""
    reason = f"payload dropped: {over} bytes over the limit of {limit}"
    return f"{reason} ({hint})" if hint else reason


def fit_record(
    record: FailedEvent, limit: int, size: RecordSize, hint: str = ""
) -> tuple[FailedEvent, tuple[str, ...]]:
    """``record`` cut to at most ``limit`` bytes as ``size`` counts them, and what was cut.

    Unchanged when it fits; else its texts are cut, then its payload dropped if
    that is not enough (see the module's docstring).  ``hint`` follows the reason
    in brackets: where the limit comes from, what to raise.

    Returns:
      The record, and what was cut: ``traceback``, ``error``, ``payload`` (in
      that order; empty when nothing was).  The result can still exceed a tiny
      ``limit``: ids, topic, handler and the attempt log are never cut.
    """
    over = size(record, ()) - limit
    if over <= 0:
        return record, ()
    changes: dict[str, Any] = {}
    traceback = cut_text(record.traceback, min(CUT_TRACEBACK_CHARS, limit // TRACEBACK_SHARE))
    if traceback != record.traceback:
        changes["traceback"] = traceback
    error = cut_text(record.error, min(CUT_ERROR_CHARS, limit // ERROR_SHARE))
    if error != record.error:
        changes["error"] = error
    cut = tuple(changes)
    if changes:
        record = replace(record, **changes)
        over = size(record, cut) - limit
        if over <= 0:
            return record, cut
    reason = drop_reason(over, limit, hint)
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
    return record, (*cut, "payload")
