"""Poison rows, refusals and unrouted events never stall or lose the outbox (issue 22).

Real PostgreSQL (``tests.pg_support``) and real Redis (the session's server, or
one started here with a small ``proto-max-bulk-len``).  Rows are corrupted the
way a hostile or broken writer would: written by the bus, then changed with SQL
in the same transaction, so the relay only ever sees the corrupt version.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import string
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from dramatiq import Message
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from eventbus import BaseEvent, EventBus, EventBusSettings, HealthStatus, PublishError
from eventbus.cli import run as run_cli
from eventbus.metrics import InMemoryMetricsCollector
from eventbus.outbox.inbox import idempotent
from eventbus.outbox.outbox import Outbox
from eventbus.outbox.relay import MAX_BACKOFF, Relay
from eventbus.outbox.schema import create_tables
from eventbus.prometheus import PrometheusMetricsCollector
from eventbus.redis.backend import RedisBackend
from eventbus.redis.scripts import bodies_key, ready_key
from tests import redis_handlers as h
from tests.outbox_events import Placed
from tests.redis_support import ROOT, RedisServer, queue_name, sync_subscriptions

pytest_plugins = ["tests.pg_support", "tests.redis_support"]

#: Seconds a delivery may take in these tests (LISTEN wakes the relay at once).
DELIVERY_TIMEOUT = 10.0
#: Seconds a held row or topic may wait: the longest backoff, plus a relay loop.
HOLD_TIMEOUT = MAX_BACKOFF + 5.0
REDIS_QUEUES = (queue_name(), queue_name(h.OTHER_QUEUE))


async def wait_for(
    predicate: Callable[[], bool], what: str, timeout: float = DELIVERY_TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.01)


async def scalar(engine: AsyncEngine, sql: str, **params: Any) -> Any:
    async with engine.connect() as conn:
        return await conn.scalar(text(sql), params)


async def wait_rows(engine: AsyncEngine, sql: str, expected: int, what: str, **params: Any) -> None:
    deadline = time.monotonic() + HOLD_TIMEOUT
    while (found := await scalar(engine, sql, **params)) != expected:
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: {sql} gave {found}, expected {expected}")
        await asyncio.sleep(0.05)


PENDING = "SELECT count(*) FROM eventbus_outbox WHERE sent_at IS NULL"
SET_ASIDE = "SELECT count(*) FROM eventbus_outbox_dead"


async def set_aside_rows(engine: AsyncEngine) -> dict[str, dict[str, Any]]:
    """The set-aside rows by event id."""
    async with engine.connect() as conn:
        rows = (await conn.execute(text("SELECT * FROM eventbus_outbox_dead ORDER BY id"))).all()
    return {row.event_id: dict(row._mapping) for row in rows}


async def corrupt(conn: AsyncConnection, event: BaseEvent, **columns: Any) -> None:
    """Overwrite columns of ``event``'s outbox row (in the caller's transaction)."""
    assignments = ", ".join(f"{name} = :{name}" for name in columns)
    await conn.execute(
        text(f"UPDATE eventbus_outbox SET {assignments} WHERE event_id = :event_id"),
        {**columns, "event_id": event.event_id},
    )


async def envelope_of(conn: AsyncConnection, event: BaseEvent) -> bytes:
    value = await conn.scalar(
        text("SELECT envelope FROM eventbus_outbox WHERE event_id = :id"), {"id": event.event_id}
    )
    return bytes(value)


async def relaying_bus(
    make_bus: Callable[..., EventBus],
    engine: AsyncEngine,
    topic: str,
    received: list[BaseEvent],
    **options: Any,
) -> EventBus:
    """A started embedded bus relaying ``engine``'s outbox, ``received`` gets ``topic``'s events."""
    bus_options = {k: options.pop(k) for k in ("metrics", "settings") if k in options}
    bus = make_bus(**bus_options)
    Outbox(bus, engine, **options)

    async def record(event: BaseEvent) -> None:
        received.append(event)

    await bus.registry.register(topic, record, name=f"{topic}:record")
    await bus.start()
    return bus


def relay_of(bus: EventBus) -> Relay:
    assert bus.outbox is not None and bus.outbox.relay is not None
    return bus.outbox.relay


async def health_of(bus: EventBus) -> dict[str, Any]:
    return {result.backend: result for result in await bus.health.check()}


# -- rows that cannot be decoded --------------------------------------------------------


async def test_row_with_options_not_an_object_is_set_aside_and_the_rest_relayed(
    make_bus: Callable[..., EventBus], pg_engine: AsyncEngine, topic: str
) -> None:
    registry = CollectorRegistry()
    received: list[BaseEvent] = []
    bus = await relaying_bus(
        make_bus,
        pg_engine,
        topic,
        received,
        metrics=PrometheusMetricsCollector(registry=registry),
    )
    events = [Placed(topic=topic, key=f"k{i}", seq=i) for i in range(3)]
    async with pg_engine.begin() as conn:
        await bus.publish_many(events, session=conn)
        await corrupt(conn, events[1], options="[1, 2]")
    await wait_for(lambda: len(received) == 2, "the two good events")
    assert sorted(e.event_id for e in received) == sorted([events[0].event_id, events[2].event_id])
    await wait_rows(pg_engine, SET_ASIDE, 1, "the poison row set aside")
    [row] = (await set_aside_rows(pg_engine)).values()
    assert row["event_id"] == events[1].event_id and "options" in row["reason"], row
    assert await scalar(pg_engine, PENDING) == 0

    # A second poison row later: the relay still runs and sets it aside too.
    later = Placed(topic=topic, key="later", seq=9)
    async with pg_engine.begin() as conn:
        await bus.publish(later, session=conn)
        await corrupt(conn, later, options='"a string"')
    await wait_rows(pg_engine, SET_ASIDE, 2, "the second poison row set aside")
    relay = relay_of(bus)
    assert relay.running and relay.failure is None
    assert relay.set_aside == 2

    health = await health_of(bus)
    assert health["outbox"].status is HealthStatus.DEGRADED, health["outbox"]
    assert "2 set aside" in health["outbox"].detail
    assert "eventbus outbox list" in health["outbox"].detail
    assert health["outbox.relay"].status is HealthStatus.HEALTHY, health["outbox.relay"]
    scrape = generate_latest(registry).decode()
    assert "eventbus_outbox_set_aside 2.0" in scrape
    assert "eventbus_outbox_set_aside_rows_total 2.0" in scrape
    await bus.stop()  # returns: nothing crashed
    assert not bus.started


async def test_envelopes_that_are_not_the_relays_json_are_set_aside(
    make_bus: Callable[..., EventBus], pg_engine: AsyncEngine, topic: str
) -> None:
    received: list[BaseEvent] = []
    bus = await relaying_bus(make_bus, pg_engine, topic, received)
    good = [Placed(topic=topic, key="good", seq=i) for i in range(2)]
    bad = {
        name: Placed(topic=topic, key=name)
        for name in ("not json", "array", "no event", "other id", "nan", "spliced", "other topic")
    }
    async with pg_engine.begin() as conn:
        await bus.publish(good[0], session=conn)
        await bus.publish_many(list(bad.values()), session=conn)
        await bus.publish(good[1], session=conn)
        envelope = {name: await envelope_of(conn, event) for name, event in bad.items()}
        decoded = {name: json.loads(value) for name, value in envelope.items()}
        await corrupt(conn, bad["not json"], envelope=b"{not json")
        await corrupt(conn, bad["array"], envelope=b"[1, 2]")
        await corrupt(conn, bad["no event"], envelope=json.dumps({"type": "x"}).encode())
        decoded["other id"]["event"]["event_id"] = "someone-else"
        await corrupt(conn, bad["other id"], envelope=json.dumps(decoded["other id"]).encode())
        await corrupt(conn, bad["nan"], envelope=envelope["nan"].replace(b'"seq":0', b'"seq":NaN'))
        await corrupt(
            conn,
            bad["spliced"],
            envelope=envelope["spliced"] + b'],"kwargs":{},"actor_name":"evil","args":[{}',
        )
        await corrupt(conn, bad["other topic"], options=json.dumps({"eventbus_topic": "other"}))
    await wait_for(lambda: len(received) == 2, "the two good events")
    assert [e.event_id for e in received] == [e.event_id for e in good]
    await wait_rows(pg_engine, SET_ASIDE, len(bad), "every bad row set aside")
    rows = await set_aside_rows(pg_engine)
    reasons = {name: rows[event.event_id]["reason"] for name, event in bad.items()}
    assert "not JSON" in reasons["not json"], reasons
    assert "not a JSON object" in reasons["array"], reasons
    assert "'event'" in reasons["no event"], reasons
    assert "someone-else" in reasons["other id"], reasons
    assert "not JSON" in reasons["nan"], reasons
    assert "trailing" in reasons["spliced"], reasons
    assert "topic" in reasons["other topic"], reasons
    assert all(row["attempts"] == 0 for row in rows.values())
    assert await scalar(pg_engine, PENDING) == 0


async def test_envelope_spliced_into_a_redis_message_never_reaches_another_actor(
    pg_engine: AsyncEngine, redis_url: str, namespace: str
) -> None:
    sync_subscriptions(redis_url, namespace)  # the handlers of tests.redis_handlers
    bus = EventBus(
        backend=RedisBackend(url=redis_url, namespace=namespace),
        settings=EventBusSettings(shutdown_timeout=2.0),
    )
    Outbox(bus, pg_engine)
    await bus.start()
    try:
        good, crafted = h.Numbered(n=1), h.Numbered(n=2)
        async with pg_engine.begin() as conn:
            await bus.publish_many([good, crafted], session=conn)
            original = await envelope_of(conn, crafted)
            # Valid JSON once spliced into the message: the last actor_name wins.
            attack = original + b'],"kwargs":{},"actor_name":"tests.evil","args":[' + original
            await corrupt(conn, crafted, envelope=attack)
        await wait_rows(pg_engine, SET_ASIDE, 1, "the crafted row set aside")
        await wait_rows(pg_engine, PENDING, 0, "the good row sent")
        client = redis.Redis.from_url(redis_url)
        actors, event_ids = [], []
        for queue in REDIS_QUEUES:
            for body in client.hvals(bodies_key(namespace, queue)):
                message = Message.decode(body)
                actors.append(message.actor_name)
                event_ids.append(message.args[0]["event"]["event_id"])
        client.close()
        assert event_ids == [good.event_id] * 2, event_ids
        assert not [a for a in actors if "evil" in a], actors
    finally:
        await bus.stop()


# -- rows refused for good ------------------------------------------------------------


async def test_envelope_over_the_bus_size_limit_is_set_aside_and_its_key_goes_on(
    make_bus: Callable[..., EventBus], pg_engine: AsyncEngine, topic: str
) -> None:
    writer = make_bus(settings=EventBusSettings(shutdown_timeout=2.0, max_event_bytes=1 << 20))
    Outbox(writer, pg_engine, relay=False)
    await writer.start()
    big = Placed(topic=topic, key="acct", seq=1, metadata={"blob": "x" * 5000})
    after = Placed(topic=topic, key="acct", seq=2)
    async with pg_engine.begin() as conn:
        await writer.publish_many([big, after], session=conn)

    received: list[BaseEvent] = []
    settings = EventBusSettings(shutdown_timeout=2.0, max_event_bytes=2048)
    await relaying_bus(make_bus, pg_engine, topic, received, settings=settings)
    await wait_for(lambda: len(received) == 1, "the event after the oversized one")
    assert received[0].event_id == after.event_id
    # The relay sends the next row before it commits the batch that sets this one
    # aside: the handler may run first.
    await wait_rows(pg_engine, SET_ASIDE, 1, "the oversized row set aside")
    rows = await set_aside_rows(pg_engine)
    assert "EVENTBUS_MAX_EVENT_BYTES=2048" in rows[big.event_id]["reason"], rows


async def test_row_redis_refuses_for_good_is_set_aside_and_the_others_flow(
    pg_engine: AsyncEngine, namespace: str
) -> None:
    server = RedisServer(args=("--proto-max-bulk-len", "1mb")).start()
    bus = EventBus(
        backend=RedisBackend(url=server.url, namespace=namespace),
        settings=EventBusSettings(shutdown_timeout=2.0, max_event_bytes=4 << 20),
    )
    try:
        sync_subscriptions(server.url, namespace)
        Outbox(bus, pg_engine)
        await bus.start()
        first, huge, last = h.Numbered(n=1), h.Numbered(n=2), h.Numbered(n=3)
        huge = h.Numbered(n=2, metadata={"blob": "x" * 1_200_000})  # over 1 MiB bulk
        async with pg_engine.begin() as conn:
            await bus.publish_many([first, huge, last], session=conn)
        await wait_rows(pg_engine, SET_ASIDE, 1, "the refused row set aside")
        await wait_rows(pg_engine, PENDING, 0, "the other rows sent")
        [row] = (await set_aside_rows(pg_engine)).values()
        assert row["event_id"] == huge.event_id
        assert row["attempts"] >= 3 and "bulk length" in row["reason"], row
        client = redis.Redis.from_url(server.url)
        queued = [
            Message.decode(body).args[0]["event"]["n"]
            for body in client.hvals(bodies_key(namespace, REDIS_QUEUES[0]))
        ]
        client.close()
        assert sorted(queued) == [1, 3]
    finally:
        await bus.stop()
        server.stop()


async def test_rows_wait_through_a_redis_outage_and_none_is_set_aside(
    pg_engine: AsyncEngine, namespace: str
) -> None:
    server = RedisServer().start()
    bus = EventBus(
        backend=RedisBackend(url=server.url, namespace=namespace, publish_timeout=1.0),
        settings=EventBusSettings(shutdown_timeout=2.0),
    )
    try:
        Outbox(bus, pg_engine)
        await bus.start()
        server.kill()
        events = [h.Numbered(n=i) for i in range(3)]
        async with pg_engine.begin() as conn:
            await bus.publish_many(events[:1], session=conn)
        async with pg_engine.begin() as conn:
            await bus.publish_many(events[1:], session=conn)
        relay = relay_of(bus)
        await wait_for(lambda: relay.errors >= 4, "several failed attempts", timeout=30)
        health = await health_of(bus)
        assert health["outbox.relay"].status is HealthStatus.DEGRADED, health["outbox.relay"]
        assert await scalar(pg_engine, SET_ASIDE) == 0
        assert await scalar(pg_engine, PENDING) == 3
        server.start()  # same port, empty: the subscriptions are written again
        sync_subscriptions(server.url, namespace)
        await wait_rows(pg_engine, PENDING, 0, "every row sent after the outage")
        assert await scalar(pg_engine, SET_ASIDE) == 0
        client = redis.Redis.from_url(server.url)
        assert client.hlen(bodies_key(namespace, REDIS_QUEUES[0])) == 3
        client.close()
    finally:
        await bus.stop()
        server.stop()


# -- the relay task itself ----------------------------------------------------------


class FailingMetrics(InMemoryMetricsCollector):
    """Raises from ``inc_published`` while ``failing`` is set: a bug in the relay's path."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = True

    def inc_published(self, topic: str) -> None:
        if self.failing:
            raise RuntimeError("metrics exploded")
        super().inc_published(topic)


