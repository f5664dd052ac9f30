"""Dead letters: events a handler failed on for good, kept to inspect, replay or purge.

A :class:`FailedEvent` is written once per (event, handler) when the handler's
retry policy gives up, the payload cannot be decoded, or the bus stops before
delivering it.  ``bus.dlq`` is a :class:`DeadLetterQueue` over the backend's
store: in memory for the embedded backend (bounded, oldest evicted and counted),
Redis or a Kafka topic for the durable backends.

Example::

    for f in bus.dlq.peek(limit=20, topic="user.created"):
        print(f.id, f.handler, f.attempts, f.error_type, f.error)
    bus.dlq.replay([f.id for f in failed])      # the failed handler only, fresh retries
    bus.dlq.purge(error_type="ValidationError")
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar, runtime_checkable

from eventbus.events import BaseEvent, decode_event, too_deep
from eventbus.exceptions import EventDecodeError

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Records listed by ``peek`` when no limit is given.
DEFAULT_PEEK_LIMIT = 10
#: Characters kept of the JSON text of an envelope nested too deeply to decode
#: (such payloads are written as text; 16 MiB: well over any broker's message size).
MAX_ENVELOPE_TEXT = 16 * 1024 * 1024
#: Audit entries a store keeps; older ones are dropped.
DEFAULT_AUDIT_SIZE = 10_000
#: Record ids written into one audit entry (the count says how many there were).
MAX_AUDIT_IDS = 100
#: Envelope key of a dead letter whose payload was dropped to fit its store
#: (:func:`eventbus.dlq.cut.fit_record`).
PAYLOAD_DROPPED = "payload_dropped"

#: :attr:`AuditEntry.status` of the entry written before an action runs.
STARTED = "started"
#: :attr:`AuditEntry.status` of the entry written after an action ran to its end.
DONE = "done"
#: :attr:`AuditEntry.status` of the entry written after an action stopped on an error.
FAILED = "failed"


def _now() -> datetime:
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
    partition: int | None = None
    offset: int | None = None
    #: Each failed attempt, oldest first: ``{"at": datetime, "error_type": str,
    #: "error": str}`` (the last one is the final failure; older records have none).
    attempt_log: list[dict[str, Any]] = field(default_factory=list)

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
            first_failed_at=_parse_time(data.get("first_failed_at")),
            last_failed_at=_parse_time(data.get("last_failed_at")),
            correlation_id=str(data.get("correlation_id", "")),
            trace_id=str(data.get("trace_id", "")),
            partition=_whole(data.get("partition")),
            offset=_whole(data.get("offset")),
            attempt_log=[
                {
                    "at": _parse_time(entry.get("at")),
                    "error_type": str(entry.get("error_type", "")),
                    "error": str(entry.get("error", "")),
                }
                for entry in data.get("attempt_log") or []
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


def _count(value: object) -> int:
    """``value`` as a count: an integer, or the integer a finite number or digits
    name; 0 for anything else (a forged ``Infinity``, text)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return int(value)
    return 0


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


def _parse_time(value: object) -> datetime:
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            pass
    return _now()


