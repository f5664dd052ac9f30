"""The outbox across real processes, on Redis and on Kafka, against real PostgreSQL.

Worker processes run :mod:`tests.outbox_handlers`, which record every delivery
in PostgreSQL: counting rows tells what was delivered, how often, and in which
order.  Web processes and relays are killed with SIGKILL: no shutdown code runs.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from eventbus import EventBus
from eventbus.context import correlation_id_var
from eventbus.outbox.outbox import Outbox
from eventbus.outbox.schema import lock_class, outbox_table

pytest.register_assert_rewrite("tests.redis_support", "tests.outbox_support")
from tests.kafka_helpers import create_topic  # noqa: E402
from tests.outbox_events import Placed  # noqa: E402
from tests.outbox_support import (  # noqa: E402
    KAFKA_PARTITIONS,
    PENDING,
    Stack,
    count,
    kafka_stack,
    redis_stack,
    wait_rows,
)

pytest_plugins = ["tests.pg_support", "tests.redis_support", "tests.kafka_support"]

_topics = itertools.count()

DELIVERIES = "SELECT count(*) FROM outbox_test_deliveries WHERE handler = :handler"
DISTINCT = "SELECT count(DISTINCT event_id) FROM outbox_test_deliveries WHERE handler = :handler"
EFFECTS = "SELECT count(*) FROM outbox_test_effects"
DISTINCT_EFFECTS = "SELECT count(DISTINCT event_id) FROM outbox_test_effects"
HANDLERS = ("record", "audit", "apply")


@pytest.fixture(params=["redis", "kafka"])
async def stack(
    request: pytest.FixtureRequest, pg_url: str, tmp_path: Path
) -> AsyncIterator[Stack]:
    """Redis or Kafka for this test, with the test's own topic (and namespace or group)."""
    topic = f"outbox.{os.getpid()}.{next(_topics)}"
    if request.param == "redis":
        made = redis_stack(
            pg_url,
            request.getfixturevalue("redis_url"),
            request.getfixturevalue("namespace"),
            tmp_path,
            topic,
            request.getfixturevalue("workers"),
        )
    else:
        bootstrap = request.getfixturevalue("kafka_bootstrap")
        _, group = request.getfixturevalue("kafka_names")
        await create_topic(bootstrap, topic, KAFKA_PARTITIONS)
        made = kafka_stack(pg_url, bootstrap, group, tmp_path, topic)
    try:
        yield made
    finally:
        made.stop_all()


async def writer(stack: Stack, engine: AsyncEngine, **options: object) -> EventBus:
    """A started publishing bus of ``stack`` with an outbox on ``engine``."""
    bus = stack.make_bus()
    Outbox(bus, engine, **options)
    await bus.start()
    return bus


async def exactly(engine: AsyncEngine, sql: str, expected: int, **params: object) -> None:
    found = await count(engine, sql, **params)
    assert found == expected, f"{sql} {params}: {found}, expected {expected}"


async def test_commit_delivers_once_to_every_handler_and_rollback_nothing(
    stack: Stack, pg_engine: AsyncEngine
) -> None:
    await stack.start_worker()
    bus = await writer(stack, pg_engine)  # the relay runs in this (web) process
    sessions = async_sessionmaker(pg_engine)
    try:
        with pytest.raises(RuntimeError):
            async with sessions() as session, session.begin():
                await bus.publish(Placed(topic=stack.topic, key="rolled-back"), session=session)
                raise RuntimeError("the endpoint failed after publishing")
        token = correlation_id_var.set("request-7")  # as EventBusMiddleware sets it
        try:
            for seq in range(30):
                async with sessions() as session, session.begin():
                    await bus.publish(
                        Placed(topic=stack.topic, key=f"k{seq % 3}", seq=seq), session=session
                    )
        finally:
            correlation_id_var.reset(token)
        await wait_rows(pg_engine, "SELECT count(*) FROM outbox_test_deliveries", 90)
        await stack.wait_settled(pg_engine, records=30)  # any extra delivery happened by now
        for handler in HANDLERS:
            await exactly(pg_engine, DELIVERIES, 30, handler=handler)
            await exactly(pg_engine, DISTINCT, 30, handler=handler)
        await exactly(pg_engine, EFFECTS, 30)
        await exactly(
            pg_engine, "SELECT count(*) FROM outbox_test_deliveries WHERE key = 'rolled-back'", 0
        )
        await exactly(pg_engine, PENDING, 0)
        # The request's correlation id reached every handler's context through the relay.
        await exactly(
            pg_engine,
            "SELECT count(*) FROM outbox_test_deliveries WHERE correlation_id = 'request-7'",
            90,
        )
    finally:
        await bus.stop()


