"""What becomes of each row of an outbox batch: sent, kept, or set aside.

The relay (:mod:`eventbus.outbox.relay`) takes a batch of rows in a transaction
and hands them to a :class:`BatchSender`, which decides each row's fate so that
no row stalls the others:

- A row that is not what eventbus writes (:mod:`eventbus.outbox.rows`) is to be
  set aside with the reason (:mod:`eventbus.outbox.dead`).
- When the backend refuses a batch, its rows are sent one at a time.  A row
  refused while the backend takes others (or reports itself healthy) waits,
  with the later rows of its partition key, :data:`REFUSED_BACKOFF` seconds
  (doubled per refusal); refused :data:`REFUSALS_TO_SET_ASIDE` times, it is set
  aside.  When nothing goes through (the backend is down), :class:`BackendDown`
  is raised: every row stays and the relay retries with backoff.
- A row whose topic has no subscription is kept, never deleted, and never
  handed to the backend: rows are published strictly (the backend writes
  nothing of a topic nobody subscribes and names it), so the row stays the one
  copy of its event even where the backend would keep unrouted events itself.
  The topic waits :data:`UNROUTED_BACKOFF` seconds (doubled up to
  :data:`MAX_UNROUTED_BACKOFF`) and is tried again; after ``unrouted_timeout``
  seconds without a subscription its rows are set aside.  With
  ``EVENTBUS_UNROUTED=ignore`` rows are published as a plain publish does and
  deleted (counted).

The waits are this process's memory: a relay that restarts, or takes a shard
over, tries such rows again at once, which is safe.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from eventbus.exceptions import EventBusError, UnroutedError
from eventbus.health import HealthStatus
from eventbus.outbox.rows import InvalidRow, outgoing_of_row

if TYPE_CHECKING:
    from eventbus.backends.base import OutgoingEvent
    from eventbus.bus import EventBus

__all__ = ["BackendDown", "Batch", "BatchSender", "Held", "Unrouted"]

logger = logging.getLogger(__name__)

#: Refusals of a row sent alone (while the backend took other events or reported
#: itself healthy) after which it is set aside.
REFUSALS_TO_SET_ASIDE = 3
#: Seconds a refused row and the later rows of its key wait, doubled per refusal.
REFUSED_BACKOFF = 0.5
#: Seconds the rows of a topic without subscription wait before the next try,
#: doubled per try up to :data:`MAX_UNROUTED_BACKOFF`.
UNROUTED_BACKOFF = 0.5
MAX_UNROUTED_BACKOFF = 10.0
#: Rows of a refused batch sent alone and refused, none going through, after which
#: the backend is taken as down (the batch is kept and retried with backoff).
ISOLATION_PROBES = 2
#: Seconds the backend's health check may take when the relay asks whether it is up.
HEALTH_PROBE_TIMEOUT = 5.0
#: Seconds a refused row waits at most between tries.
MAX_REFUSED_BACKOFF = 10.0
#: Held keys remembered at most (a shard taken over by another relay leaves some).
MAX_HELD = 10_000
#: How the reason of a row set aside for want of a subscription starts.
UNROUTED_REASON = "no subscription handles topic"


@dataclass
class Held:
    """A row that waits, with the later rows of its key, until ``until``: the backend
    refused it, or it is to be set aside and the set-aside table is missing."""

    row_id: int
    refusals: int
    until: float
    error: str
    #: Waits for the set-aside table (released as soon as it exists).
    for_table: bool = False


@dataclass
class Unrouted:
    """A topic whose rows reached no subscription since ``since``."""

    since: float
    tries: int = 0
    until: float = 0.0
    #: Rows of the topic kept at the last try (0: they were set aside).
    kept: int = 0


@dataclass
class Batch:
    """What becomes of the rows of one batch."""

    sent: list[Any] = field(default_factory=list)
    #: (row, reason, attempts) to set aside.
    aside: list[tuple[Any, str, int]] = field(default_factory=list)
    #: Rows kept because their topic reached no subscription.
    unrouted: list[Any] = field(default_factory=list)
    #: Unrouted rows deleted anyway (``EVENTBUS_UNROUTED=ignore``).
    dropped: list[Any] = field(default_factory=list)
    #: The error of a refused row kept for another try, if any.
    refused: str = ""


class BackendDown(EventBusError):
    """Nothing of a batch went through: the backend is down or refuses everything."""


def backoff(first: float, tries: int, most: float) -> float:
    """Seconds to wait after ``tries`` tries: ``first``, doubled per try, at most ``most``."""
    return min(first * 2.0 ** min(tries - 1, 60), most)


class BatchSender:
    """Sends the rows of outbox batches through ``bus``'s backend and decides their fate.

    Parameters:
      bus: Whose backend and settings (``max_event_bytes``, ``unrouted``) to use.
      unrouted_timeout: Seconds a topic may have no subscription before its rows
        are set aside.
    """

    def __init__(self, bus: EventBus, unrouted_timeout: float) -> None:
        self.bus = bus
        self.unrouted_timeout = unrouted_timeout
        #: Refused rows waiting, by partition key.
        self.held: dict[str, Held] = {}
        #: Topics whose rows reached no subscription, kept and tried again.
        self.unrouted: dict[str, Unrouted] = {}
        #: Backend calls that failed.
        self.failed_calls = 0

    def waiting(self) -> tuple[list[str], list[str]]:
        """The topics and partition keys whose rows wait now (left out of the next batch)."""
        now = time.monotonic()
        topics = [topic for topic, state in self.unrouted.items() if state.until > now]
        keys = [key for key, held in self.held.items() if held.until > now]
        return topics, keys

    def next_release(self) -> float:
        """When the first held key or unrouted topic may be tried again (inf: none)."""
        now = time.monotonic()
        times = [h.until for h in self.held.values() if h.until > now]
        times += [u.until for u in self.unrouted.values() if u.until > now]
        return min(times, default=math.inf)

    def hold(
        self, row: Any, attempts: int, seconds: float, reason: str, *, for_table: bool = False
    ) -> None:
        """Leave ``row`` (and the later rows of its key) out for ``seconds``."""
        if len(self.held) >= MAX_HELD:
            self.held.clear()
        until = time.monotonic() + seconds
        self.held[row.partition_key] = Held(row.id, attempts, until, reason, for_table)

    def release_for_table(self) -> None:
        """The set-aside table exists now: the rows waiting for it may go."""
        for key in [key for key, held in self.held.items() if held.for_table]:
            self.held[key].until = 0.0

    def settled(self, rows: Sequence[Any]) -> None:
        """``rows`` are sent or set aside: their keys no longer wait for them."""
        for row in rows:
            held = self.held.get(row.partition_key)
            if held is not None and held.row_id == row.id:
                del self.held[row.partition_key]

    def forget_stale(self) -> None:
        """Forget the topics not tried for a while (another relay has their shards)."""
        forget = time.monotonic() - 10 * MAX_UNROUTED_BACKOFF
        for topic in [t for t, state in self.unrouted.items() if state.until < forget]:
            del self.unrouted[topic]

    async def send(self, rows: Sequence[Any]) -> Batch:
        """Decide each row's fate: sent, kept (unrouted or refused) or set aside."""
        batch = Batch()
        items: list[tuple[Any, OutgoingEvent]] = []
        max_bytes = self.bus.settings.max_event_bytes
        for row in rows:
            try:
                items.append((row, outgoing_of_row(row, max_bytes)))
            except (InvalidRow, ValueError, TypeError) as exc:
                reason = str(exc) if isinstance(exc, InvalidRow) else f"{type(exc).__name__}: {exc}"
                batch.aside.append((row, f"cannot be sent: {reason}", 0))
        if not items:
            return batch
        try:
            published = await self._send(items)
        except EventBusError as exc:
            published = await self._isolate(items, exc, batch)
        self._route(published, batch)
        return batch

    async def _send(self, items: list[tuple[Any, OutgoingEvent]]) -> list[tuple[Any, bool]]:
        """Publish the events of ``items``; returns each row with whether its topic had
        no subscription.

        Strict (unless ``EVENTBUS_UNROUTED=ignore``): the backend publishes nothing
        of a call with a topic nobody subscribes and names those topics; their rows
        are left out and the others published again.  So an unrouted event is never
        handed to the backend (a backend that keeps unrouted events would get one
        copy per try): its row is the one copy, kept until a subscription exists.
        """
        strict = self.bus.settings.unrouted != "ignore"
        backend = self.bus.backend
        pending, done = items, []
        while pending:
            try:
                unrouted = await backend.publish([event for _, event in pending], strict=strict)
            except UnroutedError as exc:
                topics = set(exc.topics) & {event.topic for _, event in pending}
                if not topics:  # names none of ours: a refusal like any other
                    self.failed_calls += 1
                    raise
                done += [(row, True) for row, event in pending if event.topic in topics]
                pending = [(row, event) for row, event in pending if event.topic not in topics]
                continue
            except Exception as exc:
                self.failed_calls += 1
                if isinstance(exc, EventBusError):
                    raise
                raise EventBusError(f"{backend.name}: {type(exc).__name__}: {exc}") from exc
            done += [(row, event.topic in unrouted) for row, event in pending]
            break
        return done

    async def _isolate(
        self, items: list[tuple[Any, OutgoingEvent]], error: EventBusError, batch: Batch
    ) -> list[tuple[Any, bool]]:
        """Send the rows of a refused batch one at a time: which one is refused?

        Returns the rows the backend answered for, as :meth:`_send` does.  Rows
        refused while others go through are held (set aside after
        :data:`REFUSALS_TO_SET_ASIDE` refusals); the later rows of their keys stay.

        Raises:
          BackendDown: Nothing went through and the backend looks down.
        """
        published: list[tuple[Any, bool]] = []
        refused: list[tuple[Any, EventBusError]] = []
        blocked: set[str] = set()
        for item in items:
            row = item[0]
            if row.partition_key in blocked:
                continue  # behind a refused row of its key: stays pending, in order
            try:
                try:
                    published += await self._send([item])
                except EventBusError:  # once more: a refusal can break the connection
                    published += await self._send([item])
            except EventBusError as exc:
                refused.append((row, exc))
                blocked.add(row.partition_key)
                if not published and len(refused) >= ISOLATION_PROBES:
                    break
        if not published and (len(refused) != 1 or not await self._backend_up()):
            raise BackendDown(str(refused[-1][1] if refused else error))
        for row, refusal in refused:
            held = self.held.get(row.partition_key)
            refusals = held.refusals + 1 if held is not None and held.row_id == row.id else 1
            if refusals >= REFUSALS_TO_SET_ASIDE:
                reason = (
                    f"the {self.bus.backend.name} backend refused it {refusals} times: {refusal}"
                )
                batch.aside.append((row, reason, refusals))
                continue
            wait = backoff(REFUSED_BACKOFF, refusals, MAX_REFUSED_BACKOFF)
            self.hold(row, refusals, wait, str(refusal))
            batch.refused = f"row {row.id}: {refusal}"
            logger.warning(
                "Outbox row %d (event %s) refused by the %s backend (%d time(s): %s); "
                "retrying it in %.1fs",
                row.id,
                row.event_id,
                self.bus.backend.name,
                refusals,
                refusal,
                wait,
            )
        return published

    async def _backend_up(self) -> bool:
        """Whether the backend's own health check says it is reachable (asked twice:
        the refusal just seen can have broken the connection the first check uses)."""
        backend = self.bus.backend
        for _ in range(2):
            try:
                results = await asyncio.wait_for(backend.health(), HEALTH_PROBE_TIMEOUT)
            except Exception:  # a probe: any failure means "not shown to be up"
                continue
            own = [result for result in results if result.backend == backend.name]
            if own and all(r.status is not HealthStatus.UNHEALTHY for r in own):
                return True
        return False

    def _route(self, published: list[tuple[Any, bool]], batch: Batch) -> None:
        """Sent rows are done; rows whose topic reached no subscription are kept (or, once
        their topic has waited ``unrouted_timeout``, set aside)."""
        now = time.monotonic()
        unrouted_topics = {row.topic for row, unrouted in published if unrouted}
        for row, unrouted in published:
            if not unrouted:
                batch.sent.append(row)
                self.unrouted.pop(row.topic, None)
        if not unrouted_topics:
            return
        if self.bus.settings.unrouted == "ignore":
            batch.dropped += [row for row, unrouted in published if unrouted]
            return
        expired: dict[str, str] = {}
        for topic in unrouted_topics:
            state = self.unrouted.setdefault(topic, Unrouted(since=now))
            state.tries += 1
            waited = now - state.since
            if waited >= self.unrouted_timeout:
                expired[topic] = (
                    f"{UNROUTED_REASON} {topic!r} (tried {state.tries} times over "
                    f"{waited:.0f}s, EVENTBUS_OUTBOX_UNROUTED_TIMEOUT={self.unrouted_timeout:g})"
                )
            state.until = now + backoff(UNROUTED_BACKOFF, state.tries, MAX_UNROUTED_BACKOFF)
            if state.tries == 1:
                logger.warning(
                    "Outbox relay: no subscription handles topic %s (%s backend): its rows "
                    "are kept and tried again (set aside after %gs)",
                    topic,
                    self.bus.backend.name,
                    self.unrouted_timeout,
                )
        for topic in unrouted_topics:
            self.unrouted[topic].kept = 0
        for row, unrouted in published:
            if not unrouted:
                continue
            state = self.unrouted[row.topic]
            if row.topic in expired:
                batch.aside.append((row, expired[row.topic], state.tries))
            else:
                batch.unrouted.append(row)
                state.kept += 1