async def test_relay_survives_any_exception_restarts_and_says_degraded_meanwhile(
    make_bus: Callable[..., EventBus], pg_engine: AsyncEngine, topic: str
) -> None:
    metrics = FailingMetrics()
    received: list[BaseEvent] = []
    bus = await relaying_bus(make_bus, pg_engine, topic, received, metrics=metrics)
    relay = relay_of(bus)
    # Each event crashes the relay after its batch committed; the restarts back off
    # (0.1 s, 0.2 s, 0.4 s, 0.8 s): health is read while the relay waits 0.8 s to restart.
    for seq in range(4):
        async with pg_engine.begin() as conn:
            await bus.publish(Placed(topic=topic, seq=seq), session=conn)
        await wait_for(lambda n=seq + 1: relay.errors >= n, f"crash {seq + 1}")
    assert relay.running and relay.failure is None
    assert "metrics exploded" in relay.last_error
    health = await health_of(bus)
    assert health["outbox.relay"].status is HealthStatus.DEGRADED, health["outbox.relay"]
    assert "metrics exploded" in health["outbox.relay"].detail
    assert len(received) == 4  # each batch was sent before the crash: nothing lost

    metrics.failing = False
    async with pg_engine.begin() as conn:
        await bus.publish(Placed(topic=topic, seq=9), session=conn)
    await wait_for(lambda: [e.seq for e in received if isinstance(e, Placed)][-1:] == [9], "#9")
    await wait_for(lambda: relay.last_error == "", "a clean loop", timeout=HOLD_TIMEOUT)
    health = await health_of(bus)
    assert health["outbox.relay"].status is HealthStatus.HEALTHY, health["outbox.relay"]
    await bus.stop()  # never re-raises what the relay went through
    assert not bus.started and not relay.running


