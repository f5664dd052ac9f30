"""``eventbus outbox relay``: the outbox relay as a process of its own.

Configured by the application's environment (``EVENTBUS_BACKEND``, the backend's
settings, ``EVENTBUS_OUTBOX_DATABASE_URL`` and the other ``EVENTBUS_OUTBOX_*``)::

    EVENTBUS_BACKEND=redis EVENTBUS_OUTBOX_DATABASE_URL=postgresql+asyncpg://app@db/app \\
        eventbus outbox relay

Run it when web processes do not relay (``EVENTBUS_OUTBOX_RELAY=false``), or next
to them: any number of relays share the work.  It stops on SIGTERM or SIGINT after
its batch in flight; SIGKILL loses nothing (the batch is sent again by another).
With ``EVENTBUS_METRICS_PORT`` it serves its Prometheus metrics on that port.

It exits non-zero when it cannot run: no database URL, a database it cannot reach
or without the outbox table at start (exit 2 with what to create), a backend that
does not start, or a relay task that ended on its own (it restarts itself after
any ``Exception``, so only an interpreter-level exit can end it).

:func:`database_call` runs the ``eventbus outbox list|retry|drop`` commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TextIO, TypeVar

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from eventbus.exceptions import ConfigurationError, EventBusError
from eventbus.outbox.dead import missing_table_message, table_exists
from eventbus.outbox.outbox import Outbox, OutboxSettings
from eventbus.outbox.schema import outbox_dead_table, outbox_table

if TYPE_CHECKING:
    from eventbus.bus import EventBus

T = TypeVar("T")

logger = logging.getLogger(__name__)


def run_relay(bus: EventBus, out: TextIO, database_url: str | None = None) -> int:
    """Relay ``bus``'s outbox until SIGTERM or SIGINT; returns the exit status (0).

    Raises:
      ConfigurationError: No database URL, no outbox table in the database, or the
        embedded backend (its handlers run in the application's process: a
        separate relay cannot reach them).
      EventBusError: The database cannot be reached at start, or the relay's task
        ended without being stopped.
    """
    settings = OutboxSettings()
    url = _database_url(database_url, settings)
    if bus.backend.name == "sync":
        raise ConfigurationError(
            "EVENTBUS_BACKEND=sync runs handlers inside the application's process: relay "
            "there (the default), or use the redis or kafka backend"
        )
    return asyncio.run(_serve(bus, out, url, settings))


def _database_url(given: str | None, settings: OutboxSettings | None = None) -> str:
    url = given or (settings or OutboxSettings()).database_url
    if not url:
        raise ConfigurationError(
            "the outbox commands need its database: set EVENTBUS_OUTBOX_DATABASE_URL or pass "
            "--database-url (e.g. postgresql+asyncpg://app@db/app)"
        )
    return url


async def _check_tables(engine: AsyncEngine, out: TextIO | None) -> None:
    """Refuse a database without the outbox table; warn (on ``out``) when the
    set-aside table is missing, or refuse when there is no ``out`` to warn on."""
    try:
        async with engine.connect() as conn:
            has_outbox = await table_exists(conn, outbox_table)
            has_dead = await table_exists(conn, outbox_dead_table)
    except (SQLAlchemyError, OSError) as exc:
        raise EventBusError(f"cannot reach the outbox database: {exc}") from None
    if not has_outbox:
        raise ConfigurationError(
            f"the outbox table {outbox_table.fullname} does not exist in this database: "
            "create the tables (eventbus.outbox.schema.create_tables(engine), or your "
            "migrations with eventbus.outbox.schema.metadata)"
        )
    if not has_dead:
        if out is None:
            raise ConfigurationError(missing_table_message(outbox_dead_table))
        out.write(f"warning: {missing_table_message(outbox_dead_table)}\n")
        out.flush()


def database_call(database_url: str | None, call: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    """Run ``call`` on a connection to the outbox database (``EVENTBUS_OUTBOX_DATABASE_URL``
    unless ``database_url`` is given) and return what it returns: the ``eventbus outbox
    list|retry|drop`` commands.

    Raises:
      ConfigurationError: No database URL, or the outbox or set-aside table is missing.
      EventBusError: The database cannot be reached.
    """
    url = _database_url(database_url)

    async def main() -> T:
        engine = create_async_engine(url, pool_size=1, max_overflow=0)
        try:
            await _check_tables(engine, None)
            async with engine.connect() as conn:
                return await call(conn)
        finally:
            await engine.dispose()

    return asyncio.run(main())


async def _serve(bus: EventBus, out: TextIO, url: str, settings: OutboxSettings) -> int:
    engine = create_async_engine(url, pool_size=2, max_overflow=2)
    try:
        await _check_tables(engine, out)
        outbox = Outbox(bus, engine, settings=settings, relay=True)
        if bus.settings.metrics_port and bus.settings.metrics == "prometheus":
            from eventbus.prometheus import serve_worker_metrics

            serve_worker_metrics(bus.settings.metrics_port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await bus.start(consume=False)
        relay = outbox.relay
        assert relay is not None  # relay=True and an engine
        out.write(f"outbox relay running ({bus.backend.name}); SIGTERM stops it\n")
        out.flush()
        stopping = loop.create_task(stop.wait())
        ended = loop.create_task(relay.join())
        try:
            await asyncio.wait({stopping, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stopping, ended):
                task.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)
            failure = None if stop.is_set() else relay.failure
            await bus.stop()
        if not stop.is_set():
            raise EventBusError(f"the outbox relay ended on its own ({failure!r}); see its log")
        out.write(f"outbox relay stopped ({relay.relayed} events relayed)\n")
        return 0
    finally:
        await engine.dispose()