async def test_web_process_killed_after_commit_is_delivered_by_a_new_relay(
    stack: Stack, pg_engine: AsyncEngine
) -> None:
    await stack.start_worker()
    web = stack.start(["tests/outbox_web.py", "25"])
    assert await asyncio.to_thread(web.popen.wait, 60) == -9, web.output()
    assert "committed" in web.output()
    await exactly(pg_engine, PENDING, 25)  # committed, never sent

    relay = stack.start_relay()
    await relay.wait_output("outbox relay running")
    await wait_rows(pg_engine, EFFECTS, 25)
    await wait_rows(pg_engine, "SELECT count(*) FROM outbox_test_deliveries", 75)
    await stack.wait_settled(pg_engine, records=25)
    for handler in HANDLERS:
        await exactly(pg_engine, DELIVERIES, 25, handler=handler)
    await exactly(pg_engine, PENDING, 0)
    assert relay.terminate() == 0, relay.output()
    assert "25 events relayed" in relay.output()


async def test_relay_killed_mid_batch_loses_nothing_and_applies_effects_once(
    stack: Stack, pg_engine: AsyncEngine
) -> None:
    total, batch = 500, 100
    bus = await writer(stack, pg_engine, relay=False)
    try:
        async with pg_engine.begin() as conn:
            events = [Placed(topic=stack.topic, key=f"k{i % 10}", seq=i) for i in range(total)]
            await bus.publish_many(events, session=conn)
    finally:
        await bus.stop()
    await stack.start_worker()
    slow = stack.start(
        ["tests/outbox_slow_relay.py"],
        {"EVENTBUS_OUTBOX_BATCH_SIZE": str(batch), "OUTBOX_TEST_PAUSE": "60"},
    )
    await slow.wait_output(f"sent {batch}")  # in the backend, not committed in PostgreSQL
    slow.kill()
    await exactly(pg_engine, PENDING, total)

    relay = stack.start_relay()
    await wait_rows(pg_engine, DISTINCT, total, handler="record")
    await wait_rows(pg_engine, EFFECTS, total)
    await stack.wait_settled(pg_engine, records=total + batch)  # the killed batch sent twice
    duplicates = {
        handler: await count(pg_engine, DELIVERIES, handler=handler) - total for handler in HANDLERS
    }
    print(f"{stack.backend}: duplicates after the relay's SIGKILL: {duplicates}")
    assert duplicates == dict.fromkeys(HANDLERS, batch)  # the killed batch, sent twice
    await exactly(pg_engine, EFFECTS, total)  # the idempotent handler: once per event
    await exactly(pg_engine, DISTINCT_EFFECTS, total)
    await exactly(pg_engine, PENDING, 0)
    assert relay.terminate() == 0, relay.output()