# -- unrouted events --------------------------------------------------------------------


async def test_unrouted_event_is_kept_until_a_subscription_appears(
    make_bus: Callable[..., EventBus], pg_engine: AsyncEngine, topic: str
) -> None:
    bus = make_bus()
    Outbox(bus, pg_engine)
    await bus.start()
    event = Placed(topic=topic, seq=1)
    async with pg_engine.begin() as conn:
        await bus.publish(event, session=conn)
    relay = relay_of(bus)
    await wait_for(lambda: relay.unrouted_kept >= 1, "the relay trying the unrouted event")
    assert await scalar(pg_engine, PENDING) == 1  # kept, not dropped
    health = await health_of(bus)
    assert topic in health["outbox.relay"].detail, health["outbox.relay"]

    received: list[BaseEvent] = []

    async def late(got: BaseEvent) -> None:
        received.append(got)

    await bus.registry.register(topic, late, name=f"{topic}:late")
    await bus.subscribe(topic)
    await wait_for(lambda: len(received) == 1, "the kept event", timeout=HOLD_TIMEOUT)
    assert received[0].event_id == event.event_id
    await wait_rows(pg_engine, PENDING, 0, "the row sent")
    assert await scalar(pg_engine, SET_ASIDE) == 0


async def test_unrouted_rows_are_set_aside_after_the_unrouted_timeout(
    make_bus: Callable[..., EventBus], pg_engine: AsyncEngine, topic: str
) -> None:
    bus = make_bus()
    Outbox(bus, pg_engine, unrouted_timeout=0.5)
    await bus.start()
    event = Placed(topic=topic, seq=1)
    async with pg_engine.begin() as conn:
        await bus.publish(event, session=conn)
    await wait_rows(pg_engine, SET_ASIDE, 1, "the unrouted row set aside")
    row = (await set_aside_rows(pg_engine))[event.event_id]
    assert "no subscription" in row["reason"] and topic in row["reason"], row
    assert row["attempts"] >= 2
    assert await scalar(pg_engine, PENDING) == 0


