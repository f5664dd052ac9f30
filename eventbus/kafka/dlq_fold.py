"""The dead letters a DLQ topic holds, folded from its records.

A DLQ topic is a log: dead-letter records, then markers that remove, claim or
release them.  :class:`DeadLetterFold` applies them one at a time; a record and
its markers share a key and a partition, and Kafka keeps a partition in offset
order, so applying each partition's records in the order they are read gives the
state the writers meant, whatever their clocks say.  Producer timestamps only
order the listing and date claims.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from eventbus.dlq.records import FailedEvent

if TYPE_CHECKING:
    from aiokafka import ConsumerRecord

logger = logging.getLogger(__name__)

#: Header naming a marker's operation: ``remove``, ``claim`` or ``release``.
HEADER_OP = "eventbus-dlq-op"

Op = Literal["remove", "claim", "release"]
OPS: tuple[Op, ...] = ("remove", "claim", "release")


@dataclass(slots=True)
class Entry:
    """A live dead letter and where its record is.

    Attributes:
      record: The dead letter.
      topic, partition, offset: Its record in the DLQ topic (markers go to the
        same partition).
      timestamp: The record's timestamp, in milliseconds (orders the listing).
      claimed_at: Seconds since the epoch of the claim hiding it, if any.
    """

    record: FailedEvent
    topic: str
    partition: int
    offset: int
    timestamp: int
    claimed_at: float | None = None

    def visible(self, now: float, claim_timeout: float) -> bool:
        """Whether no live claim hides it."""
        return self.claimed_at is None or now - self.claimed_at > claim_timeout


def marker_value(record_id: str, op: Op, at: float) -> bytes:
    """The value of a marker record: never null, so compaction never takes it for a
    tombstone."""
    return json.dumps({"op": op, "id": record_id, "at": at}, separators=(",", ":")).encode()


class DeadLetterFold:
    """The live dead letters of some DLQ topics, in memory.

    Not thread-safe: one owner (the view's event loop) applies and reads.
    """

    def __init__(self) -> None:
        #: Records read from the DLQ topics so far (each once).
        self.records_read = 0
        self._live: dict[str, Entry] = {}
        self._claimed: set[str] = set()
        self._ordered: list[Entry] | None = None

    def apply(self, rec: ConsumerRecord) -> None:
        """Fold in one record read from a DLQ topic."""
        self.records_read += 1
        key = bytes(rec.key).decode("utf-8", "replace") if rec.key else ""
        op = b""
        for name, value in rec.headers or ():
            if name == HEADER_OP:
                op = bytes(value)
        if op:
            for known in OPS:
                if op == known.encode():
                    self.mark(key, known, rec.timestamp / 1000)
            return
        if rec.value is None:
            return
        try:
            record = FailedEvent.from_dict(json.loads(rec.value))
        except Exception as exc:  # any value: a reader never stops on one record
            logger.warning(
                "Skipping unreadable dead letter %s[%d]@%d: %s: %s",
                rec.topic,
                rec.partition,
                rec.offset,
                type(exc).__name__,
                exc,
            )
            return
        self.put(Entry(record, rec.topic, rec.partition, rec.offset, rec.timestamp))

    def put(self, entry: Entry) -> None:
        """Add (or replace) a dead letter."""
        self._live.pop(entry.record.id, None)
        self._live[entry.record.id] = entry
        self._claimed.discard(entry.record.id)
        self._ordered = None

    def mark(self, record_id: str, op: Op, at: float) -> None:
        """Apply a marker: ``remove``, ``claim`` (at ``at``, epoch seconds) or ``release``."""
        if op == "remove":
            if self._live.pop(record_id, None) is not None:
                self._ordered = None
            self._claimed.discard(record_id)
            return
        entry = self._live.get(record_id)
        if entry is None:
            return
        if op == "claim":
            entry.claimed_at = at
            self._claimed.add(record_id)
        else:
            entry.claimed_at = None
            self._claimed.discard(record_id)

    def entry(self, record_id: str) -> Entry | None:
        """The live dead letter ``record_id`` (claimed or not)."""
        return self._live.get(record_id)

    def entries(self) -> list[Entry]:
        """Every live dead letter, oldest first (by record timestamp)."""
        if self._ordered is None:
            self._ordered = sorted(
                self._live.values(), key=lambda e: (e.timestamp, e.topic, e.partition, e.offset)
            )
        return self._ordered

    def visible(self, now: float, claim_timeout: float) -> list[FailedEvent]:
        """The dead letters no live claim hides, oldest first."""
        return [e.record for e in self.entries() if e.visible(now, claim_timeout)]

    def count(self, now: float, claim_timeout: float) -> int:
        """How many dead letters no live claim hides."""
        live = self._live
        hidden = sum(1 for i in self._claimed if not live[i].visible(now, claim_timeout))
        return len(live) - hidden

    def __len__(self) -> int:
        return len(self._live)
