"""The outbox and inbox tables, as a SQLAlchemy ``MetaData`` for your migrations.

Include :data:`metadata` in Alembic's ``target_metadata`` (a list of several
``MetaData`` is accepted)::

    # alembic/env.py
    from eventbus.outbox.schema import metadata as eventbus_metadata
    target_metadata = [Base.metadata, eventbus_metadata]

or, for a quick start and tests, create them at boot::

    await create_tables(engine)

Tables (PostgreSQL):

``eventbus_outbox``
  One row per event published with ``bus.publish(event, session=...)``: the wire
  envelope, the dramatiq options that carry the correlation id and trace
  context, the partition key and its *shard* (``crc32(key) % SHARDS``: the unit
  a relay owns), ``created_at``, and ``sent_at`` (NULL until relayed; sent rows
  are deleted at once unless a retention is set).
``eventbus_outbox_dead``
  The rows the relay *set aside*: rows it cannot send (options or envelope that
  are not the JSON it writes, an envelope over ``EVENTBUS_MAX_EVENT_BYTES``), rows
  the backend refused for good, and rows whose topic had no subscription for
  ``EVENTBUS_OUTBOX_UNROUTED_TIMEOUT``.  The row as it was (same id), with
  ``reason``, ``attempts`` and ``set_aside_at``.  ``eventbus outbox list``,
  ``retry`` and ``drop`` act on them (:mod:`eventbus.outbox.dead`).  Created by
  :func:`create_tables` and your migrations like the others; a database without
  it (created before this table existed) keeps relaying, but poison rows wait in
  the outbox until it exists (the relay's log and health print its DDL).
``eventbus_inbox``
  One row per (handler, event id) an idempotent handler applied, written in the
  handler's own transaction (:mod:`eventbus.outbox.inbox`).

Only PostgreSQL is supported (advisory locks, ``SKIP LOCKED``, LISTEN/NOTIFY).
"""

from __future__ import annotations

import zlib

from eventbus.extras import requires_extra

with requires_extra("outbox", __name__):
    from sqlalchemy import (
        BigInteger,
        Column,
        DateTime,
        Identity,
        Index,
        Integer,
        LargeBinary,
        MetaData,
        SmallInteger,
        Table,
        Text,
        func,
        text,
    )
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.ext.asyncio import AsyncEngine
    from sqlalchemy.schema import CreateTable

#: Shards of the outbox: a relay owns whole shards, so the events of one
#: partition key (always in one shard) go out through one relay at a time, in order.
#: Several relays split the shards between them.  Changing it re-maps keys.
SHARDS = 32

__all__ = [
    "create_statement",
    "create_tables",
    "inbox_table",
    "metadata",
    "outbox_dead_table",
    "outbox_table",
]

#: The ``MetaData`` holding both tables; add it to your Alembic ``target_metadata``.
metadata = MetaData()

#: The outbox table (see the module docstring).
outbox_table = Table(
    "eventbus_outbox",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("shard", SmallInteger, nullable=False),
    Column("topic", Text, nullable=False),
    Column("partition_key", Text, nullable=False),
    Column("event_id", Text, nullable=False),
    Column("event_type", Text, nullable=False),
    Column("envelope", LargeBinary, nullable=False),
    #: The dramatiq message options as JSON text (correlation id, trace context).
    Column("options", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("sent_at", DateTime(timezone=True), nullable=True),
    # The relay reads pending rows in id order (skipping shards it does not own);
    # sent rows (kept only with a retention) are found by age for deletion.
    Index("eventbus_outbox_pending", "id", postgresql_where=text("sent_at IS NULL")),
    Index("eventbus_outbox_sent", "sent_at", postgresql_where=text("sent_at IS NOT NULL")),
)


def dead_table_of(table: Table) -> Table:
    """The table of the rows the relay sets aside from ``table``: ``<name>_dead`` in the
    same schema and ``MetaData`` (so your migrations see it next to the outbox)."""
    name = f"{table.name}_dead"
    existing = table.metadata.tables.get(f"{table.schema}.{name}" if table.schema else name)
    if existing is not None:
        return existing
    return Table(
        name,
        table.metadata,
        # The outbox row's own id: ``retry`` puts it back under that id.
        Column("id", BigInteger, primary_key=True, autoincrement=False),
        Column("shard", SmallInteger, nullable=False),
        Column("topic", Text, nullable=False),
        Column("partition_key", Text, nullable=False),
        Column("event_id", Text, nullable=False),
        Column("event_type", Text, nullable=False),
        Column("envelope", LargeBinary, nullable=False),
        Column("options", Text, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("set_aside_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        #: Why the relay set the row aside (what was wrong, or the backend's refusal).
        Column("reason", Text, nullable=False),
        #: Attempts to send it before it was set aside (0: it could not be decoded).
        Column("attempts", Integer, nullable=False, server_default=text("0")),
        schema=table.schema,
    )


#: The rows the relay set aside from :data:`outbox_table` (see the module docstring).
outbox_dead_table = dead_table_of(outbox_table)

#: The inbox table of idempotent handlers (see :mod:`eventbus.outbox.inbox`).
inbox_table = Table(
    "eventbus_inbox",
    metadata,
    Column("handler", Text, primary_key=True),
    Column("event_id", Text, primary_key=True),
    Column("processed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("eventbus_inbox_processed_at", "processed_at"),
)


async def create_tables(engine: AsyncEngine) -> None:
    """Create the outbox, set-aside and inbox tables and their indexes if they do not
    exist (a database made by an earlier version gains the set-aside table).

    For quick starts and tests; production schemas belong in your migrations
    (include :data:`metadata`).
    """
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)


def create_statement(table: Table) -> str:
    """The PostgreSQL ``CREATE TABLE`` statement of ``table`` (for error messages and
    hand-written migrations)."""
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    return str(CreateTable(table).compile(dialect=dialect)).strip() + ";"


def shard_of(key: str) -> int:
    """The outbox shard of a partition key: stable across processes and versions."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % SHARDS


def lock_class(table: Table, purpose: int) -> int:
    """The first key of the advisory locks of ``table`` for ``purpose`` (a signed int4).

    Derived from the table's full name, so two outbox tables in one database never
    share locks.  Purposes: 0 publishing per key, 1 relay shards, 2 relay membership.
    """
    return _int4(zlib.crc32(f"eventbus:{table.fullname}:{purpose}".encode()))


def key_lock(key: str) -> int:
    """The second key of the per-partition-key advisory lock (a signed int4)."""
    return _int4(zlib.crc32(key.encode("utf-8", "surrogatepass")))


def _int4(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value
