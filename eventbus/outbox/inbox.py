"""Idempotent handlers: apply each event's database effects once, whatever the redeliveries.

Delivery is at least once: a worker killed after its handler committed and before
the acknowledgement, a relay killed after sending, a Kafka rebalance: the event
comes again.  :func:`idempotent` makes a handler's *database* effects happen once:
it opens a transaction, records ``(handler, event id)`` in the inbox table, runs
the handler with that session, and commits both together.  A redelivered event
finds its row and is skipped; a handler that fails rolls back its writes and the
inbox row, and its retry runs again::

    Session = async_sessionmaker(engine, expire_on_commit=False)

    @on_event(OrderPaid)
    @idempotent(Session)                      # below @on_event
    async def record_payment(event: OrderPaid, session: AsyncSession) -> None:
        session.add(Payment(order_id=event.order_id, amount=event.amount))
        # no commit: the wrapper commits your writes with the inbox row

Two deliveries of one event at the same moment are serialized by the inbox's
primary key: the second waits for the first's commit, then skips.

Not covered: effects outside that transaction (an e-mail, an HTTP call, another
database) run again on a redelivery; make them idempotent on the event id
yourself.  An inbox row is kept for ``EVENTBUS_OUTBOX_INBOX_RETENTION`` seconds (7
days; the relay deletes older ones, or call :func:`cleanup_inbox`): a redelivery
later than that would run again.

Any event id works: one that PostgreSQL text cannot hold as it is (a NUL
character, a lone surrogate) or too long for the primary key's index (over
:data:`MAX_STORED_ID_BYTES` bytes) is recorded as ``sha256:<hex digest>``
(:func:`inbox_key`), as is an id that starts with ``sha256:`` itself, so two ids
never share a row.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from eventbus.extras import requires_extra

with requires_extra("outbox", __name__):
    from sqlalchemy import Table, text
    from sqlalchemy.ext.asyncio import (
        AsyncConnection,
        AsyncEngine,
        AsyncSession,
        async_sessionmaker,
    )

from eventbus.events import BaseEvent
from eventbus.exceptions import ConfigurationError
from eventbus.outbox.schema import inbox_table
from eventbus.registry import decorated_handlers

__all__ = ["cleanup_inbox", "idempotent", "inbox_key"]

logger = logging.getLogger(__name__)

E = TypeVar("E", bound=BaseEvent)

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
#: Rows deleted per statement by :func:`cleanup_inbox`.
CLEANUP_CHUNK = 10_000
#: Bytes (UTF-8) of the longest event id stored as it is; a longer one is stored
#: as its digest (a btree index entry holds at most ~2,700 bytes).
MAX_STORED_ID_BYTES = 512
#: Bytes (UTF-8) of the longest handler name (it shares the primary key's index entry).
MAX_HANDLER_NAME_BYTES = 1024
#: The prefix of an event id stored as its SHA-256 digest.
DIGEST_PREFIX = "sha256:"


def inbox_key(event_id: str) -> str:
    """The inbox's key for ``event_id``: the id itself, or ``sha256:<hex>`` when
    PostgreSQL text cannot hold it, it is longer than :data:`MAX_STORED_ID_BYTES`
    bytes, or it starts with ``sha256:``."""
    try:
        encoded = event_id.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        encoded = b""
    else:
        if (
            "\x00" not in event_id
            and len(encoded) <= MAX_STORED_ID_BYTES
            and not event_id.startswith(DIGEST_PREFIX)
        ):
            return event_id
    raw = encoded or event_id.encode("utf-8", "surrogatepass")
    return DIGEST_PREFIX + hashlib.sha256(raw).hexdigest()


def idempotent(
    sessions: async_sessionmaker[AsyncSession] | AsyncEngine,
    *,
    name: str | None = None,
    table: Table = inbox_table,
) -> Callable[[Callable[[E, AsyncSession], Awaitable[None]]], Callable[[E], Awaitable[None]]]:
    """Run the decorated handler at most once per event, in one transaction with its writes.

    The handler takes ``(event, session)``; the decorator returns a handler taking
    ``(event)`` for :func:`~eventbus.on_event` (put ``@idempotent`` below it).
    Commit and rollback are the decorator's: the handler only adds its writes.

    Parameters:
      sessions: An ``async_sessionmaker`` (its settings apply) or an ``AsyncEngine``.
      name: The handler's name in the inbox (default ``module.qualname``).  Keep it
        stable across renames, or a redelivery during a deploy runs again.  At most
        :data:`MAX_HANDLER_NAME_BYTES` bytes, no NUL character.
      table: The inbox table (default :data:`~eventbus.outbox.schema.inbox_table`).

    Raises:
      ConfigurationError: The handler is not ``async def``, it was registered with
        ``@on_event`` already (``@idempotent`` must be applied first), or its name
        cannot be stored (a NUL character, too long).
    """
    maker = (
        async_sessionmaker(sessions, expire_on_commit=False)
        if isinstance(sessions, AsyncEngine)
        else sessions
    )
    record = text(
        f"INSERT INTO {table.fullname} (handler, event_id) VALUES (:handler, :event_id) "
        "ON CONFLICT DO NOTHING"
    )

    def decorator(
        fn: Callable[[E, AsyncSession], Awaitable[None]],
    ) -> Callable[[E], Awaitable[None]]:
        if not inspect.iscoroutinefunction(fn):
            raise ConfigurationError(
                f"@idempotent needs an async def handler taking (event, session), got {fn!r}"
            )
        if any(spec.fn is fn for spec in decorated_handlers()):
            raise ConfigurationError(
                f"{fn.__qualname__} is registered with @on_event already: put @idempotent "
                "below @on_event, so that the bus runs the idempotent handler"
            )
        handler = name or f"{fn.__module__}.{fn.__qualname__}"
        stored = handler.encode("utf-8", "surrogatepass")
        if "\x00" in handler or len(stored) > MAX_HANDLER_NAME_BYTES:
            raise ConfigurationError(
                f"@idempotent handler name {handler[:80]!r} cannot be an inbox key: it "
                f"must hold no NUL character and at most {MAX_HANDLER_NAME_BYTES} bytes "
                "(give a shorter name=...)"
            )
        try:
            stored.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigurationError(
                f"@idempotent handler name {handler[:80]!r} holds a lone surrogate, which "
                "PostgreSQL text cannot store: give another name=..."
            ) from None

        @functools.wraps(fn)
        async def run_once(event: E) -> None:
            async with maker() as session, session.begin():
                result = await session.execute(
                    record, {"handler": handler, "event_id": inbox_key(event.event_id)}
                )
                if not result.rowcount:  # type: ignore[attr-defined]
                    logger.info(
                        "Skipped event %s for %s: applied already (redelivery)",
                        event.event_id,
                        handler,
                    )
                    return
                await fn(event, session)

        # The bus sees a handler of the event alone (the session is not a dependency).
        parameters = list(inspect.signature(fn).parameters.values())
        event = parameters[0] if parameters else None
        if event is None or event.kind not in _POSITIONAL:
            raise ConfigurationError(
                f"@idempotent needs a handler taking (event, session), got {fn.__qualname__}"
            )
        run_once.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [event.replace(default=inspect.Parameter.empty)], return_annotation=None
        )
        run_once.__annotations__ = {
            key: value for key, value in fn.__annotations__.items() if key == event.name
        }
        return run_once

    return decorator


async def cleanup_inbox(
    conn: AsyncConnection | AsyncEngine, *, older_than: float, table: Table = inbox_table
) -> int:
    """Delete inbox rows older than ``older_than`` seconds; returns how many.

    The outbox relay runs it every minute with ``EVENTBUS_OUTBOX_INBOX_RETENTION``;
    call it from a scheduled job where no relay runs against the inbox's database.
    Keep rows longer than an event can be redelivered.
    """
    if isinstance(conn, AsyncEngine):
        async with conn.connect() as connection:
            return await cleanup_inbox(connection, older_than=older_than, table=table)
    name = table.fullname
    exists = await conn.scalar(text("SELECT to_regclass(:name) IS NOT NULL"), {"name": name})
    await conn.commit()
    if not exists:
        return 0
    statement = text(
        f"DELETE FROM {name} WHERE ctid IN (SELECT ctid FROM {name} WHERE processed_at < "
        "now() - make_interval(secs => :keep) LIMIT :chunk)"
    )
    total = 0
    while True:
        async with conn.begin():
            result = await conn.execute(
                statement, {"keep": float(older_than), "chunk": CLEANUP_CHUNK}
            )
        total += result.rowcount
        if result.rowcount < CLEANUP_CHUNK:
            return total
