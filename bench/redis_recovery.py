"""How fast the events of a SIGKILLed worker are handled by another, with default settings.

Usage (from the repo root): python bench/redis_recovery.py [--runs 3]

Starts its own ``redis-server``, two ``dramatiq eventbus.actors`` worker groups with
the default ``EVENTBUS_REDIS_REDELIVERY_TIMEOUT`` (5 s), publishes a stream of
events whose handler sleeps 0.2 s, SIGKILLs one group (master and worker
processes at once) while it holds events, and measures the seconds from the kill
until the survivor has handled every event the killed one held.  Raw dramatiq's
``RedisBroker`` gives such events back only through its probabilistic maintenance
pass (minutes to hours), so it has no row here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import redis

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

import eventbus.redis.scripts as lua  # noqa: E402
from bench import _redis_bench_handlers as handlers  # noqa: E402
from bench.redis_bench import NAMESPACE, log, make_bus, redis_server, start_worker  # noqa: E402
from eventbus.config import DEFAULT_REDIS_REDELIVERY_TIMEOUT  # noqa: E402

#: Events published per run (the handler sleeps 0.2 s; 2 worker groups of 8 threads).
EVENTS = 120


def held_events(client: redis.Redis, worker_ids: list[str]) -> set[int]:
    """The ``i`` of every event in the in-flight lists of ``worker_ids``."""
    queue = "bench.eventbus"
    bodies = lua.bodies_key(NAMESPACE, queue)
    held: set[int] = set()
    for wid in worker_ids:
        for entry in client.lrange(lua.inflight_key(NAMESPACE, wid, queue), 0, -1):
            body = client.hget(bodies, entry)
            if body:
                held.add(int(json.loads(body)["args"][0]["event"]["i"]))
    return held


def one_run(url: str) -> tuple[float, int]:
    client = redis.Redis.from_url(url)
    client.flushdb()
    first = start_worker("eventbus", url, 1, 8)
    before = {w.decode() for w in client.hkeys(f"{NAMESPACE}:workers")}
    second = start_worker("eventbus", url, 1, 8)
    victims = [w.decode() for w in client.hkeys(f"{NAMESPACE}:workers") if w.decode() in before]

    async def publish() -> None:
        bus = make_bus(url)
        await bus.start()
        await bus.publish_many([handlers.Sleepy(i=i) for i in range(EVENTS)])
        await bus.stop()

    asyncio.run(publish())
    time.sleep(0.5)  # both groups are busy
    held = held_events(client, victims)
    killed_at = time.time()
    os.killpg(first.process.pid, signal.SIGKILL)
    first.process.wait()
    deadline = time.monotonic() + 120
    while True:
        done = {
            int(line.split()[0]): float(line.split()[1])
            for line in map(bytes.decode, client.lrange(handlers.SLEEPY_DONE, 0, -1))
        }
        if set(range(EVENTS)) <= set(done):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{EVENTS - len(done)} events never handled")
        time.sleep(0.05)
    second.stop()
    recovered = [done[i] - killed_at for i in held]
    return (max(recovered) if recovered else 0.0), len(held)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="one run (about 15 s)")
    args = parser.parse_args()
    if args.smoke:
        args.runs = 1
    results = []
    with redis_server() as url:
        for run in range(args.runs):
            seconds, held = one_run(url)
            log(f"run {run + 1}: {held} held events, all handled {seconds:.1f}s after SIGKILL")
            results.append((seconds, held))
    worst = max(s for s, _ in results)
    print("| run | events held by the killed worker | handled elsewhere after (s) |")
    print("| ---: | ---: | ---: |")
    for i, (seconds, held) in enumerate(results, 1):
        print(f"| {i} | {held} | {seconds:.1f} |")
    print(
        f"\nworst {worst:.1f} s, median {statistics.median(s for s, _ in results):.1f} s "
        f"(default EVENTBUS_REDIS_REDELIVERY_TIMEOUT = {DEFAULT_REDIS_REDELIVERY_TIMEOUT:g} s)"
    )


if __name__ == "__main__":
    main()
