"""Idempotent handlers (the inbox) on a real PostgreSQL.

Real redelivery by a SIGKILLed Redis worker is in ``test_outbox_processes.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from sqlalchemy import func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from eventbus import BaseEvent, ConfigurationError, EventBus
from eventbus.outbox.inbox import cleanup_inbox, idempotent
from eventbus.outbox.outbox import Outbox
from eventbus.outbox.schema import inbox_table
from eventbus.registry import make_spec
from eventbus.testing import EventBusTestKit
from tests.outbox_events import Placed, effects

pytest_plugins = ["tests.pg_support"]


async def effect_rows(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(effects)) or 0)


async def inbox_rows(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(inbox_table)) or 0)


def effect_handler(
    engine: AsyncEngine, calls: list[int], *, fail_first: int = 0, hold: float = 0.0
) -> Callable[[Placed], object]:
    """An idempotent handler writing one effect row; ``calls`` counts its runs."""

    @idempotent(async_sessionmaker(engine), name="test-effect")
    async def write_effect(event: Placed, session: AsyncSession) -> None:
        calls.append(event.seq)
        await session.execute(insert(effects).values(event_id=event.event_id, seq=event.seq))
        await asyncio.sleep(hold)
        if len(calls) <= fail_first:
            raise RuntimeError("failed after writing")

    return write_effect


async def test_a_second_delivery_is_skipped(pg_engine: AsyncEngine) -> None:
    calls: list[int] = []
    handler = effect_handler(pg_engine, calls)
    event = Placed(seq=1)
    await handler(event)  # type: ignore[misc]
    await handler(event)  # type: ignore[misc]
    await handler(Placed(seq=2))  # type: ignore[misc]
    assert calls == [1, 2]
    assert await effect_rows(pg_engine) == 2
    assert await inbox_rows(pg_engine) == 2


async def test_a_failed_attempt_rolls_back_its_writes_and_runs_again(
    pg_engine: AsyncEngine,
) -> None:
    calls: list[int] = []
    handler = effect_handler(pg_engine, calls, fail_first=1)
    event = Placed(seq=5)
    with pytest.raises(RuntimeError):
        await handler(event)  # type: ignore[misc]
    assert await effect_rows(pg_engine) == 0 and await inbox_rows(pg_engine) == 0
    await handler(event)  # type: ignore[misc]  # the retry
    assert calls == [5, 5]
    assert await effect_rows(pg_engine) == 1


async def test_simultaneous_duplicates_apply_once(pg_engine: AsyncEngine) -> None:
    """The second delivery waits on the inbox key until the first commits, then skips."""
    calls: list[int] = []
    handler = effect_handler(pg_engine, calls, hold=0.3)
    event = Placed(seq=3)
    await asyncio.gather(handler(event), handler(event))  # type: ignore[arg-type]
    assert calls == [3]
    assert await effect_rows(pg_engine) == 1


async def test_injected_duplicates_and_crashes_apply_once(
    make_bus: Callable[..., EventBus], pg_engine: AsyncEngine, topic: str
) -> None:
    """With the test kit: every event delivered twice, and redelivered after a crash."""
    calls: list[int] = []
    bus = make_bus()
    Outbox(bus, pg_engine)
    await bus.registry.register(topic, effect_handler(pg_engine, calls), name=f"{topic}:effect")
    async with EventBusTestKit(bus) as kit:
        kit.deliver_twice()
        kit.crash_after(times=2)
        await bus.start()
        async with pg_engine.begin() as conn:
            await bus.publish_many([Placed(topic=topic, seq=i) for i in range(3)], session=conn)
        deadline = asyncio.get_running_loop().time() + 10
        while len(kit.handler(f"{topic}:effect").calls) < 18:  # 3 events x 2 x 3
            assert asyncio.get_running_loop().time() < deadline, kit.handler(f"{topic}:effect")
            await asyncio.sleep(0.05)
        await kit.adrain()
    assert sorted(calls) == [0, 1, 2]  # the handler's body ran once per event
    assert await effect_rows(pg_engine) == 3


async def test_cleanup_deletes_only_old_inbox_rows(pg_engine: AsyncEngine) -> None:
    handler = effect_handler(pg_engine, [])
    for seq in range(4):
        await handler(Placed(seq=seq))  # type: ignore[misc]
    async with pg_engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE eventbus_inbox SET processed_at = now() - interval '8 days' "
                "WHERE event_id IN (SELECT event_id FROM eventbus_inbox LIMIT 3)"
            )
        )
    assert await cleanup_inbox(pg_engine, older_than=7 * 24 * 3600) == 3
    assert await inbox_rows(pg_engine) == 1


def test_idempotent_needs_an_async_handler_below_on_event(
    pg_engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    sessions = async_sessionmaker(pg_engine)

    def sync_handler(event: BaseEvent, session: AsyncSession) -> None: ...

    with pytest.raises(ConfigurationError, match="async def"):
        idempotent(sessions)(sync_handler)  # type: ignore[arg-type]

    async def registered(event: BaseEvent, session: AsyncSession | None = None) -> None: ...

    # As if @on_event had been applied first (not for real: decorated handlers are
    # process-wide, every other test's bus would get it).
    spec = make_spec("test.inbox.order", registered)
    monkeypatch.setattr("eventbus.outbox.inbox.decorated_handlers", lambda: [spec])
    with pytest.raises(ConfigurationError, match="below @on_event"):
        idempotent(sessions)(registered)  # type: ignore[arg-type]