@dataclass(frozen=True)
class AuditEntry:
    """One action taken on dead letters: who did what, when, to which records.

    A bulk action writes two entries with the same ``action_id``: one with status
    :data:`STARTED` before it changes anything (``count``: the records selected),
    and one with status :data:`DONE` (or :data:`FAILED`, when it stopped on an
    error) after (``count``: the records it replayed or purged; ``failed``: those
    it could not).  A started entry without its completion is an action that was
    interrupted (its process died) or is still running.  Entries written before
    there were two (no ``action_id``) read as :data:`DONE`.

    Attributes:
      at: When (UTC).
      who: The person or client, as the console's auth dependency named it.
      action: ``replay``, ``replay-edited`` or ``purge``.
      count: Records selected (started) or touched (done, failed).
      ids: Their ids, at most :data:`MAX_AUDIT_IDS` of them.
      detail: What was selected and what came of it, in words.
      action_id: Pairs a started entry with its completion.
      status: :data:`STARTED`, :data:`DONE` or :data:`FAILED`.
      failed: Records the action could not replay (they stay).
    """

    at: datetime
    who: str
    action: str
    count: int
    ids: tuple[str, ...] = ()
    detail: str = ""
    action_id: str = ""
    status: str = DONE
    failed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The entry as a JSON-compatible dict."""
        return {
            "at": self.at.isoformat(),
            "who": self.who,
            "action": self.action,
            "count": self.count,
            "ids": list(self.ids),
            "detail": self.detail,
            "action_id": self.action_id,
            "status": self.status,
            "failed": self.failed,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditEntry:
        """Rebuild an entry from :meth:`to_dict` output."""
        ids = data.get("ids")
        return cls(
            at=_parse_time(data.get("at")),
            who=str(data.get("who", "")),
            action=str(data.get("action", "")),
            count=_count(data.get("count")),
            ids=tuple(str(i) for i in ids) if isinstance(ids, list) else (),
            detail=str(data.get("detail", "")),
            action_id=str(data.get("action_id") or ""),
            status=str(data.get("status") or DONE),
            failed=_count(data.get("failed")),
        )


@runtime_checkable
class AuditLog(Protocol):
    """Where the actions taken on dead letters are kept.  Safe across threads."""

    #: True when calls do network I/O (callers on an event loop use a thread).
    blocking: bool

    def append(self, entry: AuditEntry) -> None:
        """Keep ``entry``."""
        ...

    def entries(self, limit: int = 50) -> list[AuditEntry]:
        """The newest ``limit`` entries, newest first."""
        ...


class MemoryAuditLog:
    """The newest ``max_size`` audit entries, in memory (gone with the process)."""

    blocking = False

    def __init__(self, max_size: int = DEFAULT_AUDIT_SIZE) -> None:
        self._entries: deque[AuditEntry] = deque(maxlen=max_size)
        self._lock = threading.Lock()

    def append(self, entry: AuditEntry) -> None:
        with self._lock:
            self._entries.append(entry)

    def entries(self, limit: int = 50) -> list[AuditEntry]:
        with self._lock:
            newest_first = list(reversed(self._entries))
        return newest_first[: max(limit, 0)]


@runtime_checkable
class AuditedStore(Protocol):
    """A store that keeps an audit trail of the actions taken on its records."""

    @property
    def audit(self) -> AuditLog: ...


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


class MemoryDeadLetterStore:
    """Keeps the newest ``max_size`` dead letters in memory.

    Parameters:
      max_size: Records kept; adding one more evicts the oldest and counts it in
        ``evicted``.

    Its :attr:`audit` trail lives (and dies) with it, in memory.
    """

    blocking = False

    def __init__(self, max_size: int = 10_000) -> None:
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


@dataclass
class ReplayResult:
    """What :meth:`DeadLetterQueue.replay` did.

    Attributes:
      replayed: Ids whose event was re-enqueued (and whose record is gone).
      missing: Ids with no record (already replayed, purged, or never there).
      failed: Ids whose replay could not be enqueued or was refused (the payload
        is not an event envelope), with the reason; their records are still in
        the store.
    """

    replayed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


Replayer = Callable[[FailedEvent], None]

_MIXED_SELECTION = (
    "give either record ids or filters (topic, handler, error_type) or all_records=True, "
    "not several"
)


class DeadLetterQueue:
    """``bus.dlq``: inspect, replay and purge dead letters.

    ``peek``, ``size``, ``get``, ``replay`` and ``purge`` have an async twin
    prefixed ``a`` (``await bus.dlq.areplay(ids)``) for use inside endpoints; for
    network-backed stores it runs in a thread so the event loop never blocks.

    Parameters:
      store: Where the records are.
      replayer: Enqueues a record's event for its handler again (the bus provides it).
    """

    def __init__(self, store: DeadLetterStore, replayer: Replayer | None = None) -> None:
        self.store = store
        self._replayer = replayer

    # -- reading -----------------------------------------------------------------

    def peek(
        self,
        limit: int = DEFAULT_PEEK_LIMIT,
        *,
        topic: str | None = None,
        handler: str | None = None,
        error_type: str | None = None,
    ) -> list[FailedEvent]:
        """The newest ``limit`` records matching the filters, oldest first."""
        return self.store.find(limit, topic=topic, handler=handler, error_type=error_type)

    def size(
        self,
        *,
        topic: str | None = None,
        handler: str | None = None,
        error_type: str | None = None,
    ) -> int:
        """How many records there are (matching the filters, when given)."""
        if topic is None and handler is None and error_type is None:
            return self.store.size()
        return len(self.store.find(None, topic=topic, handler=handler, error_type=error_type))

    def get(self, record_id: str) -> FailedEvent | None:
        """The record with ``record_id``, or None."""
        return self.store.get(record_id)

    @property
    def evicted(self) -> int:
        """Records the store dropped to stay within its bound."""
        return int(getattr(self.store, "evicted", 0))

    # -- acting ------------------------------------------------------------------

    def _select(
        self,
        ids: Iterable[str] | None,
        topic: str | None,
        handler: str | None,
        error_type: str | None,
        all_records: bool,
    ) -> list[str]:
        filtered = topic is not None or handler is not None or error_type is not None
        if ids is not None:
            if isinstance(ids, str):
                raise TypeError("pass a list of record ids, not a single string")
            if filtered or all_records:
                raise ValueError(_MIXED_SELECTION)
            return list(dict.fromkeys(ids))
        if all_records:
            if filtered:
                raise ValueError(_MIXED_SELECTION)
            return [r.id for r in self.store.find(None)]
        if not filtered:
            raise ValueError("give record ids or at least one filter (use all_records=True)")
        return [
            r.id for r in self.store.find(None, topic=topic, handler=handler, error_type=error_type)
        ]

    def replay(
        self,
        ids: Iterable[str] | None = None,
        *,
        topic: str | None = None,
        handler: str | None = None,
        error_type: str | None = None,
        all_records: bool = False,
    ) -> ReplayResult:
        """Send dead events back to the handler that failed on them, with fresh retries.

        Each record is claimed (hidden from concurrent replays), its event
        enqueued for its handler only, and then deleted: replaying the same id
        twice delivers once, and a failure midway leaves the record in place.
        A record whose payload is not an event envelope (``event`` is None) is
        refused and kept: it lands in ``failed`` with the reason.

        Parameters:
          ids: Record ids; or select by ``topic`` / ``handler`` / ``error_type``, or
            ``all_records=True``.

        Raises:
          ValueError: Nothing selected, or ids together with filters or
            ``all_records`` (which of them was meant is not guessed).
        """
        if self._replayer is None:
            raise RuntimeError("this dead-letter queue is not attached to a bus; cannot replay")
        result = ReplayResult()
        for record_id in self._select(ids, topic, handler, error_type, all_records):
            record = self.store.claim(record_id)
            if record is None:
                result.missing.append(record_id)
                continue
            if record.event is None:
                # Its handler would fail on it again, under a new id and another reason.
                self.store.release(record)
                result.failed[record_id] = (
                    "cannot be replayed: its payload is not an event envelope "
                    f"({record.error_type}: {record.error}); inspect it, then purge it"
                )
                continue
            try:
                self._replayer(record)
            except Exception as exc:
                self.store.release(record)
                result.failed[record_id] = f"{type(exc).__name__}: {exc}"
                logger.warning("Replay of dead letter %s failed: %s", record_id, exc)
                continue
            self.store.complete(record_id)
            result.replayed.append(record_id)
        return result

    def replay_edited(self, record_id: str, envelope: dict[str, Any]) -> ReplayResult:
        """Replay one record with ``envelope`` instead of the payload it failed on.

        The record is claimed, the edited event enqueued for its handler, and the
        record deleted, as with :meth:`replay`.  Validate ``envelope`` first
        (against the handler's event class when the process knows it): it is only
        checked here to be an event envelope.

        Raises:
          EventDecodeError: ``envelope`` is not an event envelope (nothing is done).
          ValueError: ``envelope`` holds NaN or an infinite number, which JSON
            cannot carry, as ``publish`` refuses it (nothing is done).
        """
        if self._replayer is None:
            raise RuntimeError("this dead-letter queue is not attached to a bus; cannot replay")
        where = non_finite_path(envelope)
        if where is not None:
            raise ValueError(
                f"the edited envelope holds NaN or Infinity at {where}, which JSON cannot "
                "carry: send None, or the value as a string"
            )
        event = decode_event(envelope)
        result = ReplayResult()
        record = self.store.claim(record_id)
        if record is None:
            result.missing.append(record_id)
            return result
        try:
            self._replayer(replace(record, envelope=envelope, event=event))
        except Exception as exc:
            self.store.release(record)
            result.failed[record_id] = f"{type(exc).__name__}: {exc}"
            logger.warning("Replay of edited dead letter %s failed: %s", record_id, exc)
            return result
        self.store.complete(record_id)
        result.replayed.append(record_id)
        return result

    def purge(
        self,
        ids: Iterable[str] | None = None,
        *,
        topic: str | None = None,
        handler: str | None = None,
        error_type: str | None = None,
        all_records: bool = False,
    ) -> int:
        """Delete records by id, by filter, or all of them; returns how many went.

        Raises:
          ValueError: Nothing selected, or ids together with filters or
            ``all_records`` (which of them was meant is not guessed).
        """
        if all_records and ids is None:
            self._select(ids, topic, handler, error_type, all_records)  # no filters
            count = self.store.size()
            self.store.clear()
            return count
        removed = 0
        for record_id in self._select(ids, topic, handler, error_type, all_records):
            if self.store.remove(record_id) is not None:
                removed += 1
        return removed

    def clear(self) -> None:
        """Delete every record."""
        self.store.clear()

    # -- async twins ----------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self.store.blocking:
            return await asyncio.to_thread(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    async def apeek(self, limit: int = DEFAULT_PEEK_LIMIT, **filters: Any) -> list[FailedEvent]:
        """Async :meth:`peek`."""
        return await self._call(self.peek, limit, **filters)

    async def asize(self, **filters: Any) -> int:
        """Async :meth:`size`."""
        return await self._call(self.size, **filters)

    async def aget(self, record_id: str) -> FailedEvent | None:
        """Async :meth:`get`."""
        return await self._call(self.get, record_id)

    async def areplay(self, ids: Iterable[str] | None = None, **filters: Any) -> ReplayResult:
        """Async :meth:`replay`."""
        return await self._call(self.replay, ids, **filters)

    async def apurge(self, ids: Iterable[str] | None = None, **filters: Any) -> int:
        """Async :meth:`purge`."""
        return await self._call(self.purge, ids, **filters)