async def test_two_relays_deliver_every_row_in_order_per_key(
    stack: Stack, pg_engine: AsyncEngine
) -> None:
    total, keys, per_transaction = 1000, 20, 10
    await stack.start_worker(threads=1)  # one at a time: handling order is queue order
    small_batches = {"EVENTBUS_OUTBOX_BATCH_SIZE": "20"}
    relays = [stack.start_relay(small_batches), stack.start_relay(small_batches)]
    for relay in relays:
        await relay.wait_output("outbox relay running")
    holders = (  # processes holding shard locks of the outbox
        "SELECT count(DISTINCT pid) FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND objsubid = 2 AND classid::bigint = :shard_class AND database = "
        "(SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    await wait_rows(
        pg_engine, holders, 2, timeout=20, shard_class=lock_class(outbox_table, 1) & 0xFFFFFFFF
    )
    bus = await writer(stack, pg_engine, relay=False)
    sessions = async_sessionmaker(pg_engine)
    try:
        for start in range(0, total, per_transaction):
            async with sessions() as session, session.begin():
                await bus.publish_many(
                    [
                        Placed(topic=stack.topic, key=f"k{i % keys}", seq=i)
                        for i in range(start, start + per_transaction)
                    ],
                    session=session,
                )
            await asyncio.sleep(0.003)  # a steady flow while the relays rebalance
    finally:
        await bus.stop()
    await wait_rows(pg_engine, DISTINCT, total, handler="record", timeout=90)
    await wait_rows(pg_engine, EFFECTS, total)
    relayed = []
    for relay in relays:
        assert relay.terminate() == 0, relay.output()
        found = re.search(r"\((\d+) events relayed\)", relay.output())
        assert found, relay.output()
        relayed.append(int(found[1]))
    print(f"{stack.backend}: events relayed by each relay: {relayed}")
    assert sum(relayed) == total  # none lost, none sent twice (no relay died)
    assert min(relayed) > 0  # both took part
    async with pg_engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT key, seq FROM outbox_test_deliveries WHERE handler = 'record' "
                    "ORDER BY id"
                )
            )
        ).all()
    seen: dict[str, list[int]] = {}
    for key, seq in rows:
        seen.setdefault(key, []).append(seq)
    assert len(seen) == keys
    for key, seqs in seen.items():
        assert seqs == sorted(seqs), f"{key} out of order: {seqs}"
    await exactly(pg_engine, EFFECTS, total)


async def test_idempotent_handler_applies_once_when_a_killed_worker_is_redelivered(
    pg_url: str,
    pg_engine: AsyncEngine,
    redis_url: str,
    namespace: str,
    workers: object,
    tmp_path: Path,
) -> None:
    """The handler committed its effect, then its worker died before the ack: Redis
    delivers the event again to another worker, which skips it."""
    stack = redis_stack(
        pg_url,
        redis_url,
        namespace,
        tmp_path,
        f"outbox.{os.getpid()}.{next(_topics)}",
        workers,  # type: ignore[arg-type]
    )
    try:
        hanging = await stack.start_worker({"OUTBOX_TEST_HANG_AFTER_APPLY": "1"}, threads=8)
        bus = await writer(stack, pg_engine)
        try:
            async with pg_engine.begin() as conn:
                await bus.publish_many(
                    [Placed(topic=stack.topic, key=f"k{i}", seq=i) for i in range(5)], session=conn
                )
            await wait_rows(pg_engine, EFFECTS, 5)  # committed; the handlers now hang
        finally:
            await bus.stop()
        hanging.kill()
        await stack.start_worker()
        # Redelivered once the dead worker's redelivery timeout passes.
        await wait_rows(pg_engine, DELIVERIES, 10, timeout=30, handler="apply")
        await stack.wait_settled(pg_engine, records=5)
        await exactly(pg_engine, DELIVERIES, 10, handler="apply")  # each event twice
        await exactly(pg_engine, EFFECTS, 5)  # its effect once
        await exactly(pg_engine, DISTINCT_EFFECTS, 5)
    finally:
        stack.stop_all()


def test_relay_command_without_a_database_url_is_refused(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")}
    env["EVENTBUS_BACKEND"] = "redis"
    done = subprocess.run(
        [sys.executable, "-m", "eventbus.cli", "outbox", "relay"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "EVENTBUS_OUTBOX_DATABASE_URL" in done.stderr
