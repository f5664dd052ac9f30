"""What delayed publish and per-handler concurrency limits cost on Redis, same run.

Usage (from the repo root): python bench/delay_concurrency_bench.py [--n 5000]
[--repeat 3] [--ms 2] [--smoke]

Starts its own ``redis-server`` on a free loopback port (no persistence), then:

* **publish/s**: N events published one by one (``await bus.publish``), without
  and with ``delay=60`` (the fan-out script puts the messages in the delayed set
  instead of the ready list).  No worker runs meanwhile (one was started once to
  write the subscription); the queue's keys are emptied between runs.  Also the
  CPU per event of the publishing process and of Redis (``INFO cpu``), steadier
  than rates on a shared machine.
* **end-to-end/s**: one worker process (``dramatiq eventbus.actors -p 1 -t 8``)
  already idle; N events published with ``publish_many`` (batches of 1,000) to a
  handler that sleeps ``--ms`` milliseconds, without a limit, with
  ``concurrency=8`` (as many as the threads: it never binds, its two round trips
  per event are the cost) and with ``concurrency=2`` (it binds: events that find
  both slots taken go back to the delayed set for ~50 ms).  N / time from the
  first publish until every event is acked, Redis commands per event (``INFO
  commandstats``, commands inside Lua scripts included), Redis CPU and the worker
  processes' CPU per event (``/proc``).

Median of ``--repeat`` runs, the variants alternated.  Prints a markdown table
with the ratios to the baseline of the same run.  Rates vary run to run (+/-20 %
on 2 shared cores): compare rows of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

import eventbus.redis.scripts as lua  # noqa: E402
from bench import _delay_bench_handlers as handlers  # noqa: E402
from bench.production_bench import tree_cpu  # noqa: E402
from bench.redis_bench import (  # noqa: E402
    NAMESPACE,
    command_total,
    log,
    make_bus,
    redis_server,
    running,
    start_worker,
)

MODULES = ["bench._delay_bench_handlers"]
#: The messages of the bench handlers' queue (service "bench", queue "eventbus").
BODIES = lua.bodies_key(NAMESPACE, "bench.eventbus")
#: Events per publish_many call.
BATCH = 1000
#: Seconds the delayed events of the publish rows are due in (never during a run).
DELAY = 60.0
#: Publishes before each timed publish run.
WARMUP = 50
#: Events and runs of --smoke.
SMOKE_N = 200
SMOKE_REPEAT = 1

PUBLISH = "publish/s, one by one"
DELAYED = f"delay={DELAY:g}"
PUB_CPU = "publish: publisher CPU µs/event"
PUB_REDIS = "publish: Redis CPU µs/event"
E2E = "end-to-end/s, -p 1 -t 8, handler {ms:g} ms"
CMDS = "end-to-end: Redis commands/event"
E2E_REDIS = "end-to-end: Redis CPU µs/event"
E2E_WORKER = "end-to-end: worker CPU µs/event"


def redis_cpu(client: redis.Redis) -> float:
    """Seconds of CPU the Redis server used so far (user + system)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def clear_queues(client: redis.Redis) -> None:
    """Delete every message of the bench's queues, keep the subscriptions."""
    doomed = list(client.scan_iter(match=f"{NAMESPACE}:{{*", count=1000))
    if doomed:
        client.delete(*doomed)


async def publish_rate(url: str, n: int, delay: float | None) -> tuple[float, float, float]:
    """(events/s, publisher CPU µs per event, Redis CPU µs per event)."""
    bus = make_bus(url)
    client = redis.Redis.from_url(url)
    await bus.start()
    events = [handlers.Noop(i=i) for i in range(n)]
    try:
        for i in range(WARMUP):  # connections, script cache
            await bus.publish(handlers.Noop(i=-i), delay=delay)
        cpu, server = time.process_time(), redis_cpu(client)
        started = time.perf_counter()
        if delay is None:
            for event in events:
                await bus.publish(event)
        else:
            for event in events:
                await bus.publish(event, delay=delay)
        elapsed = time.perf_counter() - started
        cpu, server = time.process_time() - cpu, redis_cpu(client) - server
    finally:
        client.close()
        await bus.stop()
    return n / elapsed, cpu / n * 1e6, server / n * 1e6


