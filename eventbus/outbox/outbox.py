"""The transactional outbox: publish with the database commit (PostgreSQL, SQLAlchemy 2 async).

Writing a row and publishing an event are two writes to two systems: a crash
between the commit and ``publish`` loses the event, and publishing first announces
a row that a rollback then removes.  With an outbox, the event is written to a
table *in the same transaction* as your rows, and a relay forwards committed rows
to the bus's backend (Redis, Kafka, or the embedded one)::

    engine = create_async_engine("postgresql+asyncpg://app@db/app")
    Session = async_sessionmaker(engine, expire_on_commit=False)
    bus = EventBus()
    Outbox(bus, engine)                       # the lifespan starts its relay
    app = FastAPI(lifespan=create_lifespan(bus))

    @app.post("/users")
    async def create_user(body: NewUser, bus: EventBus = Depends(get_event_bus)):
        async with Session() as session, session.begin():
            session.add(User(name=body.name))
            await bus.publish(UserCreated(username=body.name), session=session)
        # committed: the relay sends UserCreated now; rolled back: it never leaves

Guarantees: an event leaves if and only if its transaction commits, at least
once (a relay killed after sending and before marking the rows sends them again:
make handlers idempotent, :mod:`eventbus.outbox.inbox`), and the events of one partition
key (:meth:`BaseEvent.partition_key`) leave in commit order.  Publishing an event
whose class names a ``__partition_key__`` takes a transaction-scoped advisory lock
on that key, so transactions publishing the same key commit one after another:
publish keyed events late in the transaction.  The relay runs in every process
whose bus has an ``Outbox`` (``relay=False`` or ``EVENTBUS_OUTBOX_RELAY=false``
turns it off) and as ``eventbus outbox relay``; any number may run.
No row stalls the others: a row that cannot be sent, that the backend refuses
for good, or whose topic has had no subscription for ``unrouted_timeout`` is set
aside with the reason (:mod:`eventbus.outbox.dead`; ``eventbus outbox list``,
``retry``, ``drop``), and a row whose topic has no subscription *yet* is kept and
tried again, never deleted.  See docs/outbox.md for the failure semantics.

The tables are :data:`eventbus.outbox.schema.metadata` (add it to your Alembic
metadata) or :func:`~eventbus.outbox.schema.create_tables` for a quick start.

One concept past ~500 lines: :class:`Outbox`, the object an application attaches
to its bus, and its wiring (its settings, writing rows in the caller's
transaction, the relay it starts, the set-aside rows it exposes, its health and
metrics); the relay, each row's fate, the schema and the set-aside table have
modules of their own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

from pydantic import Field, ValidationError
from pydantic_core import to_json
from pydantic_settings import BaseSettings, SettingsConfigDict

from eventbus.extras import requires_extra

with requires_extra("outbox", __name__):
    from sqlalchemy import Table, text
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from eventbus.config import ENV_PREFIX
from eventbus.exceptions import ConfigurationError, PublishError
from eventbus.health import HealthChecker, HealthResult, HealthStatus
from eventbus.outbox.dead import (
    DEFAULT_LIST_LIMIT,
    SetAsideRow,
    count_rows,
    drop_rows,
    list_rows,
    retry_rows,
)
from eventbus.outbox.inbox import cleanup_inbox
from eventbus.outbox.listen import channel_of
from eventbus.outbox.relay import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_UNROUTED_TIMEOUT,
    OutboxStats,
    Relay,
    read_stats,
)
from eventbus.outbox.schema import (
    dead_table_of,
    inbox_table,
    key_lock,
    lock_class,
    outbox_table,
    shard_of,
)

if TYPE_CHECKING:
    from eventbus.backends.base import OutgoingEvent
    from eventbus.bus import EventBus

__all__ = ["Outbox", "OutboxSession", "OutboxSettings", "OutboxStats", "SetAsideRow"]

logger = logging.getLogger(__name__)

#: What ``publish(..., session=...)`` takes: the caller's transaction.
OutboxSession = AsyncSession | AsyncConnection

#: Seconds sent rows are kept before deletion (0: deleted as they are sent).
DEFAULT_RETENTION = 0.0
#: Seconds inbox rows are kept: longer than any redelivery can come (7 days).
DEFAULT_INBOX_RETENTION = 7 * 24 * 3600.0
#: Seconds of outbox lag (oldest pending row) past which health is degraded.
DEFAULT_LAG_WARNING = 30.0
#: Seconds without a loop of this process's relay before its health is unhealthy.
RELAY_STALL = 30.0


class OutboxSettings(BaseSettings):
    """The outbox settings; each reads ``EVENTBUS_OUTBOX_<NAME>`` from the environment."""

    model_config = SettingsConfigDict(env_prefix=f"{ENV_PREFIX}OUTBOX_", extra="ignore")

    #: SQLAlchemy async URL of the database (``eventbus outbox relay`` reads it),
    #: e.g. ``postgresql+asyncpg://app@db/app``.
    database_url: str | None = None
    #: Run a relay in this process while the bus runs.
    relay: bool = True
    #: Rows per relay transaction and backend call.
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1, le=10_000)
    #: Seconds between polls when no notification arrives.
    poll_interval: float = Field(DEFAULT_POLL_INTERVAL, gt=0, allow_inf_nan=False)
    #: LISTEN for commits (asyncpg and psycopg); else poll only.
    listen: bool = True
    #: Seconds sent rows are kept (0: deleted as they are sent).
    retention: float = Field(DEFAULT_RETENTION, ge=0, allow_inf_nan=False)
    #: Seconds inbox rows are kept by the relay's cleanup (0: never cleaned here).
    inbox_retention: float = Field(DEFAULT_INBOX_RETENTION, ge=0, allow_inf_nan=False)
    #: Seconds of lag past which the outbox health is degraded.
    lag_warning: float = Field(DEFAULT_LAG_WARNING, gt=0, allow_inf_nan=False)
    #: Seconds a topic may have no subscription before the relay sets its rows
    #: aside (until then they are kept and tried again, never deleted).
    unrouted_timeout: float = Field(DEFAULT_UNROUTED_TIMEOUT, gt=0, allow_inf_nan=False)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigurationError(f"invalid outbox settings: {exc}") from None


class Outbox:
    """The transactional outbox of ``bus``: ``publish(..., session=...)`` writes here,
    and a relay started with the bus forwards committed rows to its backend.

    Parameters:
      bus: The bus; ``Outbox(bus, ...)`` attaches itself (``bus.outbox``).
      engine: The database of the outbox table (the relay's connections come from
        its pool: two while it runs).  None: write only, never relay here.
      settings: Default :class:`OutboxSettings` from the environment.
      table: The outbox table (default :data:`~eventbus.outbox.schema.outbox_table`).
      inbox: The inbox table the relay cleans (None: no inbox cleanup here).
      dead: The table rows are set aside to (default: ``<table>_dead``,
        :data:`~eventbus.outbox.schema.outbox_dead_table` for the default table).
      overrides: Single settings, validated as :class:`OutboxSettings` fields:
        ``Outbox(bus, engine, relay=False)``, ``batch_size=1000``, ``retention=86400``.

    Raises:
      ConfigurationError: ``relay`` without an ``engine``, or an invalid value.
      TypeError: An override that is not a setting.

    Health (``bus.health.check()``) gains ``outbox`` (pending rows, lag, relays
    connected, rows set aside; degraded past ``lag_warning`` or while rows are set
    aside or the set-aside table is missing, unhealthy when rows wait and no relay
    runs anywhere) and ``outbox.relay`` for this process's relay (degraded while it
    fails, holds refused rows or keeps unrouted ones).  A
    :class:`~eventbus.prometheus.PrometheusMetricsCollector` gains
    ``eventbus_outbox_pending``, ``eventbus_outbox_lag_seconds``,
    ``eventbus_outbox_relays``, ``eventbus_outbox_set_aside`` (rows in the
    set-aside table), ``eventbus_outbox_relay_shards``,
    ``eventbus_outbox_relay_alive_seconds`` (since this relay's last loop),
    ``eventbus_outbox_relayed_total``, ``eventbus_outbox_relay_errors_total``,
    ``eventbus_outbox_set_aside_rows_total`` and
    ``eventbus_outbox_unrouted_kept_total``, read from the relay's last look
    (every 2 s).
    """

    def __init__(
        self,
        bus: EventBus,
        engine: AsyncEngine | None = None,
        *,
        settings: OutboxSettings | None = None,
        table: Table = outbox_table,
        inbox: Table | None = inbox_table,
        dead: Table | None = None,
        **overrides: Any,
    ) -> None:
        base = settings if settings is not None else OutboxSettings()
        unknown = set(overrides) - set(OutboxSettings.model_fields)
        if unknown:
            raise TypeError(f"Outbox() got unknown settings: {', '.join(sorted(unknown))}")
        self.settings = OutboxSettings(**{**base.model_dump(), **overrides}) if overrides else base
        if self.settings.relay and engine is None:
            raise ConfigurationError(
                "the outbox relay needs an engine: Outbox(bus, engine), or relay=False to "
                "only write here (and run `eventbus outbox relay` elsewhere)"
            )
        self.bus = bus
        self.engine = engine
        self.table = table
        self.dead = dead if dead is not None else dead_table_of(table)
        self.inbox = inbox
        self.relay: Relay | None = None
        #: Awaited with ``(session, events)`` after each :meth:`write`, in the caller's
        #: transaction (the test kit records outbox events at commit this way).
        self.write_hooks: list[Callable[[OutboxSession, list[OutgoingEvent]], Awaitable[None]]] = []
        self._stats: OutboxStats | None = None
        name = table.fullname
        columns = "shard, topic, partition_key, event_id, event_type, envelope, options"
        values = (
            "CAST(:shard AS int2), CAST(:topic AS text), CAST(:key AS text), "
            "CAST(:event_id AS text), CAST(:event_type AS text), CAST(:envelope AS bytea), "
            "CAST(:options AS text)"
        )
        channel = channel_of(table)
        # One statement, one round trip: the commit notifies the relays, and a keyed
        # event locks its key until the commit, so same-key rows commit in id order.
        self._insert = text(
            f"INSERT INTO {name} ({columns}) SELECT {values} FROM "
            f"(SELECT pg_notify('{channel}', '')) AS n"
        )
        self._insert_keyed = text(
            f"INSERT INTO {name} ({columns}) SELECT {values} FROM "
            f"(SELECT pg_notify('{channel}', ''), pg_advisory_xact_lock("
            f"{lock_class(table, 0)}, CAST(:lock AS int4))) AS n"
        )
        self._lock_keys = text(
            f"SELECT pg_advisory_xact_lock({lock_class(table, 0)}, k) FROM "
            "(SELECT k FROM unnest(CAST(:locks AS int4[])) AS k ORDER BY k) AS s"
        )
        bus.outbox = self
        health = bus.health
        if isinstance(health, _HealthWithOutbox):  # a second Outbox replaces the first
            health = health.inner
        bus.health = _HealthWithOutbox(health, self, bus)
        _attach_metrics(bus, self)

    # -- writing --------------------------------------------------------------------

    async def write(self, session: OutboxSession, events: list[OutgoingEvent]) -> None:
        """Add ``events`` (encoded by the bus) to the outbox in ``session``'s transaction."""
        rows = [self._row(outgoing) for outgoing in events]
        if len(rows) == 1:
            row = rows[0]
            await session.execute(self._insert_keyed if "lock" in row else self._insert, row)
        else:
            locks = sorted({row.pop("lock") for row in rows if "lock" in row})
            if locks:  # taken in one order by every transaction: no deadlock between them
                await session.execute(self._lock_keys, {"locks": locks})
            await session.execute(self._insert, rows)
        for hook in self.write_hooks:
            await hook(session, events)

    @staticmethod
    def _row(outgoing: OutgoingEvent) -> dict[str, Any]:
        event = outgoing.event
        key = event.partition_key()
        for name, value in (
            ("event_id", event.event_id),
            ("topic", event.topic),
            ("partition key", key),
            ("event type", event.event_type),
        ):
            if "\x00" in value:
                raise PublishError(
                    f"event {event.event_id!r}: its {name} contains a NUL character, which "
                    "PostgreSQL text cannot store: the outbox cannot hold it (nothing was "
                    "written; the transaction is intact)"
                )
        row: dict[str, Any] = {
            "shard": shard_of(key),
            "topic": event.topic,
            "key": key,
            "event_id": event.event_id,
            "event_type": event.event_type,
            "envelope": outgoing.envelope,
            "options": to_json(outgoing.options).decode(),
        }
        if key != event.event_id:  # an ordering key: same-key rows in commit order
            row["lock"] = key_lock(key)
        return row

    async def pending_events(self, event_ids: list[str]) -> set[str]:
        """Those of ``event_ids`` whose rows wait in the outbox, not sent yet (the
        test kit's drain asks)."""
        if self.engine is None:
            raise ConfigurationError("this Outbox has no engine: Outbox(bus, engine)")
        query = text(
            f"SELECT event_id FROM {self.table.fullname} WHERE sent_at IS NULL "
            "AND event_id = ANY(CAST(:ids AS text[]))"
        )
        async with self.engine.connect() as conn:
            return set((await conn.scalars(query, {"ids": event_ids})).all())

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Start the relay (the bus calls this from ``start()``)."""
        if not self.settings.relay or self.engine is None:
            return
        if self.relay is None:
            cleanups = []
            if self.inbox is not None and self.settings.inbox_retention:
                inbox, keep = self.inbox, self.settings.inbox_retention

                async def clean_inbox(conn: AsyncConnection) -> None:
                    await cleanup_inbox(conn, older_than=keep, table=inbox)

                cleanups.append(clean_inbox)
            self.relay = Relay(
                self.bus,
                self.engine,
                self.table,
                batch_size=self.settings.batch_size,
                poll_interval=self.settings.poll_interval,
                listen=self.settings.listen,
                retention=self.settings.retention,
                cleanups=cleanups,
                dead=self.dead,
                unrouted_timeout=self.settings.unrouted_timeout,
            )
        self.relay.start()

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop the relay after its batch in flight (the bus calls this from ``stop()``)."""
        if self.relay is not None:
            await self.relay.stop(timeout)

    # -- visibility -----------------------------------------------------------------

    @property
    def stats(self) -> OutboxStats | None:
        """The last stats read by the relay or a health check (None before any)."""
        relay_stats = self.relay.stats if self.relay is not None else None
        if relay_stats is None or (
            self._stats is not None and self._stats.checked_at > relay_stats.checked_at
        ):
            return self._stats
        return relay_stats

    async def read_stats(self) -> OutboxStats:
        """Count pending rows, their lag and the relays connected now."""
        if self.engine is None:
            raise ConfigurationError("this Outbox has no engine to read stats from")
        async with self.engine.connect() as conn:
            self._stats = await read_stats(conn, self.table, lock_class(self.table, 2), self.dead)
        return self._stats

    # -- set-aside rows -------------------------------------------------------------

    async def set_aside_rows(
        self, limit: int = DEFAULT_LIST_LIMIT, *, topic: str | None = None
    ) -> list[SetAsideRow]:
        """The rows the relay set aside (oldest id first), with their reasons."""
        async with self._connect() as conn:
            return await list_rows(conn, self.dead, limit=limit, topic=topic)

    async def count_set_aside(self, *, topic: str | None = None) -> int:
        """How many rows are set aside (of ``topic``, when given)."""
        async with self._connect() as conn:
            return await count_rows(conn, self.dead, topic=topic)

    async def retry_set_aside(
        self, ids: list[int] | None = None, *, topic: str | None = None, all_rows: bool = False
    ) -> list[int]:
        """Put set-aside rows back in the outbox (same id, pending again) and wake the
        relays; returns the ids moved.  Select by ``ids``, ``topic`` or ``all_rows``."""
        async with self._connect() as conn:
            return await retry_rows(
                conn, self.table, self.dead, ids=ids, topic=topic, all_rows=all_rows
            )

    async def drop_set_aside(
        self, ids: list[int] | None = None, *, topic: str | None = None, all_rows: bool = False
    ) -> list[int]:
        """Delete set-aside rows for good; returns the ids deleted."""
        async with self._connect() as conn:
            return await drop_rows(conn, self.dead, ids=ids, topic=topic, all_rows=all_rows)

    def _connect(self) -> Any:
        if self.engine is None:
            raise ConfigurationError("this Outbox has no engine: Outbox(bus, engine)")
        return self.engine.connect()

    async def health(self) -> list[HealthResult]:
        """``outbox`` (and ``outbox.relay`` when this process relays) health."""
        results = []
        if self.engine is not None:
            try:
                stats = await self.read_stats()
            except Exception as exc:
                results.append(
                    HealthResult("outbox", HealthStatus.UNHEALTHY, f"database unreachable: {exc}")
                )
            else:
                results.append(self._outbox_health(stats))
        relay = self.relay
        if relay is not None:
            results.append(_relay_health(relay))
        return results

    def _outbox_health(self, stats: OutboxStats) -> HealthResult:
        detail = (
            f"{stats.pending} pending, oldest {stats.lag:.1f}s, {stats.relays} relay(s) connected"
        )
        if stats.set_aside:
            detail += f", {stats.set_aside} set aside"
        problems = []
        status = HealthStatus.HEALTHY
        if stats.pending and not stats.relays:
            status = HealthStatus.UNHEALTHY
            problems.append("no relay runs (start one: `eventbus outbox relay`)")
        elif stats.lag > self.settings.lag_warning:
            status = HealthStatus.DEGRADED
            problems.append(f"lag over {self.settings.lag_warning:g}s")
        if stats.set_aside:
            status = max(status, HealthStatus.DEGRADED, key=_SEVERITY.index)
            problems.append("rows set aside need an operator (`eventbus outbox list`)")
        if stats.set_aside is None:
            status = max(status, HealthStatus.DEGRADED, key=_SEVERITY.index)
            problems.append(
                f"the set-aside table {self.dead.fullname} is missing: create it "
                "(create_tables(engine) or your migrations; the relay's log has its DDL)"
            )
        if problems:
            detail += ": " + "; ".join(problems)
        return HealthResult("outbox", status, detail)


#: Health statuses from the best to the worst.
_SEVERITY = [HealthStatus.HEALTHY, HealthStatus.DEGRADED, HealthStatus.UNHEALTHY]


def _relay_health(relay: Relay) -> HealthResult:
    failure = relay.failure
    if failure is not None:
        return HealthResult("outbox.relay", HealthStatus.UNHEALTHY, f"crashed: {failure!r}")
    if not relay.running:
        return HealthResult("outbox.relay", HealthStatus.UNHEALTHY, "not running")
    idle = time.monotonic() - relay.alive_at
    if idle > RELAY_STALL:
        detail = f"stalled: no loop for {idle:.0f}s ({relay.last_error or 'no error'})"
        return HealthResult("outbox.relay", HealthStatus.UNHEALTHY, detail)
    detail = (
        f"{len(relay.shards)} shard(s), {relay.relayed} relayed, {relay.set_aside} set aside, "
        f"{'listening' if relay.listening else 'polling'}"
    )
    problems = []
    if relay.last_error:
        problems.append(f"retrying: {relay.last_error}")
    refused = [held for held in relay.held.values() if held.refusals]
    if refused:
        problems.append(
            f"{len(refused)} row(s) refused by the backend, tried again "
            f"(row {refused[0].row_id}: {refused[0].error})"
        )
    topics = sorted(topic for topic, state in relay.unrouted.items() if state.kept)
    if topics:
        more = f" and {len(topics) - 5} more" if len(topics) > 5 else ""
        problems.append(f"rows kept: no subscription handles {', '.join(topics[:5])}{more} yet")
    if relay.last_problem:  # the set-aside table is missing (its DDL is in the log)
        problems.append(f"rows to set aside wait: {relay.dead.fullname} is missing")
    if problems:
        return HealthResult(
            "outbox.relay", HealthStatus.DEGRADED, f"{detail}; {'; '.join(problems)}"
        )
    return HealthResult("outbox.relay", HealthStatus.HEALTHY, detail)


class _HealthWithOutbox(HealthChecker):
    """The bus's health checker plus the outbox's results."""

    def __init__(self, inner: HealthChecker, outbox: Outbox, bus: EventBus) -> None:
        super().__init__(bus.backend)
        self.inner = inner
        self._outbox = outbox

    async def check(self) -> list[HealthResult]:
        results = await self.inner.check()
        try:
            extra = await asyncio.wait_for(self._outbox.health(), 5.0)
        except TimeoutError:
            extra = [HealthResult("outbox", HealthStatus.UNHEALTHY, "health check timed out")]
        return [*results, *extra]


def _attach_metrics(bus: EventBus, outbox: Outbox) -> None:
    """Report the outbox through the bus's Prometheus registry, when it has one."""
    try:
        from eventbus.prometheus import MULTIPROC_ENV, PrometheusMetricsCollector
    except ImportError:
        return
    metrics = bus.metrics
    if not isinstance(metrics, PrometheusMetricsCollector) or os.environ.get(MULTIPROC_ENV):
        return
    collector = _collectors.get(metrics.registry)
    if collector is None:
        collector = _OutboxCollector()
        metrics.registry.register(collector)
        _collectors[metrics.registry] = collector
    collector.outbox = weakref.ref(outbox)


class _OutboxCollector:
    """Scrape-time outbox gauges, read from the relay's last look (no query at scrape)."""

    def __init__(self) -> None:
        self.outbox: weakref.ref[Outbox] | None = None

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        outbox = self.outbox() if self.outbox is not None else None
        if outbox is None:
            return
        stats = outbox.stats
        if stats is not None:
            yield GaugeMetricFamily(
                "eventbus_outbox_pending", "Outbox rows not sent yet", value=stats.pending
            )
            yield GaugeMetricFamily(
                "eventbus_outbox_lag_seconds",
                "Seconds since the oldest unsent outbox row was written",
                value=stats.lag,
            )
            yield GaugeMetricFamily(
                "eventbus_outbox_relays", "Outbox relays connected", value=stats.relays
            )
            if stats.set_aside is not None:
                yield GaugeMetricFamily(
                    "eventbus_outbox_set_aside",
                    "Outbox rows set aside (eventbus outbox list)",
                    value=stats.set_aside,
                )
        relay = outbox.relay
        if relay is not None:
            yield GaugeMetricFamily(
                "eventbus_outbox_relay_shards",
                "Outbox shards this process's relay holds",
                value=len(relay.shards),
            )
            alive = time.monotonic() - relay.alive_at if relay.running else float("inf")
            yield GaugeMetricFamily(
                "eventbus_outbox_relay_alive_seconds",
                "Seconds since this process's relay last looped (inf: not running)",
                value=alive,
            )
            yield CounterMetricFamily(
                "eventbus_outbox_relayed", "Events this process's relay sent", value=relay.relayed
            )
            yield CounterMetricFamily(
                "eventbus_outbox_relay_errors",
                "Relay backend calls, database sessions and crashes that failed (retried)",
                value=relay.errors,
            )
            yield CounterMetricFamily(
                "eventbus_outbox_set_aside_rows",
                "Outbox rows this process's relay set aside",
                value=relay.set_aside,
            )
            yield CounterMetricFamily(
                "eventbus_outbox_unrouted_kept",
                "Tries of outbox rows kept because their topic had no subscription",
                value=relay.unrouted_kept,
            )


_collectors: weakref.WeakKeyDictionary[Any, _OutboxCollector] = weakref.WeakKeyDictionary()
