"""Transactional outbox benchmark: endpoint cost, relay throughput, commit-to-handler latency.

Usage (from the repo root): python bench/outbox_bench.py [--n 20000] [--ops 2000]
[--repeat 5] [--pg-url postgresql://postgres@127.0.0.1:5432/postgres] [--drivers asyncpg,psycopg]

Runs against the PostgreSQL server at ``--pg-url`` in a database of its own
(created and dropped) and a ``redis-server`` it starts on a free loopback port.
Per SQLAlchemy driver (asyncpg, psycopg 3), in one run:

* **endpoint**: what an endpoint that creates a user costs, sequential awaited
  calls, no HTTP: ``INSERT`` a row and ``bus.publish(event, session=...)`` in one
  transaction, vs the reference ``INSERT``, ``COMMIT``, then a plain
  ``bus.publish(event)`` to Redis (the dual write the outbox replaces).  Both as
  one user-written ``async with session.begin()``; the relay is off meanwhile (its
  cost is the next row).  Calls alternate one by one between the two (the
  machine's load hits both alike); ``--ops`` pairs per round, median of
  ``--repeat`` rounds and the spread (min-max).
* **relay/s**: ``--n`` rows already committed; one relay (``batch_size`` 500)
  starts; rows / time until none is pending.  The events reach a real
  subscription queue in Redis (fan-out script), no worker consumes them.
* **commit-to-handler p50/p99**: one event at a time, a handler in this process
  (Redis backend with ``consume=True``: a dramatiq worker thread); time from the
  transaction's commit returning to the handler starting, LISTEN/NOTIFY waking
  the relay.  Reference: ``COMMIT`` then plain ``publish``, publish start to
  handler start.

The machine has 2 cores, shared with whatever else runs: read the spreads.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from sqlalchemy import BigInteger, Column, Identity, MetaData, Table, Text, insert, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from eventbus import BaseEvent, EventBus, EventBusSettings
from eventbus.outbox.outbox import Outbox
from eventbus.outbox.schema import create_tables
from eventbus.redis.backend import RedisBackend

bench_metadata = MetaData()
users = Table(
    "bench_users",
    bench_metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("name", Text, nullable=False),
)


class UserCreated(BaseEvent):
    topic: str = "bench.user.created"
    user_id: int = 0
    username: str = ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    binary = shutil.which("redis-server") or "redis-server"
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.02)
    return process, f"redis://127.0.0.1:{port}/0"


def spread(values: list[float]) -> str:
    return f"{min(values):,.0f}-{max(values):,.0f}"


async def make_bus(redis_url: str, consume: bool = False) -> EventBus:
    """A Redis bus whose topic has one subscription (written as a worker would)."""
    bus = EventBus(
        backend=RedisBackend(redis_url, namespace=f"obb{uuid.uuid4().hex[:6]}"),
        settings=EventBusSettings(shutdown_timeout=5, consume=consume),
    )
    return bus


async def endpoint_rounds(
    engine: AsyncEngine, redis_url: str, ops: int, repeat: int
) -> dict[str, Any]:
    bus = await make_bus(redis_url)
    received = 0

    async def handler(event: BaseEvent) -> None:
        nonlocal received
        received += 1

    await bus.registry.register(UserCreated, handler, name="bench-endpoint")
    Outbox(bus, engine, relay=False)
    await bus.start()
    await asyncio.to_thread(bus.backend.register_subscriptions)  # type: ignore[attr-defined]
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    async def with_outbox(i: int) -> None:
        async with sessions() as session, session.begin():
            await session.execute(insert(users).values(name=f"user{i}"))
            await bus.publish(UserCreated(user_id=i, username=f"user{i}"), session=session)

    async def publish_after_commit(i: int) -> None:
        async with sessions() as session, session.begin():
            await session.execute(insert(users).values(name=f"user{i}"))
        await bus.publish(UserCreated(user_id=i, username=f"user{i}"))

    async def round_us() -> tuple[float, float]:
        """Calls alternate one by one, so both paths meet the same load on the machine."""
        spent = [0.0, 0.0]
        clock = time.perf_counter
        for i in range(ops):
            started = clock()
            await with_outbox(i)
            middle = clock()
            await publish_after_commit(i)
            spent[0] += middle - started
            spent[1] += clock() - middle
        return spent[0] / ops * 1e6, spent[1] / ops * 1e6

    for i in range(200):  # warm both paths
        await with_outbox(i)
        await publish_after_commit(i)
    outbox_us: list[float] = []
    plain_us: list[float] = []
    for _ in range(repeat):
        one, other = await round_us()
        outbox_us.append(one)
        plain_us.append(other)
    await bus.stop()
    async with engine.begin() as conn:
        await conn.execute(text("TRUNCATE eventbus_outbox, bench_users"))
    ratios = [o / p for o, p in zip(outbox_us, plain_us, strict=True)]
    return {"outbox": outbox_us, "plain": plain_us, "ratio": ratios}


async def relay_rounds(engine: AsyncEngine, redis_url: str, n: int, repeat: int) -> list[float]:
    rates = []
    for _ in range(repeat):
        bus = await make_bus(redis_url)

        async def handler(event: BaseEvent) -> None:
            pass

        await bus.registry.register(UserCreated, handler, name="bench-relay")
        outbox = Outbox(bus, engine, relay=False)
        await bus.start()
        await asyncio.to_thread(bus.backend.register_subscriptions)  # type: ignore[attr-defined]
        async with engine.begin() as conn:
            for start in range(0, n, 1000):
                await bus.publish_many(
                    [UserCreated(user_id=i) for i in range(start, min(n, start + 1000))],
                    session=conn,
                )
        outbox.settings = outbox.settings.model_copy(update={"relay": True})
        started = time.perf_counter()
        await outbox.start()
        async with engine.connect() as conn:
            while True:
                left = await conn.scalar(text("SELECT count(*) FROM eventbus_outbox"))
                await conn.commit()
                if not left:
                    break
                await asyncio.sleep(0.005)
        rates.append(n / (time.perf_counter() - started))
        await bus.stop()
        pending = await bus.backend.pending()  # type: ignore[attr-defined]
        assert pending == n, f"{pending} events in Redis, expected {n}"
    return rates


async def latency_rounds(
    engine: AsyncEngine, redis_url: str, count: int, repeat: int
) -> dict[str, list[float]]:
    bus = await make_bus(redis_url, consume=True)
    loop = asyncio.get_running_loop()
    waiting: dict[str, tuple[asyncio.Future[float], float]] = {}

    async def handler(event: BaseEvent) -> None:
        now = time.perf_counter()
        future, _ = waiting[event.event_id]
        loop.call_soon_threadsafe(future.set_result, now)

    await bus.registry.register(UserCreated, handler, name="bench-latency")
    Outbox(bus, engine, poll_interval=30.0)  # LISTEN/NOTIFY or nothing
    await bus.start()
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    relay = bus.outbox.relay if bus.outbox else None
    while relay is None or not relay.listening or len(relay.shards) < 32:  # noqa: ASYNC110
        await asyncio.sleep(0.05)

    async def one(outbox: bool) -> float:
        event = UserCreated(user_id=1)
        future: asyncio.Future[float] = loop.create_future()
        waiting[event.event_id] = (future, 0.0)
        if outbox:
            async with sessions() as session, session.begin():
                await session.execute(insert(users).values(name="u"))
                await bus.publish(event, session=session)
            started = time.perf_counter()
        else:
            async with sessions() as session, session.begin():
                await session.execute(insert(users).values(name="u"))
            started = time.perf_counter()
            await bus.publish(event)
        handled = await asyncio.wait_for(future, 10)
        await asyncio.sleep(0.02)  # ~40 events/s: a quiet system, as a latency probe
        return (handled - started) * 1000

    result: dict[str, list[float]] = {
        "outbox_p50": [],
        "outbox_p99": [],
        "plain_p50": [],
        "plain_p99": [],
    }
    for _ in range(5):
        await one(True)
        await one(False)
    for _ in range(repeat):
        for name, use in (("outbox", True), ("plain", False)):
            samples = sorted([await one(use) for _ in range(count)])
            result[f"{name}_p50"].append(statistics.median(samples))
            result[f"{name}_p99"].append(samples[int(len(samples) * 0.99) - 1])
    await bus.stop()
    return result


async def run_driver(
    driver: str, url: str, redis_url: str, args: argparse.Namespace
) -> dict[str, Any]:
    engine = create_async_engine(url.replace("postgresql://", f"postgresql+{driver}://"))
    async with engine.begin() as conn:
        await conn.run_sync(bench_metadata.create_all)
    await create_tables(engine)
    try:
        endpoint = await endpoint_rounds(engine, redis_url, args.ops, args.repeat)
        relay = await relay_rounds(engine, redis_url, args.n, max(1, args.repeat // 2 + 1))
        latency = await latency_rounds(
            engine, redis_url, args.latency_count, max(1, args.repeat // 2 + 1)
        )
    finally:
        await engine.dispose()
    return {"endpoint": endpoint, "relay": relay, "latency": latency}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--n", type=int, default=20_000, help="rows for the relay throughput")
    parser.add_argument("--ops", type=int, default=2_000, help="endpoint calls per round")
    parser.add_argument("--latency-count", type=int, default=200, help="events per latency round")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--drivers", default="asyncpg,psycopg")
    parser.add_argument("--smoke", action="store_true", help="tiny run of every row in seconds")
    args = parser.parse_args()
    if args.smoke:
        args.n, args.ops, args.latency_count, args.repeat = 100, 20, 10, 1

    database = f"eventbus_bench_{os.getpid()}"
    with psycopg.connect(args.pg_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    url = args.pg_url.rsplit("/", 1)[0] + f"/{database}"
    redis_process, redis_url = start_redis()
    results: dict[str, dict[str, Any]] = {}
    try:
        for driver in args.drivers.split(","):
            results[driver] = asyncio.run(run_driver(driver, url, redis_url, args))
    finally:
        redis_process.terminate()
        redis_process.wait()
        with psycopg.connect(args.pg_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')

    print(
        f"\n## Outbox benchmark ({platform.python_version()}, {os.cpu_count()} cores, "
        f"repeat {args.repeat}; median and min-max)\n"
    )
    print(
        "| driver | outbox endpoint (us) | INSERT+COMMIT+publish (us) | ratio (target <= 1.3) "
        "| relay to Redis (events/s, target >= 10k) "
        "| commit-to-handler p50 / p99 (ms, target p50 <= 5) "
        "| publish-after-commit p50 / p99 (ms) |"
    )
    print("|---|---|---|---|---|---|---|")
    for driver, r in results.items():
        e, lat = r["endpoint"], r["latency"]
        print(
            f"| {driver} | {statistics.median(e['outbox']):,.0f} ({spread(e['outbox'])}) "
            f"| {statistics.median(e['plain']):,.0f} ({spread(e['plain'])}) "
            f"| {statistics.median(e['ratio']):.2f} ({min(e['ratio']):.2f}-{max(e['ratio']):.2f}) "
            f"| {statistics.median(r['relay']):,.0f} ({spread(r['relay'])}) "
            f"| {statistics.median(lat['outbox_p50']):.2f} ({min(lat['outbox_p50']):.2f}-"
            f"{max(lat['outbox_p50']):.2f}) / {statistics.median(lat['outbox_p99']):.2f} "
            f"| {statistics.median(lat['plain_p50']):.2f} / "
            f"{statistics.median(lat['plain_p99']):.2f} |"
        )


if __name__ == "__main__":
    main()
