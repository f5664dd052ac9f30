"""Handlers of the outbox tests, imported by worker processes only (never by a test
process: decorated handlers would join every bus of the session).

Every delivery of an event to ``record`` and ``audit`` adds a row to
``outbox_test_deliveries`` (duplicates show as extra rows, the id gives the
handling order); ``apply`` is idempotent and adds one row to
``outbox_test_effects`` per event, however often it is delivered.

Environment: ``OUTBOX_TEST_DATABASE_URL`` (required to handle events),
``OUTBOX_TEST_TOPIC`` (default ``outbox.test``), ``OUTBOX_TEST_POOL=1`` (pool
connections: worker processes, one event loop), ``OUTBOX_TEST_HANG_AFTER_APPLY=1``
(``apply`` commits its effect, then hangs: the worker can be killed before the ack).
"""

from __future__ import annotations

import asyncio
import os

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

from eventbus import on_event
from eventbus.context import get_correlation_id
from eventbus.outbox.inbox import idempotent
from tests.outbox_events import TOPIC, Placed, deliveries, effects

DATABASE_URL = os.environ.get("OUTBOX_TEST_DATABASE_URL", "postgresql+asyncpg://unset/unset")

engine = create_async_engine(
    DATABASE_URL, **({} if os.environ.get("OUTBOX_TEST_POOL") else {"poolclass": NullPool})
)
Session = async_sessionmaker(engine, expire_on_commit=False)


async def _delivered(handler: str, event: Placed) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            insert(deliveries).values(
                handler=handler,
                event_id=event.event_id,
                key=event.key,
                seq=event.seq,
                pid=os.getpid(),
                correlation_id=get_correlation_id(),  # restored by the worker from the message
            )
        )


@on_event(TOPIC, name="outbox-test-record", ordered=True)
async def record(event: Placed) -> None:
    await _delivered("record", event)


@on_event(TOPIC, name="outbox-test-audit")
async def audit(event: Placed) -> None:
    await _delivered("audit", event)


@idempotent(Session, name="outbox-test-apply")
async def apply_effect(event: Placed, session: AsyncSession) -> None:
    await session.execute(insert(effects).values(event_id=event.event_id, seq=event.seq))


@on_event(TOPIC, name="outbox-test-apply")
async def apply(event: Placed) -> None:
    await _delivered("apply", event)  # every delivery, duplicates included
    await apply_effect(event)
    if os.environ.get("OUTBOX_TEST_HANG_AFTER_APPLY"):
        await asyncio.sleep(3600)  # committed, not acknowledged: SIGKILL me
