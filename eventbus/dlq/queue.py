"""``bus.dlq``: the :class:`DeadLetterQueue` that inspects, replays and purges dead
letters over the backend's store.

Example::

    for f in bus.dlq.peek(limit=20, topic="user.created"):
        print(f.id, f.handler, f.attempts, f.error_type, f.error)
    bus.dlq.replay([f.id for f in failed])      # the failed handler only, fresh retries
    bus.dlq.purge(error_type="ValidationError")
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from eventbus.dlq.records import FailedEvent, non_finite_path
from eventbus.dlq.store import (
    DEFAULT_PEEK_LIMIT,
    CountsEvictions,
    DeadLetterStore,
    ReadsMany,
    TracksReplays,
)
from eventbus.events import decode_event

logger = logging.getLogger(__name__)

T = TypeVar("T")


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


#: ``replayer(record)`` or ``replayer(record, handler)``: enqueue the record's event
#: for its handler, or for ``handler`` (the backend's ``replay``).
Replayer = Callable[..., None]
#: ``refusal(record, handler)``: why a replay would be refused now, or None.
RefusalCheck = Callable[[FailedEvent, "str | None"], "str | None"]
#: ``refusals(records, handler)``: :data:`RefusalCheck` of many records at once.
RefusalsCheck = Callable[["list[FailedEvent]", "str | None"], "list[str | None]"]
#: ``targets(record)``: the handlers a record may be replayed to, or None (unknown).
TargetList = Callable[[FailedEvent], "list[str] | None"]

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
      refusal: Says why a replay would be refused now (the backend's
        ``replay_refusal``), for dry runs.
      targets: Lists the handlers a record may be replayed to (the backend's
        ``replay_targets``).
      refusals: ``refusal`` of many records at once (the backend's
        ``replay_refusals``).
    """

    def __init__(
        self,
        store: DeadLetterStore,
        replayer: Replayer | None = None,
        *,
        refusal: RefusalCheck | None = None,
        targets: TargetList | None = None,
        refusals: RefusalsCheck | None = None,
    ) -> None:
        self.store = store
        self._replayer = replayer
        self._refusal = refusal
        self._refusals = refusals
        self._targets = targets

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
        store = self.store
        return store.evicted if isinstance(store, CountsEvictions) else 0

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
        to_handler: str | None = None,
    ) -> ReplayResult:
        """Send dead events back to the handler that failed on them, with fresh retries.

        Each record is claimed (hidden from concurrent replays), its event
        enqueued for its handler only, and then deleted: replaying the same id
        twice delivers once, and a failure midway leaves the record in place.
        A record whose payload is not an event envelope (``event`` is None) is
        refused and kept: it lands in ``failed`` with the reason.

        "Replayed" means queued again: whether the handler then succeeds shows
        later (a replay that fails again becomes a new record whose ``replay_of``
        names this one; :meth:`replayed_as` finds it).

        Parameters:
          ids: Record ids; or select by ``topic`` / ``handler`` / ``error_type``, or
            ``all_records=True``.
          to_handler: Deliver to this handler (actor name) of the same topic and
            service instead of the one that failed: the new name of a renamed
            handler.

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
                if to_handler is None:
                    self._replayer(record)
                else:
                    self._replayer(record, to_handler)
            except Exception as exc:
                self.store.release(record)
                result.failed[record_id] = f"{type(exc).__name__}: {exc}"
                logger.warning("Replay of dead letter %s failed: %s", record_id, exc)
                continue
            self.store.complete(record_id)
            result.replayed.append(record_id)
        return result

    def refusal(self, record: FailedEvent, to_handler: str | None = None) -> str | None:
        """Why :meth:`replay` of ``record`` (to ``to_handler``) would be refused now,
        or None when it would be queued: the checks the replay makes, without
        replaying (a dry run).  Blocking; raises when the backend cannot be reached."""
        if record.event is None:
            return "its payload is not an event envelope: inspect it, then purge it"
        if self._refusal is None:
            return None
        return self._refusal(record, to_handler)

    def get_many(self, ids: list[str]) -> list[FailedEvent | None]:
        """The record of each of ``ids`` (None where there is none), in order: one
        round trip per chunk on stores that can (:class:`~eventbus.dlq.store.ReadsMany`)."""
        if isinstance(self.store, ReadsMany):
            return self.store.get_many(ids)
        return [self.store.get(record_id) for record_id in ids]

    def refusals(
        self, records: list[FailedEvent], to_handler: str | None = None
    ) -> list[str | None]:
        """:meth:`refusal` of each of ``records``, the backend asked in one batch."""
        reasons: list[str | None] = [
            None if r.event is not None else self.refusal(r, to_handler) for r in records
        ]
        asked = [r for r, why in zip(records, reasons, strict=True) if why is None]
        if asked and self._refusals is not None:
            answers = iter(self._refusals(asked, to_handler))
            reasons = [why if why is not None else next(answers) for why in reasons]
        elif asked and self._refusal is not None:
            reasons = [
                why if why is not None else self._refusal(r, to_handler)
                for r, why in zip(records, reasons, strict=True)
            ]
        return reasons

    def targets(self, record: FailedEvent) -> list[str] | None:
        """The handlers ``record`` may be replayed to (its topic's, in its service),
        or None when the backend cannot list them."""
        return self._targets(record) if self._targets is not None else None

    def replayed_as(self, ids: list[str]) -> dict[str, str]:
        """``{old id: new id}`` for those of ``ids`` (replayed records) whose replay
        failed again into a record still stored.  Stores that keep an index
        (:class:`~eventbus.dlq.store.TracksReplays`) answer from it; others are
        scanned."""
        if isinstance(self.store, TracksReplays):
            return self.store.replayed_as(ids)
        wanted = set(ids)
        return {r.replay_of: r.id for r in self.store.find(None) if r.replay_of in wanted}

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
