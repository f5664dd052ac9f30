"""The outbox relay: forwards committed outbox rows to the bus's backend.

A relay holds one database connection for its whole life.  On it, it takes
session-level advisory locks on *shards* of the outbox (a partition key always
falls in one shard: :func:`~eventbus.outbox_schema.shard_of`), so that the rows of
one key go out through one relay at a time, in id order, which is their commit
order (publishing keyed events takes a per-key transaction lock, see
:class:`~eventbus.outbox.Outbox`).  Relays split the shards evenly between them
and rebalance every :data:`REBALANCE_INTERVAL` seconds; a relay that dies loses its
connection, and with it its locks and its open batch, which the others take over.

Each batch is one transaction: ``DELETE`` (or, with a retention, ``UPDATE ...
SET sent_at``) of up to ``batch_size`` pending rows of its shards ``... FOR UPDATE
SKIP LOCKED RETURNING`` them, the backend's ``publish`` of those events, then
``COMMIT``.  A relay killed between the publish and the commit leaves the rows
pending: the next relay sends them again (at least once; duplicates, never losses).

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import PrivateAttr
from pydantic_core import from_json
from sqlalchemy import Table, text
from sqlalchemy.exc import SQLAlchemyError

from .backends.base import OutgoingEvent
from .events import BaseEvent
from .exceptions import EventBusError
from .middleware import keys
from .outbox_listen import Listener, channel_of
from .outbox_schema import SHARDS, lock_class

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

    from .bus import EventBus

logger = logging.getLogger(__name__)

#: Rows a relay sends per batch (one transaction, one backend call).
DEFAULT_BATCH_SIZE = 500
#: Seconds between polls when no notification wakes the relay.
DEFAULT_POLL_INTERVAL = 1.0
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


class RelayedEvent(BaseEvent):
    """An event read back from the outbox, as a backend needs it.

    Its id, topic, type name and partition key are those stored with the row; the
    fields stay in the stored envelope, which is what the backend sends.  No event
    class is needed to relay an event.
    """

    _eventbus_unregistered: ClassVar[bool] = True
    _type_name: str = PrivateAttr(default="")
    _key: str = PrivateAttr(default="")

    @property
    def event_type(self) -> str:
        return self._type_name

    def partition_key(self) -> str:
        return self._key

    @classmethod
    def of_row(cls, event_id: str, topic: str, event_type: str, key: str) -> RelayedEvent:
        """The event of one outbox row (no validation: the row was written by us)."""
        event = cls.model_construct(event_id=event_id, topic=topic, metadata={})
        event._type_name = event_type
        event._key = key
        return event


def outgoing_of_row(row: Any) -> OutgoingEvent:
    """The :class:`OutgoingEvent` of an outbox row: the envelope and options as written
    at publish, so the correlation id and trace context reach the handlers."""
    options: dict[str, Any] = from_json(row.options)
    context = options.get(keys.TRACE_CONTEXT)
    return OutgoingEvent(
        event=RelayedEvent.of_row(row.event_id, row.topic, row.event_type, row.partition_key),
        envelope=bytes(row.envelope),
        options=options,
        correlation_id=str(options.get(keys.CORRELATION_ID, "")),
        trace_id=str(options.get(keys.TRACE_ID, "")),
        span_id=str(options.get(keys.PARENT_SPAN_ID, "")),
        trace_context=dict(context) if isinstance(context, dict) else {},
    )


@dataclass
class OutboxStats:
    """What the outbox looked like at ``checked_at`` (``time.time()``).

    Attributes:
      pending: Rows not sent yet (counted up to :data:`MAX_COUNTED`).
      lag: Seconds since the oldest pending row was written (0 when none).
      relays: Relays connected to the database (every process).
    """

    pending: int
    lag: float
    relays: int
    checked_at: float


class Relay:
    """Sends the committed rows of ``table`` to ``bus``'s backend until stopped.

    Parameters:
      bus: Whose backend, metrics and unrouted warnings to use.
      engine: The database; the relay holds two of its connections (work, listen).
      table: The outbox table.
      batch_size: Rows per transaction and backend call.
      poll_interval: Seconds between polls without notifications.
      listen: LISTEN for commits (asyncpg and psycopg drivers); else poll only.
      retention: Seconds sent rows are kept (0: deleted when sent).
      cleanups: Extra housekeeping run every :data:`CLEANUP_INTERVAL` seconds on the
        relay's connection (the inbox cleanup).
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
    ) -> None:
        self.bus = bus
        self.engine = engine
        self.table = table
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.listen = listen
        self.retention = retention
        self.cleanups = list(cleanups)
        self._shard_class = lock_class(table, 1)
        self._member_class = lock_class(table, 2)
        #: The shards this relay holds now.
        self.shards: set[int] = set()
        #: Events sent to the backend (a batch resent after a crash counts twice).
        self.relayed = 0
        #: Batches that failed (database or backend) and were retried.
        self.errors = 0
        #: The last error, ``""`` once a batch succeeds again.
        self.last_error = ""
        #: ``time.monotonic()`` of the last loop iteration: the relay is alive.
        self.alive_at = 0.0
        #: The last :class:`OutboxStats` read, or None.
        self.stats: OutboxStats | None = None
        self._wake = asyncio.Event()
        self.listener = Listener(engine, channel_of(table), self._wake.set)
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        name = table.fullname
        # Sent rows are deleted, or kept with their sent_at for the retention.
        take = f"UPDATE {name} SET sent_at = now()" if retention else f"DELETE FROM {name}"
        self._take_sql = text(
            f"{take} WHERE id IN (SELECT id FROM {name} WHERE sent_at IS NULL "
            "AND shard = ANY(:shards) ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED) "
            "RETURNING id, topic, partition_key, event_id, event_type, envelope, options"
        )

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
        """The exception that ended the relay's task, if it crashed."""
        task = self._task
        if task is None or not task.done() or task.cancelled():
            return None
        return task.exception()

    def start(self) -> None:
        """Run the relay in a task of the running loop."""
        if self.running:
            return
        self._stopping = False
        self._task = asyncio.get_running_loop().create_task(self.run(), name="eventbus-relay")

    async def stop(self, timeout: float = 10.0) -> None:
        """Let the batch in flight finish (within ``timeout`` seconds), release the
        shards and the connections."""
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            logger.warning("The outbox relay did not stop within %gs; cancelling it.", timeout)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def wake(self) -> None:
        """Look for rows now (a notification does the same)."""
        self._wake.set()

    # -- the loop -------------------------------------------------------------------

    async def run(self) -> None:
        """Relay until :meth:`stop`; reconnect with backoff after database errors."""
        backoff = MIN_BACKOFF
        while not self._stopping:
            try:
                await self._session()
                backoff = MIN_BACKOFF
            except (SQLAlchemyError, OSError) as exc:
                self.errors += 1
                self.last_error = f"database: {type(exc).__name__}: {exc}"
                logger.warning(
                    "Outbox relay lost the database (%s); reconnecting in %.1fs.", exc, backoff
                )
                await self._sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

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
                self.stats = await read_stats(conn, self.table, self._member_class)
                next_stats = now + STATS_INTERVAL
            if now >= next_cleanup:
                await self._cleanup(conn)
                next_cleanup = now + CLEANUP_INTERVAL
            self._wake.clear()
            try:
                sent = await self._batch(conn)
            except EventBusError as exc:  # the backend refused or is down: rows stay
                self.errors += 1
                self.last_error = f"backend: {exc}"
                logger.warning(
                    "Outbox relay could not publish (%s); retrying in %.1fs", exc, backoff
                )
                await self._sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            backoff = MIN_BACKOFF
            if sent >= self.batch_size:
                continue  # a backlog: take the next batch at once
            wait = min(self.poll_interval, max(0.0, next_rebalance - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _batch(self, conn: AsyncConnection) -> int:
        """Send one batch of pending rows of our shards; returns how many."""
        if not self.shards:
            return 0
        async with conn.begin() as tx:
            result = await conn.execute(
                self._take_sql, {"shards": sorted(self.shards), "limit": self.batch_size}
            )
            rows = sorted(result.all(), key=lambda row: row.id)
            if not rows:
                return 0
            events = [outgoing_of_row(row) for row in rows]
            try:
                unrouted = await self.bus.backend.publish(events, strict=False)
            except EventBusError:
                await tx.rollback()
                raise
            except Exception as exc:
                await tx.rollback()
                raise EventBusError(f"{self.bus.backend.name}: {exc}") from exc
        # Committed: the rows are sent (the backend holds them) and marked or deleted.
        self.relayed += len(events)
        self.last_error = ""
        metrics = self.bus.metrics
        for outgoing in events:
            metrics.inc_published(outgoing.event.topic)
        if unrouted:
            self._warn_unrouted(events, unrouted)
        return len(events)

    def _warn_unrouted(self, events: list[OutgoingEvent], topics: set[str]) -> None:
        count = getattr(self.bus.metrics, "inc_unrouted", None)
        if count is not None:
            for outgoing in events:
                if outgoing.event.topic in topics:
                    count(outgoing.event.topic)
        logger.warning(
            "Outbox relay: no subscription handles topic(s) %s (%s backend): those events "
            "were dropped.",
            ", ".join(sorted(topics)),
            self.bus.backend.name,
        )

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

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        if not self._stopping:
            self._wake.clear()


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


async def read_stats(conn: AsyncConnection, table: Table, member_class: int) -> OutboxStats:
    """Pending rows, the age of the oldest one and the relays connected."""
    name = table.fullname
    async with conn.begin():
        row = (
            await conn.execute(
                text(
                    f"SELECT (SELECT count(*) FROM (SELECT 1 FROM {name} WHERE sent_at IS NULL "
                    f"LIMIT {MAX_COUNTED}) AS p), (SELECT extract(epoch FROM "
                    f"clock_timestamp() - created_at) FROM {name} WHERE sent_at IS NULL "
                    "ORDER BY id LIMIT 1)"
                )
            )
        ).one()
        relays = await count_relays(conn, member_class)
    return OutboxStats(
        pending=int(row[0]), lag=float(row[1] or 0.0), relays=relays, checked_at=time.time()
    )