async def test_event_relayed_before_any_redis_subscription_reaches_it(
    pg_engine: AsyncEngine, redis_url: str, namespace: str
) -> None:
    """A fresh deploy: the web process relays before any worker or `subscriptions sync`."""
    bus = EventBus(
        backend=RedisBackend(url=redis_url, namespace=namespace),
        settings=EventBusSettings(shutdown_timeout=2.0),
    )
    Outbox(bus, pg_engine)
    await bus.start()
    try:
        event = h.Numbered(n=7)
        async with pg_engine.begin() as conn:
            await bus.publish(event, session=conn)
        relay = relay_of(bus)
        await wait_for(lambda: relay.relayed + relay.unrouted_kept >= 1, "the relay trying it")
        if relay.unrouted_kept:  # the backend dropped it: the row must still be there
            assert await scalar(pg_engine, PENDING) == 1
        sync_subscriptions(redis_url, namespace)
        client = redis.Redis.from_url(redis_url)
        try:
            await wait_for(
                lambda: all(client.llen(ready_key(namespace, q)) == 1 for q in REDIS_QUEUES),
                "the event in both subscriptions' queues",
                timeout=HOLD_TIMEOUT,
            )
        finally:
            client.close()
        await wait_rows(pg_engine, PENDING, 0, "the row sent")
        # One copy: the relay never handed the unrouted event to Redis' unrouted window.
        client = redis.Redis.from_url(redis_url)
        assert [client.llen(ready_key(namespace, q)) for q in REDIS_QUEUES] == [1, 1]
        client.close()
    finally:
        await bus.stop()


