"""The outbox relay: forwards committed outbox rows to the bus's backend.

A relay holds one database connection for its whole life.  On it, it takes
session-level advisory locks on *shards* of the outbox (a partition key always
falls in one shard: :func:`~eventbus.outbox.schema.shard_of`), so that the rows of
one key go out through one relay at a time, in id order, which is their commit
order (publishing keyed events takes a per-key transaction lock, see
:class:`~eventbus.outbox.outbox.Outbox`).  Relays split the shards evenly between them
and rebalance every :data:`REBALANCE_INTERVAL` seconds; a relay that dies loses its
connection, and with it its locks and its open batch, which the others take over.

Each batch is one transaction: ``SELECT`` up to ``batch_size`` pending rows of its
shards ``... FOR UPDATE SKIP LOCKED``, the backend's ``publish`` of those events,
then ``DELETE`` (or, with a retention, ``UPDATE ... SET sent_at``) of the rows
sent, and ``COMMIT``.  A relay killed between the publish and the commit leaves
the rows pending: the next relay sends them again (at least once; duplicates,
never losses).

No row stalls the others: :mod:`eventbus.outbox.batch` decides each row's fate
(sent; kept while its topic has no subscription or the backend refused it;
set aside with the reason, :mod:`eventbus.outbox.dead`, in the batch's
transaction), and rows that wait are left out of the next batches.

The relay's task survives every exception: a failed session is logged with the
rows in hand and restarted with backoff (0.1 s to 10 s), and health says
degraded meanwhile.

A second connection LISTENs on the outbox's channel (:mod:`eventbus.outbox.listen`):
publishing with a session notifies it at commit, so the relay wakes at once;
without it (another driver, a lost connection) the relay polls every
``poll_interval`` seconds.

One concept past ~500 lines: the life of a relay on its one connection (shards
and their locks, batches and their transactions, restarts with backoff,
wake-ups); what becomes of each row is :mod:`eventbus.outbox.batch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, text
from sqlalchemy.exc import SQLAlchemyError

from eventbus.exceptions import EventBusError
from eventbus.metrics import CountsUnrouted
from eventbus.outbox.batch import UNROUTED_REASON, BatchSender, Held, Unrouted
from eventbus.outbox.dead import missing_table_message, set_aside
from eventbus.outbox.listen import Listener, channel_of
from eventbus.outbox.rows import RelayedEvent, outgoing_of_row
from eventbus.outbox.schema import SHARDS, dead_table_of, lock_class

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

    from eventbus.bus import EventBus

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
        self._failures = 0
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
        #: Decides each row's fate and remembers the rows that wait.
        self.sender = BatchSender(bus, unrouted_timeout)
        self._restart_backoff = MIN_BACKOFF
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
    def errors(self) -> int:
        """Failed backend calls, database sessions and crashes (each retried)."""
        return self._failures + self.sender.failed_calls

    @property
    def held(self) -> dict[str, Held]:
        """Rows the backend refused, waiting with the later rows of their key, by key."""
        return self.sender.held

    @property
    def unrouted(self) -> dict[str, Unrouted]:
        """Topics whose rows reached no subscription, kept and tried again."""
        return self.sender.unrouted

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
            self._failures += 1
            self._in_hand = []
            await self._pause(self._restart_backoff)
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
                await self._pause(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            backoff = self._restart_backoff = MIN_BACKOFF
            if not taken:
                self.last_error = ""  # a clean look: nothing failing now
            if taken >= self.batch_size:
                continue  # a backlog: take the next batch at once
            wait = min(self.poll_interval, max(0.0, next_rebalance - time.monotonic()))
            wait = min(wait, max(0.0, self.sender.next_release() - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    def _check_dead_table(self, exists: bool) -> None:
        if exists == self._can_set_aside:
            return
        self._can_set_aside = exists
        if exists:
            self.last_problem = ""
            self.sender.release_for_table()
            logger.info("The outbox's set-aside table %s exists now.", self.dead.fullname)
        else:
            self.last_problem = missing_table_message(self.dead)
            logger.error("Outbox relay: %s", self.last_problem)

    # -- one batch --------------------------------------------------------------------

    async def _batch(self, conn: AsyncConnection) -> int:
        """Send one batch of pending rows of our shards; returns how many were taken."""
        if not self.shards:
            return 0
        topics, keys = self.sender.waiting()
        params = {
            "shards": sorted(self.shards),
            "limit": self.batch_size,
            "topics": topics,
            "keys": keys,
        }
        async with conn.begin():
            rows = (await conn.execute(self._take_sql, params)).all()
            if not rows:
                return 0
            self._in_hand = [row.id for row in rows]
            batch = await self.sender.send(rows)
            if batch.aside:
                await self._set_aside(conn, batch.aside)
            done = [row.id for row in batch.sent + batch.dropped]
            if done:
                await conn.execute(self._done_sql, {"ids": done})
        # Committed: the rows sent are deleted (or marked), the others set aside or kept.
        self.sender.settled(batch.sent)
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
                if reason.startswith(UNROUTED_REASON):
                    metrics.inc_unrouted(row.topic)
        self._in_hand = []
        return len(rows)

    async def _set_aside(self, conn: AsyncConnection, rows: list[tuple[Any, str, int]]) -> None:
        """Move ``rows`` to the set-aside table, or hold them while it does not exist."""
        if not self._can_set_aside:
            for row, reason, attempts in rows:
                logger.warning(
                    "Outbox row %d (event %s) cannot be sent (%s) nor set aside: %s is missing",
                    row.id,
                    row.event_id,
                    reason,
                    self.dead.fullname,
                )
                self.sender.hold(row, attempts, MAX_BACKOFF, reason, for_table=True)
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
        self.sender.settled([row for row, _, _ in rows])
        self.set_aside += moved

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
        self.sender.forget_stale()

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds`` after a failure; commits do not cut it short (a busy
        application would turn the backoff into a tight loop), :meth:`stop` does."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_requested.wait(), seconds)


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
