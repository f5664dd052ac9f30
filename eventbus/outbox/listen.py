"""LISTEN/NOTIFY for the outbox relay: wake it the moment a transaction commits.

Publishing with a session runs ``pg_notify(channel, '')`` in the transaction;
PostgreSQL delivers the notification at commit (once per transaction, however many
events it wrote).  A :class:`Listener` holds a connection of its own that LISTENs on
the channel and calls ``wake`` on each notification.  It works with the asyncpg
and psycopg 3 drivers; with another driver, or once its connection is lost, it
reports ``listening`` False and the relay polls until it listens again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

if TYPE_CHECKING:
    from sqlalchemy import Table
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

logger = logging.getLogger(__name__)

#: The drivers whose connections can LISTEN.
LISTENING_DRIVERS = ("asyncpg", "psycopg")


def channel_of(table: Table) -> str:
    """The LISTEN/NOTIFY channel of an outbox table."""
    return table.fullname.replace(".", "_")[:63]


class Listener:
    """Calls ``wake`` whenever a notification arrives on ``channel``.

    Parameters:
      engine: Where to take the listening connection from (it is closed, never
        returned to the pool: it carries LISTEN state).
      channel: The channel (:func:`channel_of` the outbox table).
      wake: Called on the event loop for every notification, and once LISTEN
        takes effect (rows committed before then are not announced).
    """

    def __init__(self, engine: AsyncEngine, channel: str, wake: Callable[[], None]) -> None:
        self.engine = engine
        self.channel = channel
        self.wake = wake
        #: Whether notifications arrive now.
        self.listening = False
        self._conn: AsyncConnection | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def supported(self) -> bool:
        """Whether the engine's driver can LISTEN (asyncpg, psycopg)."""
        return self.engine.dialect.driver in LISTENING_DRIVERS

    async def start(self) -> bool:
        """LISTEN on a fresh connection (closing a lost one first); whether it worked."""
        await self.close()
        if not self.supported:
            return False
        try:
            conn = await self.engine.connect()
        except (SQLAlchemyError, OSError) as exc:
            logger.warning("The outbox relay cannot LISTEN (%s): polling meanwhile", exc)
            return False
        self._conn = conn  # closed by close(), whatever happens next
        try:
            raw = await conn.get_raw_connection()
            driver: Any = raw.driver_connection
            if self.engine.dialect.driver == "asyncpg":
                await driver.add_listener(self.channel, self._notified)
                driver.add_termination_listener(self._lost)
            else:
                await driver.set_autocommit(True)
                await driver.execute(f'LISTEN "{self.channel}"')
                self._task = asyncio.get_running_loop().create_task(self._psycopg(driver))
        except Exception as exc:  # the driver's own errors (asyncpg, psycopg)
            logger.warning("The outbox relay cannot LISTEN (%s): polling meanwhile", exc)
            await self.close()
            return False
        self.listening = True
        self.wake()
        return True

    def _notified(self, *args: Any) -> None:
        self.wake()

    def _lost(self, *args: Any) -> None:
        self.listening = False

    async def _psycopg(self, driver: Any) -> None:
        try:
            async for _ in driver.notifies():
                self.wake()
        except Exception as exc:
            logger.warning("The outbox relay's LISTEN connection failed (%s): polling", exc)
        finally:
            self.listening = False

    async def close(self) -> None:
        """Stop listening and close the connection."""
        self.listening = False
        task, self._task = self._task, None
        try:
            if task is not None:
                task.cancel()
                await _ended(task)
        finally:  # the caller's cancellation too: the connection carries LISTEN state
            conn, self._conn = self._conn, None
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.invalidate()
                with contextlib.suppress(Exception):
                    await conn.close()


async def _ended(task: asyncio.Task[None]) -> None:
    """Wait for ``task``, which we cancelled, to end.  Its own cancellation is the
    expected outcome; a cancellation of the *calling* task is re-raised, and so is
    anything that is not an ``Exception`` (``KeyboardInterrupt``, ``SystemExit``)."""
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
    except Exception as exc:  # _psycopg logs its own errors; this is only a trace
        logger.debug("The outbox relay's LISTEN task ended with %r", exc)
