"""What the publisher's live schema check costs (``EVENTBUS_SCHEMA_CHECK``).

Usage (from the repo root):
    python bench/schema_check_bench.py [--n 5000] [--repeat 3] [--smoke]

Starts its own redis-server on a free loopback port (never the machine's Redis on
6379) and, for each variant, writes one subscription of the topic (as a worker
does) and measures N awaited ``bus.publish(event)`` one by one on ``RedisBackend``
(nobody consumes: the publish side only):

* **check off**: ``schema_check="off"``, the subscriber's schema stored (the reference);
* **check warn / error, compatible**: the publisher's class adds an optional field
  to the subscriber's (another hash: the check really compares);
* **check warn, no schema stored**: the subscription's handler is untyped;
* **check warn, breaking class**: a required field renamed: one WARNING, then every
  event counted (no collector here: the counting is a no-op).

The variants' publishers run side by side (a namespace each) and take turns in
chunks of 250 publishes, the order rotated per chunk, so the machine's load hits
them alike.  Columns: publishes/s (median of ``--repeat`` rounds), the ratio to
*check off* in the same round, Redis commands per event (``INFO stats``
``total_commands_processed`` over the N: the commands a script runs count, so the
fan-out script of one event counts ~25), the Redis commands of a fresh
publisher's first publish of the class (the check adds its one read there: a
script call and, when a schema is new to it, an ``HMGET``), and the time one
publish spends in the check once its verdict is cached (the check called alone,
in-process: the per-event cost the throughput column cannot resolve; 0 when the
check is off: it is not called).  ``--smoke`` runs tiny N once, in seconds, for
the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from eventbus import BaseEvent, EventBus, EventBusSettings  # noqa: E402
from eventbus.contracts.schemas import event_schema  # noqa: E402
from eventbus.redis.backend import RedisBackend  # noqa: E402
from eventbus.redis.subscriptions import register  # noqa: E402

NAMESPACE = "schemabench"
TOPIC = "bench.schema"
SERVICE = "bench"
QUEUE = f"{SERVICE}.eventbus"
ACTOR = "bench.handler"
#: Publishes before each timed row (connections opened, scripts cached, code warm).
WARMUP = 200
#: Publishes of one variant in a row before the next variant's turn.
CHUNK = 250
#: Calls of the cached check timed alone.
CHECK_CALLS = 20_000
#: Seconds the started redis-server may take.
READY_TIMEOUT = 15.0

OFF = "check off (reference)"
VARIANTS = {
    # name: (schema_check, subscriber stores a schema, publisher class)
    OFF: ("off", True, "compatible"),
    "check warn, compatible": ("warn", True, "compatible"),
    "check error, compatible": ("error", True, "compatible"),
    "check warn, no schema stored": ("warn", False, "compatible"),
    "check warn, breaking class": ("warn", True, "breaking"),
}


class Reader(BaseEvent):
    """The subscriber's class."""

    topic: str = TOPIC
    n: int
    payload: str


class Compatible(BaseEvent):
    """The publisher's class: a new optional field."""

    topic: str = TOPIC
    n: int
    payload: str
    note: str | None = None


class Breaking(BaseEvent):
    """The publisher's class: ``n`` renamed."""

    topic: str = TOPIC
    number: int
    payload: str


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def commands(client: redis.Redis) -> int:
    return int(client.info("stats")["total_commands_processed"])


def event(kind: str, i: int) -> BaseEvent:
    if kind == "breaking":
        return Breaking(number=i, payload="x" * 64)
    return Compatible(n=i, payload="x" * 64)


async def setup(url: str, client: redis.Redis, name: str, index: int) -> tuple[EventBus, float]:
    """The variant's subscription (in a namespace of its own) and a started publisher;
    returns it and the Redis commands of its first publish."""
    mode, stores, kind = VARIANTS[name]
    namespace = f"{NAMESPACE}{index}"
    register(
        client,
        namespace,
        SERVICE,
        [(TOPIC, ACTOR, QUEUE)],
        schemas={ACTOR: event_schema(Reader)} if stores else None,
    )
    bus = EventBus(
        backend=RedisBackend(url=url, namespace=namespace, schema_check=mode),  # type: ignore[arg-type]
        settings=EventBusSettings(service=SERVICE),
    )
    await bus.start()
    await asyncio.sleep(0.05)
    before = commands(client)
    await bus.publish(event(kind, -1))
    await asyncio.sleep(0.05)  # the topic note (background HSET, once per process)
    return bus, commands(client) - before - 1  # minus this INFO


