"""Where dead letters live: the :class:`DeadLetterStore` protocol every backend's
store implements, the optional :class:`CountsEvictions`, and
:class:`MemoryDeadLetterStore` (the embedded backend's, bounded, in memory).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Protocol, runtime_checkable

from eventbus.config import DEFAULT_DLQ_MAX_SIZE
from eventbus.dlq.audit_log import MemoryAuditLog
from eventbus.dlq.records import FailedEvent, newest

#: Records listed by ``peek`` when no limit is given.
DEFAULT_PEEK_LIMIT = 10


@runtime_checkable
class DeadLetterStore(Protocol):
    """Where dead letters live.  Implementations must be safe across threads.

    ``claim`` / ``release`` / ``complete`` make replay safe: a claimed record is
    hidden from other replays; ``complete`` deletes it once its replay is enqueued,
    ``release`` puts it back when enqueueing failed.  A durable store must bring a
    claimed record back by itself if its claimer died before completing.
    """

    #: True when calls do network I/O (async wrappers then run them in a thread).
    blocking: bool

    def add(self, record: FailedEvent) -> None: ...

    def find(
        self,
        limit: int | None = DEFAULT_PEEK_LIMIT,
        *,
        topic: str | None = None,
        handler: str | None = None,
        error_type: str | None = None,
    ) -> list[FailedEvent]:
        """Matching records, newest last; at most ``limit`` (the newest), None for all."""
        ...

    def get(self, record_id: str) -> FailedEvent | None: ...

    def remove(self, record_id: str) -> FailedEvent | None: ...

    def size(self) -> int: ...

    def clear(self) -> None: ...

    def claim(self, record_id: str) -> FailedEvent | None: ...

    def release(self, record: FailedEvent) -> None: ...

    def complete(self, record_id: str) -> None: ...


@runtime_checkable
class CountsEvictions(Protocol):
    """A store that drops its oldest records to stay within a bound, and counts them
    (``bus.dlq.evicted``).  A store without a bound, or whose broker drops records
    without telling (Kafka's retention), does not implement it."""

    @property
    def evicted(self) -> int:
        """Records dropped to stay within the bound, since the store was created."""
        ...


@runtime_checkable
class ReadsMany(Protocol):
    """A store that reads many records in one round trip (dry runs check thousands)."""

    def get_many(self, ids: list[str]) -> list[FailedEvent | None]:
        """The record of each of ``ids`` (None where there is none), in order."""
        ...


@runtime_checkable
class TracksReplays(Protocol):
    """A store that finds, by index, the record a replayed event became when it
    failed again (its :attr:`~eventbus.dlq.records.FailedEvent.replay_of` names the
    replayed record).  Stores without it are scanned (:meth:`DeadLetterQueue.replayed_as`)."""

    def replayed_as(self, ids: list[str]) -> dict[str, str]:
        """``{old id: new id}`` for those of ``ids`` whose replay failed again and
        whose new record is still stored."""
        ...


class MemoryDeadLetterStore:
    """Keeps the newest ``max_size`` dead letters in memory.

    Parameters:
      max_size: Records kept; adding one more evicts the oldest and counts it in
        ``evicted``.

    Its :attr:`audit` trail lives (and dies) with it, in memory.
    """

    blocking = False

    def __init__(self, max_size: int = DEFAULT_DLQ_MAX_SIZE) -> None:
        self.max_size = max_size
        self.evicted = 0
        #: Actions taken on these records (the console writes it).
        self.audit = MemoryAuditLog()
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

    def find(
        self,
        limit: int | None = DEFAULT_PEEK_LIMIT,
        *,
        topic: str | None = None,
        handler: str | None = None,
        error_type: str | None = None,
    ) -> list[FailedEvent]:
        with self._lock:
            records = [r for r in self._records.values() if r.matches(topic, handler, error_type)]
        return newest(records, limit)

    def peek(self, limit: int = DEFAULT_PEEK_LIMIT) -> list[FailedEvent]:
        """The ``limit`` newest records, oldest first."""
        return self.find(limit)

    def get(self, record_id: str) -> FailedEvent | None:
        with self._lock:
            return self._records.get(record_id)

    def remove(self, record_id: str) -> FailedEvent | None:
        with self._lock:
            return self._records.pop(record_id, None)

    def size(self) -> int:
        with self._lock:
            return len(self._records)

    def clear(self) -> None:
        with self._lock:
            self._records.clear()

    def claim(self, record_id: str) -> FailedEvent | None:
        return self.remove(record_id)

    def release(self, record: FailedEvent) -> None:
        self.add(record)

    def complete(self, record_id: str) -> None:
        pass
