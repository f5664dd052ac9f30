"""eventbus.testing with the transactional outbox, on a real PostgreSQL: an event
published with ``session=`` is recorded when its transaction commits (never after a
rollback), ``drain()`` waits for the relay and the handlers (also for follow-ups
handlers publish through the outbox), and an event no handler of the test process
takes is recorded and its row sent, never kept, set aside or errored."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Callable

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from eventbus import BaseEvent, EventBus, EventBusSettings, RetryPolicy, create_lifespan
from eventbus.outbox.outbox import Outbox
from eventbus.registry import make_spec
from eventbus.testing import EventBusTestKit

pytest_plugins = ["tests.pg_support"]

_ids = itertools.count()


class Ordered(BaseEvent):
    topic: str = "kit.outbox.ordered"
    order_id: int


class Shipped(BaseEvent):
    topic: str = "kit.outbox.shipped"
    order_id: int


class Audited(BaseEvent):
    """No handler in the test process: handled by another service in production."""

    topic: str = "kit.outbox.audited"
    order_id: int


async def rows(engine: AsyncEngine, table: str = "eventbus_outbox") -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(text(f"SELECT count(*) FROM {table}")) or 0)


def make_bus(engine: AsyncEngine, **outbox_options: object) -> EventBus:
    bus = EventBus(
        settings=EventBusSettings(service=f"kit-outbox-{os.getpid()}-{next(_ids)}"),
        retry_policy=RetryPolicy(max_retries=1, delay=0.01),
    )
    Outbox(bus, engine, **outbox_options)
    return bus


async def shipper(bus: EventBus, engine: AsyncEngine) -> Callable[[Ordered], object]:
    """A handler of Ordered that publishes Shipped through the outbox, in its own
    transaction; Shipped has a handler too."""
    shipped: list[int] = []

    async def ship(event: Ordered) -> None:
        async with engine.begin() as conn:
            await bus.publish(Shipped(order_id=event.order_id), session=conn)

    async def on_shipped(event: Shipped) -> None:
        shipped.append(event.order_id)

    await bus.registry.register(Ordered, ship, name="ship")
    await bus.registry.register(Shipped, on_shipped, name="on_shipped")
    return ship


async def test_an_outbox_event_is_recorded_when_its_transaction_commits(
    pg_engine: AsyncEngine,
) -> None:
    bus = make_bus(pg_engine)
    await shipper(bus, pg_engine)
    async with EventBusTestKit(bus) as kit:
        await bus.start()
        async with pg_engine.connect() as conn:
            async with conn.begin():
                await bus.publish(Ordered(order_id=1), session=conn)
                assert kit.published() == []  # written, not committed: not published
            ordered = kit.assert_published(Ordered, order_id=1)  # at once, before any relay
            assert isinstance(ordered, Ordered) and ordered.event_id
        await kit.adrain()
        assert kit.handler("ship").mock.call_args.args == (ordered,)
        kit.assert_published(Shipped, order_id=1)  # the handler's own outbox publish
        assert [c.ok for c in kit.handler("on_shipped").calls] == [True]
        assert [type(e) for e in kit.published()] == [Ordered, Shipped]  # each once
        assert await rows(pg_engine) == 0  # the relay sent both rows


async def test_a_rolled_back_outbox_event_is_never_recorded(pg_engine: AsyncEngine) -> None:
    bus = make_bus(pg_engine)
    await shipper(bus, pg_engine)
    Session = async_sessionmaker(pg_engine, expire_on_commit=False)
    async with EventBusTestKit(bus) as kit:
        await bus.start()
        with pytest.raises(ZeroDivisionError):
            async with pg_engine.begin() as conn:  # a connection's transaction
                await bus.publish(Ordered(order_id=1), session=conn)
                raise ZeroDivisionError
        async with Session() as session:  # a session rolled back explicitly
            await bus.publish(Ordered(order_id=2), session=session)
            await session.rollback()
        async with Session() as session, session.begin():  # a session that commits
            await bus.publish(Ordered(order_id=3), session=session)
        await kit.adrain()
        assert [e.order_id for e in kit.published(Ordered)] == [3]
        kit.assert_not_published(Ordered, order_id=1)
        assert [c.event.order_id for c in kit.handler("ship").calls] == [3]  # type: ignore[attr-defined]
        assert await rows(pg_engine) == 0


async def test_an_event_of_a_rolled_back_savepoint_is_not_recorded(
    pg_engine: AsyncEngine,
) -> None:
    bus = make_bus(pg_engine)
    await shipper(bus, pg_engine)
    Session = async_sessionmaker(pg_engine, expire_on_commit=False)
    async with EventBusTestKit(bus) as kit:
        await bus.start()
        async with Session() as session, session.begin():
            await bus.publish(Ordered(order_id=1), session=session)
            with pytest.raises(ZeroDivisionError):
                async with session.begin_nested():  # rolled back
                    await bus.publish(Ordered(order_id=2), session=session)
                    raise ZeroDivisionError
            async with session.begin_nested():  # released: part of the commit
                await bus.publish(Ordered(order_id=3), session=session)
        assert [e.order_id for e in kit.published(Ordered)] == [1, 3]
        await kit.adrain()
        assert sorted(c.event.order_id for c in kit.handler("ship").calls) == [1, 3]  # type: ignore[attr-defined]


async def test_drain_waits_for_the_relay_and_for_follow_ups(pg_engine: AsyncEngine) -> None:
    # No LISTEN and a long poll: the relay sends nothing of its own accord within
    # the test, so only a drain that wakes it and waits for it delivers the events.
    bus = make_bus(pg_engine, listen=False, poll_interval=60.0)
    await shipper(bus, pg_engine)
    async with EventBusTestKit(bus) as kit:
        await bus.start()
        await asyncio.sleep(0.3)  # the relay's first look (at start) is over
        async with pg_engine.begin() as conn:
            await bus.publish_many([Ordered(order_id=i) for i in range(20)], session=conn)
        assert await rows(pg_engine) == 20  # committed, waiting for the relay
        await kit.adrain()
        assert len(kit.handler("ship").calls) == 20
        assert sorted(c.event.order_id for c in kit.handler("on_shipped").calls) == list(  # type: ignore[attr-defined]
            range(20)
        )
        assert len(kit.published(Shipped)) == 20
        assert await rows(pg_engine) == 0


async def test_an_outbox_event_no_local_handler_takes_is_recorded_and_sent(
    pg_engine: AsyncEngine,
) -> None:
    bus = make_bus(pg_engine)
    await shipper(bus, pg_engine)
    async with EventBusTestKit(bus) as kit:
        await bus.start()
        async with pg_engine.begin() as conn:
            await bus.publish_many([Audited(order_id=7), Ordered(order_id=8)], session=conn)
        await kit.adrain(timeout=5.0)  # returns: nothing waits for a subscription
        kit.assert_published(Audited, order_id=7)
        kit.assert_published(Shipped, order_id=8)
        assert kit.failures == []
        relay = bus.outbox.relay  # type: ignore[union-attr]
        assert relay is not None and not relay.unrouted  # not kept as unrouted
    assert await rows(pg_engine) == 0  # sent, not kept
    assert await rows(pg_engine, "eventbus_outbox_dead") == 0  # nor set aside


async def test_drain_without_a_relay_says_so(pg_engine: AsyncEngine) -> None:
    bus = make_bus(pg_engine, relay=False)
    await shipper(bus, pg_engine)
    async with EventBusTestKit(bus, raise_errors=False) as kit:
        await bus.start()
        async with pg_engine.begin() as conn:
            await bus.publish(Ordered(order_id=1), session=conn)
        kit.assert_published(Ordered, order_id=1)
        with pytest.raises(RuntimeError, match="none runs in this process"):
            await kit.adrain()
        # Leaving the kit must not hang: the failure is recorded instead.
    assert any(isinstance(f.exception, RuntimeError) for f in kit.failures)


class NewOrder(BaseModel):
    order_id: int


def test_an_app_publishing_through_the_outbox_with_testclient(
    pg_url: str, pg_engine: AsyncEngine
) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    # pg_engine made the tables fresh; the app's engine is its own (TestClient runs
    # the app on a loop of its own).
    bus = EventBus(settings=EventBusSettings(service=f"kit-outbox-app-{os.getpid()}"))
    engine = create_async_engine(pg_url)
    Outbox(bus, engine)
    shipped: list[int] = []

    async def on_ordered(event: Ordered) -> None:
        shipped.append(event.order_id)

    bus.registry.add(make_spec(Ordered, on_ordered))
    app = FastAPI(lifespan=create_lifespan(bus))

    @app.post("/orders", status_code=201)
    async def create_order(order: NewOrder) -> dict[str, int]:
        async with engine.begin() as conn:
            await bus.publish(Ordered(order_id=order.order_id), session=conn)
        return {"order_id": order.order_id}

    with EventBusTestKit(bus) as kit, TestClient(app) as client:
        assert client.post("/orders", json={"order_id": 5}).status_code == 201
        kit.assert_published(Ordered, order_id=5)  # committed before the response
        kit.drain()
        assert shipped == [5]
        kit.handler(on_ordered).mock.assert_called_once()