async def test_unrouted_ignore_deletes_the_row_as_a_plain_publish_drops_the_event(
    make_bus: Callable[..., EventBus], pg_engine: AsyncEngine, topic: str
) -> None:
    metrics = InMemoryMetricsCollector()
    bus = make_bus(
        settings=EventBusSettings(shutdown_timeout=2.0, unrouted="ignore"), metrics=metrics
    )
    Outbox(bus, pg_engine)
    await bus.start()
    async with pg_engine.begin() as conn:
        await bus.publish(Placed(topic=topic), session=conn)
    await wait_rows(pg_engine, PENDING, 0, "the row deleted")
    assert await scalar(pg_engine, SET_ASIDE) == 0
    assert metrics.snapshot()["unrouted"] == {topic: 1}


# -- a database created before the set-aside table -------------------------------------


async def test_without_the_set_aside_table_poison_rows_wait_and_health_gives_the_ddl(
    make_bus: Callable[..., EventBus], pg_engine: AsyncEngine, topic: str
) -> None:
    async with pg_engine.begin() as conn:
        await conn.execute(text("DROP TABLE eventbus_outbox_dead"))
    received: list[BaseEvent] = []
    bus = await relaying_bus(make_bus, pg_engine, topic, received)
    events = [Placed(topic=topic, key=f"k{i}", seq=i) for i in range(3)]
    async with pg_engine.begin() as conn:
        await bus.publish_many(events, session=conn)
        await corrupt(conn, events[1], options="[]")
    await wait_for(lambda: len(received) == 2, "the good events")
    await wait_rows(pg_engine, PENDING, 1, "the poison row waiting (not lost)")
    health = await health_of(bus)
    assert health["outbox"].status is HealthStatus.DEGRADED, health["outbox"]
    assert "eventbus_outbox_dead" in health["outbox"].detail
    assert "CREATE TABLE eventbus_outbox_dead" in relay_of(bus).last_problem

    await create_tables(pg_engine)  # the migration
    await wait_rows(pg_engine, SET_ASIDE, 1, "the poison row set aside once the table exists")
    assert await scalar(pg_engine, PENDING) == 0


