"""The outbox relay: forwards committed outbox rows to the bus's backend.

A relay holds one database connection for its whole life.  On it, it takes
session-level advisory locks on *shards* of the outbox (a partition key always
falls in one shard: :func:`~eventbus.outbox_schema.shard_of`), so that the rows of
one key go out through one relay at a time, in id order, which is their commit
order (publishing keyed events takes a per-key transaction lock, see
:class:`~eventbus.outbox.Outbox`).  Relays split the shards evenly between them
and rebalance every :data:`REBALANCE_INTERVAL` seconds; a relay that dies loses its
connection, and with it its locks and its open batch, which the others take over.

Each batch is one transaction: ``SELECT`` up to ``batch_size`` pending rows of its
shards ``... FOR UPDATE SKIP LOCKED``, the backend's ``publish`` of those events,
then ``DELETE`` (or, with a retention, ``UPDATE ... SET sent_at``) of the rows
sent, and ``COMMIT``.  A relay killed between the publish and the commit leaves
the rows pending: the next relay sends them again (at least once; duplicates,
never losses).

No row stalls the others:

- A row that is not what eventbus writes (:mod:`eventbus.outbox_rows`) is set
  aside with the reason (:mod:`eventbus.outbox_dead`) in the batch's transaction.
- When the backend refuses a batch, the relay sends its rows one at a time.  A
  row refused while the backend takes others (or reports itself healthy) waits,
  with the later rows of its partition key, :data:`REFUSED_BACKOFF` seconds
  (doubled per refusal); refused :data:`REFUSALS_TO_SET_ASIDE` times, it is set
  aside.  When nothing goes through (the backend is down), every row stays and
  the relay retries with backoff.
- A row whose topic has no subscription is kept, never deleted, and never
  handed to the backend: the relay publishes strictly (the backend writes
  nothing of a topic nobody subscribes and names it), so the row stays the one
  copy of its event even where the backend would keep unrouted events itself.
  The topic waits :data:`UNROUTED_BACKOFF` seconds (doubled up to
  :data:`MAX_UNROUTED_BACKOFF`) and is tried again; after ``unrouted_timeout``
  seconds without a subscription its rows are set aside.  With
  ``EVENTBUS_UNROUTED=ignore`` the relay publishes as a plain publish does and
  deletes the rows (counted).

The relay's task survives every exception: a failed session is logged with the
rows in hand and restarted with backoff (0.1 s to 10 s), and health says
degraded meanwhile.

A second connection LISTENs on the outbox's channel (:mod:`eventbus.outbox_listen`):
publishing with a session notifies it at commit, so the relay wakes at once;
without it (another driver, a lost connection) the relay polls every
``poll_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, text
from sqlalchemy.exc import SQLAlchemyError

from .exceptions import EventBusError, UnroutedError
from .health import HealthStatus
from .metrics import CountsUnrouted
from .outbox_dead import missing_table_message, set_aside
from .outbox_listen import Listener, channel_of
from .outbox_rows import InvalidRow, RelayedEvent, outgoing_of_row
from .outbox_schema import SHARDS, dead_table_of, lock_class

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

    from .backends.base import OutgoingEvent
    from .bus import EventBus

__all__ = ["OutboxStats", "Relay", "RelayedEvent", "outgoing_of_row", "read_stats"]

logger = logging.getLogger(__name__)

#: Rows a relay sends per batch (one transaction, one backend call).
DEFAULT_BATCH_SIZE = 500
#: Seconds between polls when no notification wakes the relay.
DEFAULT_POLL_INTERVAL = 1.0
#: Seconds a topic may have no subscription before its outbox rows are set aside
#: (1 hour: a deploy whose workers start late delivers everything).
DEFAULT_UNROUTED_TIMEOUT = 3600.0
#: Seconds between a relay's checks of how many relays share the shards.
REBALANCE_INTERVAL = 2.0
#: Seconds between refreshes of the pending-row count and lag.
STATS_INTERVAL = 2.0
#: Seconds between attempts to LISTEN again after the listening connection failed.
LISTEN_RETRY_INTERVAL = 1.0
#: Seconds between deletions of sent rows past the retention and of old inbox rows.
CLEANUP_INTERVAL = 60.0
#: Rows deleted per cleanup statement (short transactions on big tables).
CLEANUP_CHUNK = 10_000
#: Pending rows counted at most (the count reads them all: a bounded cost).
MAX_COUNTED = 100_000
#: Seconds of the first wait after a database or backend error, doubled up to the max.
MIN_BACKOFF = 0.1
MAX_BACKOFF = 10.0
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
#: Held keys remembered at most (a shard taken over by another relay leaves some).
MAX_HELD = 10_000


@dataclass
class OutboxStats:
    """What the outbox looked like at ``checked_at`` (``time.time()``).

    Attributes:
      pending: Rows not sent yet (counted up to :data:`MAX_COUNTED`).
      lag: Seconds since the oldest pending row was written (0 when none).
      relays: Relays connected to the database (every process).
      set_aside: Rows in the set-aside table (counted up to :data:`MAX_COUNTED`);
        None when that table does not exist.
    """

    pending: int
    lag: float
    relays: int
    checked_at: float
    set_aside: int | None = 0


@dataclass
class _Held:
    """A row the backend refused: it and the later rows of its key wait until ``until``."""

    row_id: int
    refusals: int
    until: float
    error: str


@dataclass
class _Unrouted:
    """A topic whose rows reached no subscription since ``since``."""

    since: float
    tries: int = 0
    until: float = 0.0


@dataclass
class _Batch:
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


class _BackendDown(EventBusError):
    """Nothing of a batch went through: the backend is down or refuses everything."""


class Relay:
    """Sends the committed rows of ``table`` to ``bus``'s backend until stopped.

    Parameters:
      bus: Whose backend, metrics and settings (``max_event_bytes``, ``unrouted``)
        to use.
      engine: The database; the relay holds two of its connections (work, listen).
      table: The outbox table.
      batch_size: Rows per transaction and backend call.
      poll_interval: Seconds between polls without notifications.
      listen: LISTEN for commits (asyncpg and psycopg drivers); else poll only.
      retention: Seconds sent rows are kept (0: deleted when sent).
      cleanups: Extra housekeeping run every :data:`CLEANUP_INTERVAL` seconds on the
        relay's connection (the inbox cleanup).
      dead: The table rows are set aside to (default: ``<table>_dead``).
      unrouted_timeout: Seconds a topic may reach no subscription before its rows
        are set aside.
    """

    def __init__(
        self,
        bus: EventBus,
        engine: AsyncEngine,
        table: Table,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        listen: bool = True,
        retention: float = 0.0,
        cleanups: Sequence[Callable[[AsyncConnection], Awaitable[None]]] = (),
        dead: Table | None = None,
        unrouted_timeout: float = DEFAULT_UNROUTED_TIMEOUT,
    ) -> None:
        self.bus = bus
        self.engine = engine
        self.table = table
        self.dead = dead if dead is not None else dead_table_of(table)
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.listen = listen
        self.retention = retention
        self.cleanups = list(cleanups)
        self.unrouted_timeout = unrouted_timeout
        self._shard_class = lock_class(table, 1)
        self._member_class = lock_class(table, 2)
        #: The shards this relay holds now.
        self.shards: set[int] = set()
        #: Events sent to the backend (a batch resent after a crash counts twice).
        self.relayed = 0
        #: Failed backend calls, database sessions and crashes, each retried.
        self.errors = 0
        #: The last error, ``""`` once a batch succeeds again.
        self.last_error = ""
        #: A lasting condition an operator must fix (the set-aside table is
        #: missing: the message holds its DDL), ``""`` when none.
        self.last_problem = ""
        #: Rows this relay set aside.
        self.set_aside = 0
        #: Tries of rows kept because their topic reached no subscription.
        self.unrouted_kept = 0
        #: ``time.monotonic()`` of the last loop iteration: the relay is alive.
        self.alive_at = 0.0
        #: The last :class:`OutboxStats` read, or None.
        self.stats: OutboxStats | None = None
        #: Refused rows waiting, by partition key.
        self.held: dict[str, _Held] = {}
        #: Topics whose rows reached no subscription, kept and tried again.
        self.unrouted: dict[str, _Unrouted] = {}
        self._wake = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self.listener = Listener(engine, channel_of(table), self._wake.set)
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._in_hand: list[int] = []
        self._can_set_aside = True
        name = table.fullname
        self._take_sql = text(
            "SELECT id, topic, partition_key, event_id, event_type, envelope, options "
            f"FROM {name} WHERE sent_at IS NULL AND shard = ANY(:shards) "
            "AND topic <> ALL(CAST(:topics AS text[])) "
            "AND partition_key <> ALL(CAST(:keys AS text[])) "
            "ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED"
        )
        # Sent rows are deleted, or kept with their sent_at for the retention.
        done = f"UPDATE {name} SET sent_at = now()" if retention else f"DELETE FROM {name}"
        self._done_sql = text(f"{done} WHERE id = ANY(CAST(:ids AS int8[]))")

    @property
    def listening(self) -> bool:
        """Whether commits wake the relay now (else it polls)."""
        return self.listener.listening

    # -- lifecycle ------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the relay's task runs."""
        return self._task is not None and not self._task.done()

    @property
    def failure(self) -> BaseException | None:
        """The exception that ended the relay's task, if it ended that way (only a
        ``BaseException`` such as ``SystemExit`` can: every ``Exception`` restarts it)."""
        task = self._task
        if task is None or not task.done() or task.cancelled():
            return None
        return task.exception()

    def start(self) -> None:
        """Run the relay in a task of the running loop."""
        if self.running:
            return
        self._stopping = False
        self._stop_requested.clear()
        self._task = asyncio.get_running_loop().create_task(self.run(), name="eventbus-relay")

    async def stop(self, timeout: float = 10.0) -> None:
        """Let the batch in flight finish (within ``timeout`` seconds), release the
        shards and the connections.  Never raises what the relay went through."""
        self._stopping = True
        self._stop_requested.set()
        self._wake.set()
        task, self._task = self._task, None
        if task is None:
            return
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            logger.warning("The outbox relay did not stop within %gs; cancelling it.", timeout)
            task.cancel()
            await asyncio.wait({task})
        if not task.cancelled() and task.exception() is not None:
            logger.error("The outbox relay had ended with %r", task.exception())

    async def join(self) -> None:
        """Return when the relay's task has ended (it ends only when stopped)."""
        task = self._task
        if task is not None:
            await asyncio.wait({task})

    def wake(self) -> None:
        """Look for rows now (a notification does the same)."""
        self._wake.set()

    # -- the loop -------------------------------------------------------------------

    async def run(self) -> None:
        """Relay until :meth:`stop`; restart with backoff after any failure."""
        self._restart_backoff = MIN_BACKOFF
        while not self._stopping:
            try:
                await self._session()
                continue
            except (SQLAlchemyError, OSError) as exc:
                self.last_error = f"database: {type(exc).__name__}: {exc}"
                logger.warning(
                    "Outbox relay lost the database (%s); reconnecting in %.1fs.",
                    exc,
                    self._restart_backoff,
                )
            except Exception as exc:  # a bug or a surprise: logged, restarted, reported
                self.last_error = f"crashed: {type(exc).__name__}: {exc}"
                rows = self._in_hand
                logger.error(
                    "Outbox relay failed%s; restarting it in %.1fs.",
                    f" with rows {rows[0]}..{rows[-1]} ({len(rows)}) in hand" if rows else "",
                    self._restart_backoff,
                    exc_info=True,
                )
            self.errors += 1
            self._in_hand = []
            with contextlib.suppress(TimeoutError):  # commits do not cut it short: stop does
                await asyncio.wait_for(self._stop_requested.wait(), self._restart_backoff)
            self._restart_backoff = min(self._restart_backoff * 2, MAX_BACKOFF)

    async def _session(self) -> None:
        """One connection's life: join, then serve until stopped or the connection fails."""
        self.shards = set()
        conn = await self.engine.connect()
        try:
            member = await self._join(conn)
            logger.info("Outbox relay %d joined (%s)", member, self.table.fullname)
            await self._serve(conn)
        finally:
            self.shards = set()
            await self.listener.close()
            # Closing the connection (not returning it to the pool) drops its locks.
            with contextlib.suppress(Exception):
                await conn.invalidate()
            with contextlib.suppress(Exception):
                await conn.close()

    async def _join(self, conn: AsyncConnection) -> int:
        """Take a membership lock: relays count each other by these locks."""
        while True:
            member = int.from_bytes(os.urandom(4), "big", signed=True)
            async with conn.begin():
                got = await conn.scalar(
                    text("SELECT pg_try_advisory_lock(CAST(:c AS int4), CAST(:m AS int4))"),
                    {"c": self._member_class, "m": member},
                )
            if got:
                return member

    async def _serve(self, conn: AsyncConnection) -> None:
        next_rebalance = next_stats = next_listen = 0.0
        next_cleanup = time.monotonic() + CLEANUP_INTERVAL / 10
        backoff = MIN_BACKOFF
        while not self._stopping:
            now = time.monotonic()
            self.alive_at = now
            if self.listen and not self.listener.listening and now >= next_listen:
                if not self.listener.supported:
                    logger.warning(
                        "The outbox relay cannot LISTEN with the %s driver: it polls every %gs",
                        self.engine.dialect.driver,
                        self.poll_interval,
                    )
                    self.listen = False
                else:
                    await self.listener.start()
                next_listen = now + LISTEN_RETRY_INTERVAL
            if now >= next_rebalance:
                await self._rebalance(conn)
                next_rebalance = now + REBALANCE_INTERVAL
            if now >= next_stats:
                self.stats = await read_stats(conn, self.table, self._member_class, self.dead)
                self._check_dead_table(self.stats.set_aside is not None)
                next_stats = now + STATS_INTERVAL
            if now >= next_cleanup:
                await self._cleanup(conn)
                next_cleanup = now + CLEANUP_INTERVAL
            self._wake.clear()
            try:
                taken = await self._batch(conn)
            except EventBusError as exc:  # the backend is down or refuses everything: rows stay
                self.last_error = f"backend: {exc}"
                logger.warning(
                    "Outbox relay could not publish (%s); retrying in %.1fs", exc, backoff
                )
                await self._sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            backoff = self._restart_backoff = MIN_BACKOFF
            if not taken:
                self.last_error = ""  # a clean look: nothing failing now
            if taken >= self.batch_size:
                continue  # a backlog: take the next batch at once
            wait = min(self.poll_interval, max(0.0, next_rebalance - time.monotonic()))
            wait = min(wait, max(0.0, self._next_release() - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    def _check_dead_table(self, exists: bool) -> None:
        if exists == self._can_set_aside:
            return
        self._can_set_aside = exists
        if exists:
            self.last_problem = ""
            logger.info("The outbox's set-aside table %s exists now.", self.dead.fullname)
        else:
            self.last_problem = missing_table_message(self.dead)
            logger.error("Outbox relay: %s", self.last_problem)

    def _next_release(self) -> float:
        """When the first held key or unrouted topic may be tried again (inf: none)."""
        now = time.monotonic()
        times = [h.until for h in self.held.values() if h.until > now]
        times += [u.until for u in self.unrouted.values() if u.until > now]
        return min(times, default=math.inf)

    # -- one batch --------------------------------------------------------------------

    async def _batch(self, conn: AsyncConnection) -> int:
        """Send one batch of pending rows of our shards; returns how many were taken."""
        if not self.shards:
            return 0
        now = time.monotonic()
        params = {
            "shards": sorted(self.shards),
            "limit": self.batch_size,
            "topics": [topic for topic, u in self.unrouted.items() if u.until > now],
            "keys": [key for key, held in self.held.items() if held.until > now],
        }
        async with conn.begin():
            rows = (await conn.execute(self._take_sql, params)).all()
            if not rows:
                return 0
            self._in_hand = [row.id for row in rows]
            batch = await self._send_rows(rows)
            if batch.aside:
                await self._set_aside(conn, batch.aside)
            done = [row.id for row in batch.sent + batch.dropped]
            if done:
                await conn.execute(self._done_sql, {"ids": done})
        # Committed: the rows sent are deleted (or marked), the others set aside or kept.
        self._in_hand = []
        self.relayed += len(batch.sent)
        self.unrouted_kept += len(batch.unrouted)
        self.last_error = batch.refused and f"backend refused a row: {batch.refused}"
        metrics = self.bus.metrics
        for row in batch.sent:
            metrics.inc_published(row.topic)
        if isinstance(metrics, CountsUnrouted):
            for row in batch.dropped:
                metrics.inc_unrouted(row.topic)
            for row, reason, _ in batch.aside:
                if reason.startswith(_UNROUTED_REASON):
                    metrics.inc_unrouted(row.topic)
        for row in batch.sent:
            held = self.held.get(row.partition_key)
            if held is not None and held.row_id == row.id:
                del self.held[row.partition_key]
        return len(rows)

    async def _set_aside(self, conn: AsyncConnection, rows: list[tuple[Any, str, int]]) -> None:
        """Move ``rows`` to the set-aside table, or hold them while it does not exist."""
        now = time.monotonic()
        if not self._can_set_aside:
            for row, reason, attempts in rows:
                logger.warning(
                    "Outbox row %d (event %s) cannot be sent (%s) nor set aside: %s is missing",
                    row.id,
                    row.event_id,
                    reason,
                    self.dead.fullname,
                )
                self.held[row.partition_key] = _Held(row.id, attempts, now + MAX_BACKOFF, reason)
            return
        moved = await set_aside(
            conn, self.table, self.dead, [(row.id, reason, n) for row, reason, n in rows]
        )
        for row, reason, _ in rows:
            logger.warning(
                "Outbox row %d (event %s, topic %s) set aside: %s",
                row.id,
                row.event_id,
                row.topic,
                reason,
            )
            held = self.held.get(row.partition_key)
            if held is not None and held.row_id == row.id:
                del self.held[row.partition_key]
        self.set_aside += moved

    async def _send_rows(self, rows: Sequence[Any]) -> _Batch:
        """Decide each row's fate: sent, kept (unrouted or refused) or set aside."""
        batch = _Batch()
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
                    self.errors += 1
                    raise
                done += [(row, True) for row, event in pending if event.topic in topics]
                pending = [(row, event) for row, event in pending if event.topic not in topics]
                continue
            except Exception as exc:
                self.errors += 1
                if isinstance(exc, EventBusError):
                    raise
                raise EventBusError(f"{backend.name}: {type(exc).__name__}: {exc}") from exc
            done += [(row, event.topic in unrouted) for row, event in pending]
            break
        return done

    async def _isolate(
        self, items: list[tuple[Any, OutgoingEvent]], error: EventBusError, batch: _Batch
    ) -> list[tuple[Any, bool]]:
        """Send the rows of a refused batch one at a time: which one is refused?

        Returns the rows the backend answered for, as :meth:`_send` does.  Rows
        refused while others go through are held (set aside after
        :data:`REFUSALS_TO_SET_ASIDE` refusals); the later rows of their keys stay.

        Raises:
          _BackendDown: Nothing went through and the backend looks down.
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
            raise _BackendDown(str(refused[-1][1] if refused else error))
        now = time.monotonic()
        for row, refusal in refused:
            held = self.held.get(row.partition_key)
            refusals = held.refusals + 1 if held is not None and held.row_id == row.id else 1
            if refusals >= REFUSALS_TO_SET_ASIDE:
                reason = (
                    f"the {self.bus.backend.name} backend refused it {refusals} times: {refusal}"
                )
                batch.aside.append((row, reason, refusals))
                continue
            wait = min(REFUSED_BACKOFF * 2 ** (refusals - 1), MAX_BACKOFF)
            if len(self.held) >= MAX_HELD:
                self.held.clear()
            self.held[row.partition_key] = _Held(row.id, refusals, now + wait, str(refusal))
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

    def _route(self, published: list[tuple[Any, bool]], batch: _Batch) -> None:
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
            state = self.unrouted.setdefault(topic, _Unrouted(since=now))
            state.tries += 1
            waited = now - state.since
            if waited >= self.unrouted_timeout:
                expired[topic] = (
                    f"{_UNROUTED_REASON} {topic!r} (tried {state.tries} times over "
                    f"{waited:.0f}s, EVENTBUS_OUTBOX_UNROUTED_TIMEOUT={self.unrouted_timeout:g})"
                )
            wait = min(UNROUTED_BACKOFF * 2 ** (state.tries - 1), MAX_UNROUTED_BACKOFF)
            state.until = now + wait
            if state.tries == 1:
                logger.warning(
                    "Outbox relay: no subscription handles topic %s (%s backend): its rows "
                    "are kept and tried again (set aside after %gs)",
                    topic,
                    self.bus.backend.name,
                    self.unrouted_timeout,
                )
        for row, unrouted in published:
            if not unrouted:
                continue
            if row.topic in expired:
                batch.aside.append((row, expired[row.topic], self.unrouted[row.topic].tries))
            else:
                batch.unrouted.append(row)

    # -- shards and housekeeping --------------------------------------------------------

    async def _rebalance(self, conn: AsyncConnection) -> None:
        """Hold an even share of the shards: ``ceil(SHARDS / relays)``."""
        async with conn.begin():
            relays = await count_relays(conn, self._member_class)
            share = math.ceil(SHARDS / max(1, relays))
            if len(self.shards) < share:
                free = [s for s in range(SHARDS) if s not in self.shards]
                got = await conn.scalars(
                    text(
                        "SELECT s FROM unnest(CAST(:free AS int4[])) AS s "
                        "WHERE pg_try_advisory_lock(CAST(:c AS int4), s)"
                    ),
                    {"free": free, "c": self._shard_class},
                )
                self.shards.update(got.all())
            if len(self.shards) > share:
                extra = sorted(self.shards)[share:]
                await conn.execute(
                    text(
                        "SELECT pg_advisory_unlock(CAST(:c AS int4), s) "
                        "FROM unnest(CAST(:extra AS int4[])) AS s"
                    ),
                    {"extra": extra, "c": self._shard_class},
                )
                self.shards.difference_update(extra)

    async def _cleanup(self, conn: AsyncConnection) -> None:
        if self.retention:
            table = self.table.fullname
            statement = text(
                f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE sent_at < "
                "now() - make_interval(secs => :keep) LIMIT :chunk FOR UPDATE SKIP LOCKED)"
            )
            while not self._stopping:
                async with conn.begin():
                    result = await conn.execute(
                        statement, {"keep": float(self.retention), "chunk": CLEANUP_CHUNK}
                    )
                if result.rowcount < CLEANUP_CHUNK:
                    break
        for cleanup in self.cleanups:
            await cleanup(conn)
        now = time.monotonic()
        forget = now - 10 * MAX_UNROUTED_BACKOFF
        for topic in [t for t, u in self.unrouted.items() if u.until < forget]:
            del self.unrouted[topic]  # not seen for a while: another relay has its shard

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        if not self._stopping:
            self._wake.clear()


#: How the reason of a row set aside for want of a subscription starts.
_UNROUTED_REASON = "no subscription handles topic"


async def count_relays(conn: AsyncConnection, member_class: int) -> int:
    """Relays holding a membership lock in this database."""
    count = await conn.scalar(
        text(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND objsubid = 2 AND classid::bigint = :c AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())"
        ),
        {"c": member_class & 0xFFFFFFFF},
    )
    return int(count or 0)


async def read_stats(
    conn: AsyncConnection, table: Table, member_class: int, dead: Table | None = None
) -> OutboxStats:
    """Pending rows, the age of the oldest one, the relays connected and, with ``dead``,
    the rows set aside (None when that table does not exist)."""
    name = table.fullname
    async with conn.begin():
        row = (
            await conn.execute(
                text(
                    f"SELECT (SELECT count(*) FROM (SELECT 1 FROM {name} WHERE sent_at IS NULL "
                    f"LIMIT {MAX_COUNTED}) AS p), (SELECT extract(epoch FROM "
                    f"clock_timestamp() - created_at) FROM {name} WHERE sent_at IS NULL "
                    "ORDER BY id LIMIT 1), to_regclass(:dead) IS NOT NULL"
                ),
                {"dead": (dead if dead is not None else table).fullname},
            )
        ).one()
        relays = await count_relays(conn, member_class)
        set_aside: int | None = None
        if dead is not None and row[2]:
            set_aside = int(
                await conn.scalar(
                    text(
                        f"SELECT count(*) FROM (SELECT 1 FROM {dead.fullname} "
                        f"LIMIT {MAX_COUNTED}) AS d"
                    )
                )
                or 0
            )
    return OutboxStats(
        pending=int(row[0]),
        lag=float(row[1] or 0.0),
        relays=relays,
        checked_at=time.time(),
        set_aside=set_aside if dead is not None else 0,
    )
