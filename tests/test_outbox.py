"""The transactional outbox in one process (embedded backend) on a real PostgreSQL.

Cross-process behaviour (Redis and Kafka workers, killed web processes and
relays, two relays) is in ``test_outbox_processes.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from eventbus import BaseEvent, EventBus, HealthStatus, PublishError, get_current_event
from eventbus.context import correlation_id_var
from eventbus.otel import OpenTelemetryTracer
from eventbus.outbox.outbox import Outbox
from eventbus.outbox.schema import SHARDS, key_lock, lock_class, outbox_table
from eventbus.prometheus import PrometheusMetricsCollector
from tests.outbox_events import Placed

pytest_plugins = ["tests.pg_support"]

#: Seconds a delivery may take in these tests (LISTEN wakes the relay at once).
DELIVERY_TIMEOUT = 10.0


async def wait_for(
    predicate: Callable[[], bool], what: str, timeout: float = DELIVERY_TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.01)


async def pending(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        count = await conn.scalar(
            select(func.count()).select_from(outbox_table).where(outbox_table.c.sent_at.is_(None))
        )
    return int(count or 0)


async def settled(bus: EventBus, engine: AsyncEngine, timeout: float = DELIVERY_TIMEOUT) -> None:
    """Wait until the relay sent every committed row and the bus handled what it sent:
    from then on nothing more can be delivered."""
    deadline = time.monotonic() + timeout
    while (left := await pending(engine)) != 0:
        if time.monotonic() > deadline:
            pytest.fail(f"{left} outbox row(s) still pending after {timeout:g}s")
        await asyncio.sleep(0.01)
    await bus.drain(timeout)


async def marker(bus: EventBus, engine: AsyncEngine, topic: str) -> Placed:
    """Commit an event on its own key through the outbox: once both handlers have it,
    the relay has looked at the outbox after whatever was done before."""
    event = Placed(topic=topic, key=f"marker-{topic}", seq=-1)
    async with async_sessionmaker(engine)() as session, session.begin():
        await bus.publish(event, session=session)
    return event


def ids(events: list[BaseEvent]) -> list[str]:
    return [e.event_id for e in events]


async def outbox_bus(
    make_bus: Callable[..., EventBus], engine: AsyncEngine, topic: str, **options: Any
) -> tuple[EventBus, list[BaseEvent], list[BaseEvent]]:
    """A started embedded bus with an outbox and two handlers of ``topic`` recording events."""
    bus = make_bus(**({"tracer": options.pop("tracer")} if "tracer" in options else {}))
    Outbox(bus, engine, **options)
    first: list[BaseEvent] = []
    second: list[BaseEvent] = []

    async def one(event: BaseEvent) -> None:
        first.append(event)

    async def two(event: BaseEvent) -> None:
        second.append(event)

    await bus.registry.register(topic, one, name=f"{topic}:one")
    await bus.registry.register(topic, two, name=f"{topic}:two")
    await bus.start()
    return bus, first, second


async def test_rolled_back_transaction_publishes_nothing(
    make_bus: Callable[..., EventBus], pg_engine: AsyncEngine, topic: str
) -> None:
    bus, first, second = await outbox_bus(make_bus, pg_engine, topic)
    Session = async_sessionmaker(pg_engine)
    with pytest.raises(RuntimeError):
        async with Session() as session, session.begin():
            await bus.publish(Placed(topic=topic, seq=1), session=session)
            raise RuntimeError("the endpoint failed after publishing")
    assert await pending(pg_engine) == 0  # nothing was written
    sent = await marker(bus, pg_engine, topic)  # relayed after the rollback
    await wait_for(lambda: sent.event_id in ids(first) and sent.event_id in ids(second), "marker")
    await settled(bus, pg_engine)
    assert ids(first) == ids(second) == [sent.event_id]  # the rolled-back event never left


async def test_committed_event_reaches_every_handler_once(
    make_bus: Callable[..., EventBus], pg_engine: AsyncEngine, topic: str
) -> None:
    bus, first, second = await outbox_bus(make_bus, pg_engine, topic)
    Session = async_sessionmaker(pg_engine)
    event = Placed(topic=topic, key="order-1", seq=7)
    async with Session() as session, session.begin():
        await bus.publish(event, session=session)
        # Uncommitted: nothing may leave meanwhile.  A marker committed on another
        # key reaches both handlers, so the relay has looked, and passed this one by.
        sent = await marker(bus, pg_engine, topic)
        await wait_for(lambda: len(first) == 1 and len(second) == 1, "the marker")
        assert ids(first) == ids(second) == [sent.event_id]
    await wait_for(lambda: len(first) == 2 and len(second) == 2, "both handlers")
    await settled(bus, pg_engine)
    assert ids(first) == ids(second) == [sent.event_id, event.event_id]  # once each
    assert isinstance(first[1], Placed) and first[1].seq == 7 and first[1].key == "order-1"
    assert await pending(pg_engine) == 0  # sent rows are deleted by default


async def test_publish_many_writes_all_in_the_transaction(
    make_bus: Callable[..., EventBus], pg_engine: AsyncEngine, topic: str
) -> None:
    bus, first, _ = await outbox_bus(make_bus, pg_engine, topic)
    events = [Placed(topic=topic, key=f"k{i % 3}", seq=i) for i in range(20)]
    async with pg_engine.begin() as conn:  # an AsyncConnection works as well as a session
        await bus.publish_many(events, session=conn)
    await wait_for(lambda: len(first) == 20, "20 events")
    for key in ("k0", "k1", "k2"):
        seqs = [e.seq for e in first if isinstance(e, Placed) and e.key == key]
        assert seqs == sorted(seqs)


async def test_publish_with_a_session_needs_an_outbox(
    make_bus: Callable[..., EventBus], pg_engine: AsyncEngine, topic: str
) -> None:
    bus = make_bus()
    await bus.start()
    async with pg_engine.begin() as conn:
        with pytest.raises(PublishError, match=r"Outbox\(bus, engine\)"):
            await bus.publish(Placed(topic=topic), session=conn)


async def test_same_key_transactions_are_relayed_in_commit_order(
    make_bus: Callable[..., EventBus], pg_engine: AsyncEngine, topic: str
) -> None:
    """The second transaction on a key waits for the first: ids follow commit order."""
    bus, first, _ = await outbox_bus(make_bus, pg_engine, topic)
    Session = async_sessionmaker(pg_engine)
    key = f"acct-{topic}"  # no other test (or test run) locks it
    first_published = asyncio.Event()
    release_first = asyncio.Event()

    async def slow_first() -> None:
        async with Session() as session, session.begin():
            await bus.publish(Placed(topic=topic, key=key, seq=1), session=session)
            first_published.set()
            await release_first.wait()

    async def second() -> float:
        await first_published.wait()
        async with Session() as session, session.begin():
            await bus.publish(Placed(topic=topic, key=key, seq=2), session=session)
        return time.monotonic()

    task_one = asyncio.create_task(slow_first())
    task_two = asyncio.create_task(second())
    waiting = (  # sessions waiting for the key's publishing lock
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
        "AND objsubid = 2 AND classid::bigint = :lock_class AND objid::bigint = :key_lock "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    params = {
        "lock_class": lock_class(outbox_table, 0) & 0xFFFFFFFF,
        "key_lock": key_lock(key) & 0xFFFFFFFF,
    }
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while True:
        async with pg_engine.connect() as conn:
            if await conn.scalar(text(waiting), params) == 1:
                break
        assert time.monotonic() < deadline, "the second transaction never waited for the lock"
        await asyncio.sleep(0.01)
    assert not task_two.done()  # blocked on the key's lock until the first commits
    released = time.monotonic()
    release_first.set()
    await task_one
    assert await task_two >= released
    await wait_for(lambda: len(first) == 2, "both events")
    assert [e.seq for e in first if isinstance(e, Placed)] == [1, 2]


async def test_correlation_causation_and_trace_survive_the_relay(
    make_bus: Callable[..., EventBus],
    pg_engine: AsyncEngine,
    topic: str,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    tracer = OpenTelemetryTracer(tracer_provider=provider)
    bus, first, _ = await outbox_bus(make_bus, pg_engine, topic, tracer=tracer)
    Session = async_sessionmaker(pg_engine)
    follow_up = f"{topic}.next"
    caused: list[tuple[BaseEvent, str]] = []

    async def chain(event: BaseEvent) -> None:  # a handler publishing through the outbox
        if event.topic == topic:
            async with Session() as session, session.begin():
                await bus.publish(Placed(topic=follow_up, seq=2), session=session)

    async def downstream(event: BaseEvent) -> None:
        cause = get_current_event()
        caused.append((event, correlation_id_var.get() if cause else ""))

    await bus.registry.register(topic, chain, name=f"{topic}:chain")
    await bus.registry.register(follow_up, downstream, name=f"{follow_up}:down")
    await bus.subscribe(topic)
    await bus.subscribe(follow_up)

    request = provider.get_tracer("test").start_span("POST /orders")
    from opentelemetry import trace

    token = correlation_id_var.set("req-42")
    try:
        with trace.use_span(request, end_on_exit=True):
            event = Placed(topic=topic, seq=1)
            async with Session() as session, session.begin():
                await bus.publish(event, session=session)
    finally:
        correlation_id_var.reset(token)
    await wait_for(lambda: len(caused) == 1 and len(first) == 1, "the chain")
    assert first[0].metadata["correlation_id"] == "req-42"
    relayed, cid = caused[0]
    assert cid == "req-42"
    assert relayed.metadata["correlation_id"] == "req-42"
    assert relayed.metadata["causation_id"] == event.event_id
    await bus.drain(5)
    request_trace = request.get_span_context().trace_id
    handler_spans = [s for s in exporter.get_finished_spans() if s.name.endswith("process")]
    assert handler_spans, [s.name for s in exporter.get_finished_spans()]
    assert {s.context.trace_id for s in handler_spans} == {request_trace}


async def test_retention_keeps_sent_rows_until_cleanup(
    make_bus: Callable[..., EventBus], pg_engine: AsyncEngine, topic: str
) -> None:
    bus, first, _ = await outbox_bus(make_bus, pg_engine, topic, retention=3600)
    async with pg_engine.begin() as conn:
        await bus.publish_many([Placed(topic=topic, seq=i) for i in range(3)], session=conn)
    await wait_for(lambda: len(first) == 3, "3 events")
    await settled(bus, pg_engine)  # the relay marked them sent
    async with pg_engine.begin() as conn:
        sent = await conn.scalar(
            text("SELECT count(*) FROM eventbus_outbox WHERE sent_at IS NOT NULL")
        )
        assert sent == 3 and await pending(pg_engine) == 0
        await conn.execute(text("UPDATE eventbus_outbox SET sent_at = now() - interval '2 hours'"))
    relay = bus.outbox.relay if bus.outbox else None
    assert relay is not None
    async with pg_engine.connect() as conn:
        await relay._cleanup(conn)  # what the relay runs every minute
    async with pg_engine.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM eventbus_outbox")) == 0


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_notification_wakes_the_relay_long_before_its_poll(
    make_bus: Callable[..., EventBus], pg_url: str, pg_engine: AsyncEngine, topic: str, driver: str
) -> None:
    engine = create_async_engine(pg_url.replace("+asyncpg", f"+{driver}"))
    try:
        bus, first, _ = await outbox_bus(make_bus, engine, topic, poll_interval=30.0)
        assert bus.outbox is not None and bus.outbox.relay is not None
        relay = bus.outbox.relay
        await wait_for(lambda: relay.listening and len(relay.shards) == SHARDS, "the relay")
        latencies = []
        for seq in range(5):
            async with engine.begin() as conn:
                await bus.publish(Placed(topic=topic, seq=seq), session=conn)
            committed = time.monotonic()
            await wait_for(lambda n=seq + 1: len(first) == n, "the event", timeout=5)
            latencies.append(time.monotonic() - committed)
        assert max(latencies) < 3.0, latencies  # the poll would take 30 s
    finally:
        await bus.stop()
        await engine.dispose()


async def test_polling_relays_without_notifications(
    make_bus: Callable[..., EventBus], pg_engine: AsyncEngine, topic: str
) -> None:
    bus, first, _ = await outbox_bus(make_bus, pg_engine, topic, listen=False, poll_interval=0.1)
    async with pg_engine.begin() as conn:
        await bus.publish(Placed(topic=topic), session=conn)
    await wait_for(lambda: len(first) == 1, "the polled event", timeout=3)


async def test_health_and_metrics_show_lag_pending_and_relays(
    make_bus: Callable[..., EventBus], pg_engine: AsyncEngine, topic: str
) -> None:
    registry = CollectorRegistry()
    writer = make_bus(metrics=PrometheusMetricsCollector(registry=registry))
    outbox = Outbox(writer, pg_engine, relay=False, lag_warning=0.05)
    await writer.start()
    async with pg_engine.begin() as conn:
        await writer.publish_many([Placed(topic=topic, seq=i) for i in range(4)], session=conn)
    while True:  # until the rows are older than lag_warning: "no relay" still wins
        health = {r.backend: r for r in await writer.health.check()}
        stats = outbox.stats
        if stats is not None and stats.lag > 0.05:
            break
        await asyncio.sleep(0.01)
    assert health["outbox"].status is HealthStatus.UNHEALTHY
    assert "4 pending" in health["outbox"].detail and "no relay" in health["outbox"].detail
    scrape = generate_latest(registry).decode()
    assert "eventbus_outbox_pending 4.0" in scrape
    assert "eventbus_outbox_relays 0.0" in scrape

    relaying, first, _ = await outbox_bus(make_bus, pg_engine, topic)
    await wait_for(lambda: len(first) == 4, "the relay in another bus")
    health = {r.backend: r for r in await relaying.health.check()}
    assert health["outbox"].status is HealthStatus.HEALTHY, health["outbox"]
    assert "0 pending" in health["outbox"].detail and "1 relay(s)" in health["outbox"].detail
    assert health["outbox.relay"].status is HealthStatus.HEALTHY, health["outbox.relay"]
    assert f"{SHARDS} shard(s)" in health["outbox.relay"].detail


async def test_two_relays_share_the_shards(
    make_bus: Callable[..., EventBus], pg_engine: AsyncEngine, topic: str
) -> None:
    one, _, _ = await outbox_bus(make_bus, pg_engine, topic)
    two, _, _ = await outbox_bus(make_bus, pg_engine, topic)
    relays = [bus.outbox.relay for bus in (one, two) if bus.outbox and bus.outbox.relay]
    await wait_for(
        lambda: sorted(len(r.shards) for r in relays) == [SHARDS // 2] * 2,
        "an even split",
        timeout=15,
    )
    assert not relays[0].shards & relays[1].shards
    await one.stop()
    await wait_for(lambda: len(relays[1].shards) == SHARDS, "the survivor taking all", timeout=15)


async def test_a_refused_batch_stays_pending_and_is_retried(
    make_bus: Callable[..., EventBus], pg_engine: AsyncEngine, topic: str
) -> None:
    bus, first, _ = await outbox_bus(make_bus, pg_engine, topic)
    publish = bus.backend.publish
    refusals = 2

    async def refuse_twice(events: list[Any], *, strict: bool = False) -> set[str]:
        nonlocal refusals
        if refusals:
            refusals -= 1
            raise PublishError("the backend is down")
        return await publish(events, strict=strict)

    bus.backend.publish = refuse_twice  # type: ignore[method-assign]
    async with pg_engine.begin() as conn:
        await bus.publish(Placed(topic=topic, seq=1), session=conn)
    relay = bus.outbox.relay if bus.outbox else None
    assert relay is not None
    await wait_for(lambda: relay.errors >= 1, "the first refusal")
    health = {r.backend: r for r in await bus.health.check()}
    if refusals:  # still failing: degraded, the error shown, the row kept
        assert health["outbox.relay"].status is HealthStatus.DEGRADED, health["outbox.relay"]
        assert "the backend is down" in health["outbox.relay"].detail
    await wait_for(lambda: len(first) == 1, "the retried event")
    await wait_for(lambda: relay.last_error == "", "the batch committed")
    assert relay.errors == 2
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while await pending(pg_engine):  # its row goes once the relay's transaction commits
        assert time.monotonic() < deadline, "the sent row stayed pending"
        await asyncio.sleep(0.01)


async def test_relay_reconnects_after_losing_its_database_connections(
    make_bus: Callable[..., EventBus], pg_engine: AsyncEngine, topic: str
) -> None:
    bus, first, _ = await outbox_bus(make_bus, pg_engine, topic)
    relay = bus.outbox.relay if bus.outbox else None
    assert relay is not None
    await wait_for(lambda: relay.listening and len(relay.shards) == SHARDS, "the relay")
    async with pg_engine.begin() as conn:  # kill every other connection to this database
        killed = await conn.scalar(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
    assert killed and killed >= 2  # the relay's work and LISTEN connections
    async with pg_engine.begin() as conn:
        await bus.publish(Placed(topic=topic, seq=1), session=conn)
    await wait_for(lambda: len(first) == 1, "the event after the reconnection")
    await wait_for(lambda: relay.listening and len(relay.shards) == SHARDS, "the relay back")
    assert relay.errors >= 1 and relay.running


async def test_closing_the_listener_never_swallows_the_callers_cancellation(pg_url: str) -> None:
    from eventbus.outbox.listen import Listener

    # psycopg: its listener is a task of ours that close() cancels and waits for.
    engine = create_async_engine(pg_url.replace("+asyncpg", "+psycopg"))
    try:
        listener = Listener(engine, "eventbus_test_cancel", wake=lambda: None)
        assert await listener.start()
        closer = asyncio.create_task(listener.close())
        await asyncio.sleep(0)  # close() now waits for the listening task to end
        closer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closer
        assert closer.cancelled()
        assert not listener.listening
        assert engine.pool.checkedout() == 0  # its connection is closed all the same
    finally:
        await engine.dispose()