# -- the CLI ----------------------------------------------------------------------------


def cli(pg_url: str, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    bus = EventBus(settings=EventBusSettings())
    code = run_cli(["outbox", *argv, "--database-url", pg_url], bus, out, err)
    return code, out.getvalue(), err.getvalue()


async def test_cli_lists_retries_and_drops_set_aside_rows(
    make_bus: Callable[..., EventBus], pg_url: str, pg_engine: AsyncEngine, topic: str
) -> None:
    received: list[BaseEvent] = []
    bus = await relaying_bus(make_bus, pg_engine, topic, received)
    events = [Placed(topic=topic, key=f"k{i}", seq=i) for i in range(3)]
    async with pg_engine.begin() as conn:
        await bus.publish_many(events, session=conn)
        for event in events:
            await corrupt(conn, event, options="[]")
    await wait_rows(pg_engine, SET_ASIDE, 3, "three rows set aside")
    await bus.stop()  # no relay: retried rows stay pending where the test can see them

    code, out, _ = await asyncio.to_thread(cli, pg_url, "list", "--json")
    assert code == 0
    listed = json.loads(out)
    assert listed["size"] == 3
    assert [row["event_id"] for row in listed["items"]] == [e.event_id for e in events]
    assert all("options" in row["reason"] for row in listed["items"])
    code, out, _ = await asyncio.to_thread(cli, pg_url, "list")
    assert code == 0 and events[0].event_id in out and "3 shown, 3 set aside" in out

    first_id = str(listed["items"][0]["id"])
    code, out, _ = await asyncio.to_thread(cli, pg_url, "retry", first_id, "4242424242")
    assert code == 1 and "retried 1" in out and "missing 4242424242" in out
    assert await scalar(pg_engine, PENDING) == 1
    assert await scalar(pg_engine, SET_ASIDE) == 2

    code, _, err = await asyncio.to_thread(cli, pg_url, "drop", "--all")
    assert code == 2 and "--yes" in err
    code, out, _ = await asyncio.to_thread(cli, pg_url, "drop", "--all", "--yes")
    assert code == 0 and "dropped 2" in out
    assert await scalar(pg_engine, SET_ASIDE) == 0


async def test_relay_command_exits_non_zero_when_it_cannot_run(
    pg_url: str, pg_engine: AsyncEngine
) -> None:
    async with pg_engine.begin() as conn:
        await conn.execute(text("DROP TABLE eventbus_outbox"))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "EVENTBUS_BACKEND": "redis",
        "EVENTBUS_OUTBOX_DATABASE_URL": pg_url,
    }
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "eventbus.cli", "outbox", "relay"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "eventbus_outbox" in done.stderr and "create_tables" in done.stderr, done.stderr


