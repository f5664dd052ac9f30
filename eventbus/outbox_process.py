"""``eventbus outbox relay``: the outbox relay as a process of its own.

Configured by the application's environment (``EVENTBUS_BACKEND``, the backend's
settings, ``EVENTBUS_OUTBOX_DATABASE_URL`` and the other ``EVENTBUS_OUTBOX_*``)::

    EVENTBUS_BACKEND=redis EVENTBUS_OUTBOX_DATABASE_URL=postgresql+asyncpg://app@db/app \\
        eventbus outbox relay

Run it when web processes do not relay (``EVENTBUS_OUTBOX_RELAY=false``), or next
to them: any number of relays share the work.  It stops on SIGTERM or SIGINT after
its batch in flight; SIGKILL loses nothing (the batch is sent again by another).
With ``EVENTBUS_METRICS_PORT`` it serves its Prometheus metrics on that port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import TYPE_CHECKING, TextIO

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import create_async_engine

from .exceptions import ConfigurationError, EventBusError
from .outbox import Outbox, OutboxSettings

if TYPE_CHECKING:
    from .bus import EventBus

logger = logging.getLogger(__name__)


def run_relay(bus: EventBus, out: TextIO, database_url: str | None = None) -> int:
    """Relay ``bus``'s outbox until SIGTERM or SIGINT; returns the exit status (0).

    Raises:
      ConfigurationError: No database URL, or the embedded backend (its handlers
        run in the application's process: a separate relay cannot reach them).
      EventBusError: The database cannot be reached at start.
    """
    settings = OutboxSettings()
    url = database_url or settings.database_url
    if not url:
        raise ConfigurationError(
            "the relay needs the outbox database: set EVENTBUS_OUTBOX_DATABASE_URL or pass "
            "--database-url (e.g. postgresql+asyncpg://app@db/app)"
        )
    if bus.backend.name == "sync":
        raise ConfigurationError(
            "EVENTBUS_BACKEND=sync runs handlers inside the application's process: relay "
            "there (the default), or use the redis or kafka backend"
        )
    return asyncio.run(_serve(bus, out, url, settings))


async def _serve(bus: EventBus, out: TextIO, url: str, settings: OutboxSettings) -> int:
    engine = create_async_engine(url, pool_size=2, max_overflow=2)
    try:
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except (SQLAlchemyError, OSError) as exc:
            raise EventBusError(f"cannot reach the outbox database: {exc}") from None
        Outbox(bus, engine, settings=settings, relay=True)
        if bus.settings.metrics_port and bus.settings.metrics == "prometheus":
            from .prometheus import serve_worker_metrics

            serve_worker_metrics(bus.settings.metrics_port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await bus.start(consume=False)
        out.write(f"outbox relay running ({bus.backend.name}); SIGTERM stops it\n")
        out.flush()
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)
            await bus.stop()
        relay = bus.outbox.relay if bus.outbox is not None else None
        out.write(f"outbox relay stopped ({relay.relayed if relay else 0} events relayed)\n")
        return 0
    finally:
        await engine.dispose()
