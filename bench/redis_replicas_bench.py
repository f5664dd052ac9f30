"""What ``EVENTBUS_REDIS_MIN_REPLICAS=1`` costs a publisher, next to 0, in the same run.

Usage (from the repo root): python bench/redis_replicas_bench.py [--n 5000] [--repeat 3] [--smoke]

Starts its own primary and replica (``redis-server --replicaof``, no persistence, free
loopback ports) and one subscription, then measures ``await bus.publish(event)`` on
``RedisBackend`` with ``min_replicas=0`` (the primary's answer) and ``min_replicas=1``
(``WAIT 1`` pipelined with the fan-out script: the same round trip, answered once the
replica acknowledged the write):

* **publish one by one**: N awaited publishes from one task;
* **publish, 64 concurrent callers**: the same N from 64 tasks (concurrent publishes
  are grouped into one script call, so one ``WAIT`` serves a group).

``--repeat`` rounds, the order of the two settings alternated each round; the table
shows the median events/s and the publishing process's CPU µs per event
(``time.process_time``).  Primary and replica share the machine's cores with the
publisher: on a loopback pair the replica's acknowledgement comes within its next
``REPLCONF ACK``-on-demand round trip, so this is the floor of the cost; across hosts
add one network round trip to the replica per call.  ``--smoke`` runs a tiny N once,
in seconds, for the test suite.
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from eventbus import BaseEvent, EventBus, EventBusSettings  # noqa: E402
from eventbus.redis.backend import RedisBackend  # noqa: E402
from eventbus.redis.scripts import bodies_key  # noqa: E402
from eventbus.redis.subscriptions import register  # noqa: E402

NAMESPACE = "replbench"
TOPIC = "bench.replicas"
SERVICE = "bench"
QUEUE = f"{SERVICE}.eventbus"
ACTOR = f"{TOPIC}:bench.handler"
#: Concurrent callers of the "concurrent" row.
CALLERS = 64
#: Publishes before each timed row (connections opened, script cached, code warm).
WARMUP = 200
#: Seconds a started redis-server or the replica's link may take.
READY_TIMEOUT = 15.0
#: N of ``--smoke``.
SMOKE_N = 300
#: Seconds a publish waits for the replica (well under the publish timeout).
REPLICA_TIMEOUT = 1.0
SETTINGS = (0, 1)
ONE_BY_ONE = "publish one by one"
CONCURRENT = f"publish, {CALLERS} concurrent callers"
ROWS = (ONE_BY_ONE, CONCURRENT)


class BenchEvent(BaseEvent):
    topic: str = TOPIC
    n: int


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: object, what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            if callable(condition) and condition():
                return
        except redis.ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.02)


@contextmanager
def primary_and_replica() -> Iterator[tuple[str, redis.Redis, redis.Redis]]:
    """(primary URL, primary client, replica client) of a private pair."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    ports = free_port(), free_port()
    base = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    processes = [
        subprocess.Popen([binary, "--port", str(ports[0]), *base], stdout=subprocess.DEVNULL)
    ]
    try:
        primary = redis.Redis(port=ports[0])
        wait_for(primary.ping, "the primary")
        processes.append(
            subprocess.Popen(
                [binary, "--port", str(ports[1]), *base, "--replicaof", "127.0.0.1", str(ports[0])],
                stdout=subprocess.DEVNULL,
            )
        )
        replica = redis.Redis(port=ports[1])
        wait_for(
            lambda: (
                replica.info("replication").get("master_link_status") == "up"
                and primary.info("replication").get("connected_slaves") == 1
            ),
            "the replica's link",
        )
        yield f"redis://127.0.0.1:{ports[0]}/0", primary, replica
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)


def fresh(primary: redis.Redis, replica: redis.Redis) -> None:
    """An empty database with the one subscription, on the replica too."""
    primary.flushall()
    register(primary, NAMESPACE, SERVICE, [(TOPIC, ACTOR, QUEUE)])
    offset = primary.info("replication")["master_repl_offset"]
    wait_for(
        lambda: replica.info("replication")["slave_repl_offset"] >= offset, "the replica's copy"
    )