async def measure(url: str, client: redis.Redis, n: int) -> dict[str, dict[str, float]]:
    """One round: every variant's publisher, their N publishes interleaved in chunks
    of CHUNK (the order rotated per chunk), so the machine's load hits them alike."""
    client.flushall()  # keeps the script cache: every variant runs with it warm
    names = list(VARIANTS)
    buses: dict[str, EventBus] = {}
    first: dict[str, float] = {}
    try:
        for i, name in enumerate(names):
            buses[name], first[name] = await setup(url, client, name, i)
        for name in names:
            for i in range(WARMUP):
                await buses[name].publish(event(VARIANTS[name][2], i))
        elapsed = dict.fromkeys(names, 0.0)
        spent = dict.fromkeys(names, 0)
        for c in range(max(1, n // CHUNK)):
            for name in names[c % len(names) :] + names[: c % len(names)]:
                bus, kind = buses[name], VARIANTS[name][2]
                before = commands(client)
                started = time.perf_counter()
                for i in range(CHUNK):
                    await bus.publish(event(kind, i))
                elapsed[name] += time.perf_counter() - started
                spent[name] += commands(client) - before - 1
        done = max(1, n // CHUNK) * CHUNK
        out = {}
        for name in names:
            mode, _, kind = VARIANTS[name]
            check = await check_alone(buses[name], kind) if mode != "off" else 0.0
            out[name] = {
                "rate": done / elapsed[name],
                "commands": spent[name] / done,
                "first": first[name],
                "check": check,
            }
        return out
    finally:
        for bus in buses.values():
            await bus.stop()


async def check_alone(bus: EventBus, kind: str) -> float:
    """Microseconds one publish spends in the check once its verdict is cached (the
    check called alone, CHECK_CALLS times; it never reaches Redis then)."""
    checker = bus.backend.schema_check  # type: ignore[attr-defined]
    one = [event(kind, 0)]

    async def unreachable(*args: object) -> None:
        raise AssertionError("the cached check asked Redis")

    await bus.publish(one[0])  # a verdict older than its 30 s is refreshed here, not below
    started = time.perf_counter()
    for _ in range(CHECK_CALLS):
        await checker.check(one, unreachable, unreachable)
    return (time.perf_counter() - started) / CHECK_CALLS * 1e6


async def run(
    url: str, client: redis.Redis, n: int, repeat: int
) -> dict[str, list[dict[str, float]]]:
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for r in range(repeat):
        for name, row in (await measure(url, client, n)).items():
            runs[name].append(row)
        log(f"round {r + 1}/{repeat} done")
    return runs


def table(runs: dict[str, list[dict[str, float]]], n: int, repeat: int) -> str:
    lines = [
        f"One subscription; N={n:,} awaited publishes one by one, median of {repeat} round(s)",
        "",
        "| variant | publish/s | vs check off (same round) | Redis commands/event | "
        "first publish: Redis commands | check alone µs/publish (cached) |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in runs.items():
        rate = statistics.median(r["rate"] for r in rows)
        ratios = [r["rate"] / ref["rate"] for r, ref in zip(rows, runs[OFF], strict=True)]
        lines.append(
            f"| {name} | {rate:,.0f} | {statistics.median(ratios):.2f}x | "
            f"{statistics.median(r['commands'] for r in rows):.2f} | "
            f"{statistics.median(r['first'] for r in rows):.0f} | "
            + (f"{statistics.median(r['check'] for r in rows):.2f} |" if name != OFF else "0 |")
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny N, one round")
    args = parser.parse_args()
    if args.smoke:
        args.n, args.repeat = 300, 1
        global CHECK_CALLS
        CHECK_CALLS = 2000
    logging.getLogger("eventbus").setLevel(logging.ERROR)  # the breaking row's one WARNING
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        server = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory, "--save", ""],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            client = redis.Redis(port=port, socket_timeout=10)
            deadline = time.monotonic() + READY_TIMEOUT
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise SystemExit("redis-server did not start") from None
                    time.sleep(0.02)
            version = client.info("server")["redis_version"]
            runs = asyncio.run(run(f"redis://127.0.0.1:{port}/0", client, args.n, args.repeat))
        finally:
            server.terminate()
            server.wait(timeout=10)
    print(table(runs, args.n, args.repeat))
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\n{platform.python_implementation()} {platform.python_version()}, redis-server "
        f"{version}, {os.cpu_count()} CPUs, load average {load}"
    )


if __name__ == "__main__":
    main()
