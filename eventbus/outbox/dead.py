"""Rows the outbox relay set aside: list, retry, drop, count.

The relay never lets one row stall the others.  A row it cannot send (options or
an envelope that are not the JSON eventbus writes, an envelope over
``EVENTBUS_MAX_EVENT_BYTES``), a row the backend refused for good, and a row
whose topic had no subscription for ``EVENTBUS_OUTBOX_UNROUTED_TIMEOUT`` seconds
is *moved* to the set-aside table (:func:`~eventbus.outbox.schema.dead_table_of`
the outbox table, ``eventbus_outbox_dead``) with the reason, in the relay's batch
transaction.  Nothing is deleted: an operator looks at them and retries (the row
goes back to the outbox under its id, pending again) or drops them::

    eventbus outbox list                  # id, set aside at, topic, event id, reason
    eventbus outbox retry 1042 1043       # back to the outbox: the relay sends them
    eventbus outbox drop --topic user.created --yes

or from Python: :meth:`Outbox.set_aside_rows <eventbus.outbox.outbox.Outbox.set_aside_rows>`,
:meth:`~eventbus.outbox.outbox.Outbox.retry_set_aside`,
:meth:`~eventbus.outbox.outbox.Outbox.drop_set_aside`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import text

from eventbus.outbox.listen import channel_of
from eventbus.outbox.schema import create_statement

if TYPE_CHECKING:
    from sqlalchemy import Table
    from sqlalchemy.ext.asyncio import AsyncConnection

#: Characters of a reason kept (an error can quote a whole envelope).
MAX_REASON = 2000
#: Rows listed when no limit is given.
DEFAULT_LIST_LIMIT = 50

_COLUMNS = "id, shard, topic, partition_key, event_id, event_type, envelope, options, created_at"


@dataclass(frozen=True)
class SetAsideRow:
    """One row the relay set aside (the envelope is left in the table)."""

    id: int
    topic: str
    event_id: str
    event_type: str
    partition_key: str
    created_at: datetime
    set_aside_at: datetime
    reason: str
    attempts: int
    #: Bytes of the envelope.
    size: int

    def to_dict(self) -> dict[str, Any]:
        """The row as a JSON-compatible dict (times in ISO 8601)."""
        return {
            "id": self.id,
            "topic": self.topic,
            "event_id": self.event_id,
            "event_type": self.event_type,
            "partition_key": self.partition_key,
            "created_at": self.created_at.isoformat(),
            "set_aside_at": self.set_aside_at.isoformat(),
            "reason": self.reason,
            "attempts": self.attempts,
            "size": self.size,
        }


def clean_reason(reason: str) -> str:
    """``reason`` as PostgreSQL text takes it: no NUL, at most :data:`MAX_REASON` chars."""
    reason = reason.replace("\x00", "\\x00").encode("utf-8", "replace").decode("utf-8")
    return reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 1] + "…"


def missing_table_message(dead: Table) -> str:
    """What to do when the set-aside table does not exist (a database made before it)."""
    return (
        f"the outbox's set-aside table {dead.fullname} does not exist (a database created "
        "before it): poison rows wait in the outbox until it does. Create it with "
        "eventbus.outbox.schema.create_tables(engine), your migrations (it is in "
        f"eventbus.outbox.schema.metadata), or: {' '.join(create_statement(dead).split())}"
    )


async def table_exists(conn: AsyncConnection, table: Table) -> bool:
    """Whether ``table`` exists (outside any transaction of the caller's: commits)."""
    found = await conn.scalar(
        text("SELECT to_regclass(:name) IS NOT NULL"), {"name": table.fullname}
    )
    await conn.commit()
    return bool(found)


async def set_aside(
    conn: AsyncConnection, table: Table, dead: Table, rows: list[tuple[int, str, int]]
) -> int:
    """Move ``rows`` (id, reason, attempts) of ``table`` to ``dead`` in the caller's
    transaction; returns how many moved."""
    if not rows:
        return 0
    result = await conn.execute(
        text(
            "WITH r AS (SELECT * FROM unnest(CAST(:ids AS int8[]), CAST(:reasons AS text[]), "
            "CAST(:attempts AS int4[])) AS r(id, reason, attempts)), "
            f"moved AS (DELETE FROM {table.fullname} AS o USING r WHERE o.id = r.id "
            f"RETURNING o.{_COLUMNS.replace(', ', ', o.')}, r.reason, r.attempts) "
            f"INSERT INTO {dead.fullname} ({_COLUMNS}, reason, attempts) "
            f"SELECT {_COLUMNS}, reason, attempts FROM moved"
        ),
        {
            "ids": [row[0] for row in rows],
            "reasons": [clean_reason(row[1]) for row in rows],
            "attempts": [row[2] for row in rows],
        },
    )
    return int(result.rowcount)


def _selection(
    ids: list[int] | None, topic: str | None, all_rows: bool
) -> tuple[str, dict[str, Any]]:
    """The WHERE clause of a selection: ids, or a topic, or everything."""
    if ids is not None:
        return "id = ANY(CAST(:ids AS int8[]))", {"ids": ids}
    if topic is not None:
        return "topic = :topic", {"topic": topic}
    if all_rows:
        return "true", {}
    raise ValueError("give ids, a topic or all_rows=True")


async def list_rows(
    conn: AsyncConnection,
    dead: Table,
    *,
    limit: int = DEFAULT_LIST_LIMIT,
    topic: str | None = None,
) -> list[SetAsideRow]:
    """The set-aside rows, oldest id first (``topic``: only those of that topic)."""
    where, params = _selection(None, topic, True)
    result = await conn.execute(
        text(
            "SELECT id, topic, event_id, event_type, partition_key, created_at, set_aside_at, "
            f"reason, attempts, octet_length(envelope) AS size FROM {dead.fullname} "
            f"WHERE {where} ORDER BY id LIMIT :limit"
        ),
        {**params, "limit": limit},
    )
    rows = [SetAsideRow(**dict(row._mapping)) for row in result.all()]
    await conn.commit()
    return rows


async def count_rows(conn: AsyncConnection, dead: Table, *, topic: str | None = None) -> int:
    """How many rows are set aside (of ``topic``, when given)."""
    where, params = _selection(None, topic, True)
    found = await conn.scalar(text(f"SELECT count(*) FROM {dead.fullname} WHERE {where}"), params)
    await conn.commit()
    return int(found or 0)


async def retry_rows(
    conn: AsyncConnection,
    table: Table,
    dead: Table,
    *,
    ids: list[int] | None = None,
    topic: str | None = None,
    all_rows: bool = False,
) -> list[int]:
    """Move set-aside rows back to the outbox (same id, pending, ``created_at`` now) and
    wake the relays; returns the ids moved."""
    where, params = _selection(ids, topic, all_rows)
    async with conn.begin():
        result = await conn.execute(
            text(
                f"WITH moved AS (DELETE FROM {dead.fullname} WHERE {where} RETURNING {_COLUMNS}) "
                f"INSERT INTO {table.fullname} ({_COLUMNS}) "
                f"SELECT {_COLUMNS.replace('created_at', 'now()')} FROM moved RETURNING id"
            ),
            params,
        )
        moved = sorted(int(row_id) for row_id in result.scalars().all())
        if moved:
            await conn.execute(text(f"SELECT pg_notify('{channel_of(table)}', '')"))
    return moved


async def drop_rows(
    conn: AsyncConnection,
    dead: Table,
    *,
    ids: list[int] | None = None,
    topic: str | None = None,
    all_rows: bool = False,
) -> list[int]:
    """Delete set-aside rows for good; returns the ids deleted."""
    where, params = _selection(ids, topic, all_rows)
    async with conn.begin():
        result = await conn.execute(
            text(f"DELETE FROM {dead.fullname} WHERE {where} RETURNING id"), params
        )
        return sorted(int(row_id) for row_id in result.scalars().all())