# -- text PostgreSQL cannot store -----------------------------------------------------


async def test_inbox_takes_event_ids_postgresql_text_cannot_hold(pg_engine: AsyncEngine) -> None:
    calls: list[str] = []

    @idempotent(async_sessionmaker(pg_engine), name="test-nul")
    async def handler(event: Placed, session: AsyncSession) -> None:
        calls.append(event.event_id)

    rng = random.Random(22)
    long_id = "".join(rng.choice(string.ascii_letters) for _ in range(5000))
    ids = ["a\x00b", "a\x00c", long_id]
    for event_id in ids * 2:  # every event twice: each applied once
        await handler(Placed(event_id=event_id))  # type: ignore[misc]
    assert calls == ids


async def test_outbox_refuses_an_event_id_with_a_nul_and_says_why(
    make_bus: Callable[..., EventBus], pg_engine: AsyncEngine, topic: str
) -> None:
    bus = make_bus()
    Outbox(bus, pg_engine, relay=False)
    await bus.start()
    async with pg_engine.begin() as conn:
        with pytest.raises(PublishError, match="NUL character") as caught:
            await bus.publish(Placed(topic=topic, event_id="x\x00y"), session=conn)
        assert "event_id" in str(caught.value)
        # The transaction is intact: the caller can go on and commit.
        await bus.publish(Placed(topic=topic, seq=2), session=conn)
    assert await scalar(pg_engine, PENDING) == 1