async def end_to_end(
    url: str, n: int, limit: int | None, ms: float, worker: int
) -> tuple[float, float, float, float]:
    """(events/s from the first publish until all are acked, Redis commands, Redis
    CPU µs and worker processes' CPU µs per event); ``worker``: the dramatiq master."""
    bus = make_bus(url)
    await bus.start()
    topic = handlers.LIMITED[limit]
    events = [handlers.Work(topic=topic, i=i, ms=ms) for i in range(n)]
    client = redis.Redis.from_url(url)
    try:
        client.config_resetstat()
        before, server, work = command_total(client), redis_cpu(client), tree_cpu(worker)
        started = time.perf_counter()
        for i in range(0, n, BATCH):
            await bus.publish_many(events[i : i + BATCH])
        deadline = time.monotonic() + 600
        polls = 0
        while client.hlen(BODIES):  # one command per poll, counted out below
            polls += 1
            if time.monotonic() > deadline:
                raise RuntimeError("the events were not handled within 600 s")
            await asyncio.sleep(0.002)
        elapsed = time.perf_counter() - started
        commands = command_total(client) - before - polls - 1
        server, work = redis_cpu(client) - server, tree_cpu(worker) - work
    finally:
        client.close()
        await bus.stop()
    return n / elapsed, commands / n, server / n * 1e6, work / n * 1e6


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def measure(url: str, n: int, repeat: int, ms: float) -> dict[str, dict[str, float]]:
    client = redis.Redis.from_url(url)
    # The subscriptions: a worker writes them when it boots.
    start_worker("eventbus", url, 1, 1, modules=MODULES).stop()
    out: dict[str, dict[str, list[float]]] = {}

    def put(row: str, column: str, value: float) -> None:
        out.setdefault(row, {}).setdefault(column, []).append(value)
        log(f"  {row:45} {column:16} {value:,.2f}")

    for _ in range(repeat):
        for delay in (None, DELAY):
            clear_queues(client)
            column = "baseline" if delay is None else DELAYED
            rate, cpu, server = asyncio.run(publish_rate(url, n, delay))
            put(PUBLISH, column, rate)
            put(PUB_CPU, column, cpu)
            put(PUB_REDIS, column, server)
    clear_queues(client)
    e2e = E2E.format(ms=ms)
    with running(start_worker("eventbus", url, 1, 8, modules=MODULES)) as worker:
        time.sleep(1.0)  # idle, past its start
        for _ in range(repeat):
            for limit in (None, 8, 2):
                column = "baseline" if limit is None else f"concurrency={limit}"
                rate, commands, server, work = asyncio.run(
                    end_to_end(url, n, limit, ms, worker.process.pid)
                )
                put(e2e, column, rate)
                put(CMDS, column, commands)
                put(E2E_REDIS, column, server)
                put(E2E_WORKER, column, work)
    client.close()
    return {row: {col: median(v) for col, v in cols.items()} for row, cols in out.items()}


def table(values: dict[str, dict[str, float]], n: int, repeat: int, ms: float) -> str:
    fmt: Callable[[float], str] = lambda v: f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"  # noqa: E731
    e2e = E2E.format(ms=ms)
    lines = [
        f"Redis, N={n:,}, median of {repeat}, {platform.machine()} {os.cpu_count()} cores "
        f"(shared), Python {platform.python_version()}",
        "",
        "| feature: measurement | without it | with it | with / without |",
        "|---|---|---|---|",
    ]
    for row in (PUBLISH, PUB_CPU, PUB_REDIS):
        base, with_ = values[row]["baseline"], values[row][DELAYED]
        lines.append(f"| {DELAYED} s: {row} | {fmt(base)} | {fmt(with_)} | {with_ / base:.2f}x |")
    for limit in (8, 2):
        column = f"concurrency={limit}"
        for row in (e2e, CMDS, E2E_REDIS, E2E_WORKER):
            base, with_ = values[row]["baseline"], values[row][column]
            lines.append(f"| {column}: {row} | {fmt(base)} | {fmt(with_)} | {with_ / base:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ms", type=float, default=2.0, help="handler sleep, milliseconds")
    parser.add_argument("--smoke", action="store_true", help="tiny N, one run: seconds")
    args = parser.parse_args()
    n, repeat = (SMOKE_N, SMOKE_REPEAT) if args.smoke else (args.n, args.repeat)
    with redis_server() as url:
        values = measure(url, n, repeat, args.ms)
    print(table(values, n, repeat, args.ms))


if __name__ == "__main__":
    main()