async def measure(url: str, min_replicas: int, n: int) -> dict[str, float]:
    """Events/s and CPU µs per event of each row, on one fresh bus."""
    bus = EventBus(
        backend=RedisBackend(
            url=url,
            namespace=NAMESPACE,
            min_replicas=min_replicas,
            replica_timeout=REPLICA_TIMEOUT,
        ),
        settings=EventBusSettings(),
    )
    await bus.start()
    out: dict[str, float] = {}
    try:
        for _ in range(WARMUP):
            await bus.publish(BenchEvent(n=-1))
        events = [BenchEvent(n=i) for i in range(n)]
        cpu, wall = time.process_time(), time.perf_counter()
        for event in events:
            await bus.publish(event)
        out[ONE_BY_ONE] = n / (time.perf_counter() - wall)
        out[ONE_BY_ONE + " cpu"] = (time.process_time() - cpu) / n * 1e6

        events = [BenchEvent(n=i) for i in range(n)]

        async def caller(share: list[BenchEvent]) -> None:
            for event in share:
                await bus.publish(event)

        shares = [events[i::CALLERS] for i in range(CALLERS)]
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(caller(share) for share in shares))
        out[CONCURRENT] = n / (time.perf_counter() - wall)
        out[CONCURRENT + " cpu"] = (time.process_time() - cpu) / n * 1e6
    finally:
        await bus.stop()
        broker = bus.backend.broker  # type: ignore[attr-defined]
        if broker is not None:
            broker.close()
    return out


def loadavg() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def table(medians: dict[int, dict[str, float]], n: int, repeat: int, load: str) -> str:
    lines = [
        f"N = {n:,} per row, median of {repeat} alternated run(s); nproc={os.cpu_count()}, "
        f"python {platform.python_version()}; load average {load}",
        "",
        "| row | MIN_REPLICAS=0 events/s | MIN_REPLICAS=1 events/s | 1 vs 0 "
        "| CPU µs/event, 0 | CPU µs/event, 1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in ROWS:
        zero, one = medians[0][row], medians[1][row]
        lines.append(
            f"| {row} | {zero:,.0f} | {one:,.0f} | {one / zero:.2f}x "
            f"| {medians[0][row + ' cpu']:,.1f} | {medians[1][row + ' cpu']:,.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=5_000, help="publishes per row")
    parser.add_argument("--repeat", type=int, default=3, help="alternated runs (median shown)")
    parser.add_argument("--smoke", action="store_true", help=f"n={SMOKE_N}, one run")
    args = parser.parse_args()
    n, repeat = (SMOKE_N, 1) if args.smoke else (args.n, args.repeat)
    if n < CALLERS or repeat < 1:
        parser.error(f"--n must be >= {CALLERS} and --repeat >= 1")
    runs: dict[int, dict[str, list[float]]] = {s: {} for s in SETTINGS}
    load_before = loadavg()
    with primary_and_replica() as (url, primary, replica):
        log(f"primary at {url}; n={n}; repeat={repeat}; load average {load_before}")
        for round_ in range(repeat):
            order = SETTINGS if round_ % 2 == 0 else SETTINGS[::-1]
            for setting in order:
                fresh(primary, replica)
                result = asyncio.run(measure(url, setting, n))
                for metric, value in result.items():
                    runs[setting].setdefault(metric, []).append(value)
                log(f"  round {round_ + 1} MIN_REPLICAS={setting}: {result}")
                # Every published event reached the replica (the premise of "acknowledged").
                if setting:
                    stored = replica.hlen(bodies_key(NAMESPACE, QUEUE))
                    if stored < 2 * n:
                        raise SystemExit(f"replica holds {stored} events, expected {2 * n}+")
    medians = {
        setting: {metric: statistics.median(values) for metric, values in rows.items()}
        for setting, rows in runs.items()
    }
    print(table(medians, n, repeat, f"{load_before} -> {loadavg()}"))


if __name__ == "__main__":
    main()
