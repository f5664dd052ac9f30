"""The outbox and inbox tables, as a SQLAlchemy ``MetaData`` for your migrations.

Include :data:`metadata` in Alembic's ``target_metadata`` (a list of several
``MetaData`` is accepted)::

    # alembic/env.py
    from eventbus.outbox_schema import metadata as eventbus_metadata
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
``eventbus_inbox``
  One row per (handler, event id) an idempotent handler applied, written in the
  handler's own transaction (:mod:`eventbus.inbox`).

Only PostgreSQL is supported (advisory locks, ``SKIP LOCKED``, LISTEN/NOTIFY).
"""

from __future__ import annotations

import zlib

from .extras import requires_extra

with requires_extra("outbox", __name__):
    from sqlalchemy import (
        BigInteger,
        Column,
        DateTime,
        Identity,
        Index,
        LargeBinary,
        MetaData,
        SmallInteger,
        Table,
        Text,
        func,
        text,
    )
    from sqlalchemy.ext.asyncio import AsyncEngine

#: Shards of the outbox: a relay owns whole shards, so the events of one
#: partition key (always in one shard) go out through one relay at a time, in order.
#: Several relays split the shards between them.  Changing it re-maps keys.
SHARDS = 32

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

#: The inbox table of idempotent handlers (see :mod:`eventbus.inbox`).
inbox_table = Table(
    "eventbus_inbox",
    metadata,
    Column("handler", Text, primary_key=True),
    Column("event_id", Text, primary_key=True),
    Column("processed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("eventbus_inbox_processed_at", "processed_at"),
)


async def create_tables(engine: AsyncEngine) -> None:
    """Create the outbox and inbox tables and their indexes if they do not exist.

    For quick starts and tests; production schemas belong in your migrations
    (include :data:`metadata`).
    """
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)


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
