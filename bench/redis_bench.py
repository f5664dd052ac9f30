"""Redis backend benchmark: eventbus vs raw dramatiq 2.2.1 on the same Redis, same run.

Usage (from the repo root): python bench/redis_bench.py [--n 20000] [--quick]

Starts its own ``redis-server`` on a free loopback port (no persistence) so the
command counts are not polluted by anything else, then measures, one system at
a time, with the same worker layout for both (``dramatiq ... -p P -t T``):

* **publish/s**: N events published one by one (``await bus.publish``) vs
  ``actor.send`` on dramatiq's ``RedisBroker``; and ``publish_many`` in batches.
* **end-to-end/s**: workers (``-p 2 -t 8``) already idle; N no-op events published
  one by one; N / time until the last one is acked.
* **drain/s**: N no-op messages already queued; workers (``-p 2 -t 8``) start;
  N / time from the first ack to the last.
* **latency p50/p99**: one worker process (``-p 1 -t 8``); events published at
  2/s and 500/s; handler start minus publish start (wall clock, same host).
* **idle commands/s**: one idle worker process, ``INFO commandstats`` delta over
  ``--idle-seconds`` (commands run inside Lua scripts count too).

Prints a markdown table with eventbus/dramatiq ratios.  Rates vary run to run
(+/-20 % on 2 cores): compare rows of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from bench import _redis_bench_handlers as handlers  # noqa: E402
from eventbus import EventBus, EventBusSettings  # noqa: E402
from eventbus.backends.redis import RedisBackend  # noqa: E402

NAMESPACE = "bench"
#: Seconds a worker may take to come up.
READY_TIMEOUT = 20.0
#: Events per publish_many call.
BATCH = 1000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def redis_server() -> Any:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


@dataclass
class Worker:
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_worker(
    system: str,
    url: str,
    processes: int,
    threads: int,
    *,
    settle: bool = True,
    extra_env: dict[str, str] | None = None,
) -> Worker:
    env = {
        **os.environ,
        **(extra_env or {}),
        "PYTHONPATH": str(ROOT),
        "EVENTBUS_BACKEND": "redis",
        "EVENTBUS_REDIS_URL": url,
        "EVENTBUS_REDIS_NAMESPACE": NAMESPACE,
        "BENCH_REDIS_URL": url,
    }
    module = "bench._redis_bench_handlers" if system == "eventbus" else None
    args = ["eventbus.actors", module] if module else ["bench._dramatiq_bench_actors"]
    command = [sys.executable, "-m", "dramatiq", *args, "-p", str(processes), "-t", str(threads)]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    if not settle:
        return Worker(process)
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + READY_TIMEOUT
    # Ready when every worker process has shown up in Redis (heartbeats).
    key = f"{NAMESPACE}:workers" if system == "eventbus" else "dramatiq:__heartbeats__"
    while (client.hlen(key) if system == "eventbus" else client.zcard(key)) < processes:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{system} worker did not start")
        time.sleep(0.05)
    time.sleep(0.5)  # let every consumer thread reach its first fetch
    return Worker(process)


def pending_counter(system: str, url: str) -> Callable[[], int]:
    """Messages not yet acked (ready + in flight) of the no-op queue."""
    client = redis.Redis.from_url(url)
    if system == "dramatiq":
        return lambda: int(client.hlen("dramatiq:bench.msgs"))
    script = client.register_script(
        __import__("eventbus.backends.redis_scripts", fromlist=["PENDING"]).PENDING
    )
    return lambda: int(script(args=[NAMESPACE, "eventbus"]))


def wait_drained(pending: Callable[[], int], n: int, timeout: float = 300.0) -> tuple[float, float]:
    """(time of the first ack, time the last one was acked)."""
    first = None
    deadline = time.monotonic() + timeout
    while True:
        left = pending()
        now = time.perf_counter()
        if first is None and left < n:
            first = now
        if left == 0:
            return (first or now), now
        if time.monotonic() > deadline:
            raise RuntimeError(f"{left} messages still pending")
        time.sleep(0.002)


def flush(url: str) -> None:
    redis.Redis.from_url(url).flushdb()


# -- publishers -------------------------------------------------------------------------


def make_bus(url: str) -> EventBus:
    return EventBus(
        backend=RedisBackend(url=url, namespace=NAMESPACE),
        settings=EventBusSettings(shutdown_timeout=2.0),
    )


async def eventbus_publish(url: str, n: int, many: bool = False) -> float:
    bus = make_bus(url)
    await bus.start()
    events = [handlers.Noop(i=i) for i in range(n)]
    started = time.perf_counter()
    if many:
        for i in range(0, n, BATCH):
            await bus.publish_many(events[i : i + BATCH])
    else:
        for event in events:
            await bus.publish(event)
    elapsed = time.perf_counter() - started
    await bus.stop()
    return n / elapsed


def dramatiq_actors() -> Any:
    from bench import _dramatiq_bench_actors as actors

    return actors


def dramatiq_publish(url: str, n: int) -> float:
    actors = dramatiq_actors()
    started = time.perf_counter()
    for i in range(n):
        actors.noop.send(i)
    return n / (time.perf_counter() - started)


async def eventbus_paced(url: str, rate: float, seconds: float) -> None:
    bus = make_bus(url)
    await bus.start()
    interval = 1 / rate
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = start + i * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await bus.publish(handlers.Timed(sent=time.time()))
    await bus.stop()


def dramatiq_paced(url: str, rate: float, seconds: float) -> None:
    actors = dramatiq_actors()
    interval = 1 / rate
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = start + i * interval - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        actors.latency.send(time.time())


# -- measurements -------------------------------------------------------------------------


@dataclass
class Results:
    values: dict[str, dict[str, float]] = field(default_factory=dict)

    def put(self, system: str, metric: str, value: float) -> None:
        self.values.setdefault(system, {})[metric] = value
        log(f"  {system:9} {metric:22} {value:,.2f}")


def measure_publish(url: str, n: int, out: Results) -> None:
    flush(url)
    out.put("dramatiq", "publish/s", dramatiq_publish(url, n))
    flush(url)
    out.put("eventbus", "publish/s", asyncio.run(eventbus_publish(url, n)))
    flush(url)
    out.put("eventbus", "publish_many/s", asyncio.run(eventbus_publish(url, n, many=True)))
    flush(url)


def measure_throughput(url: str, n: int, out: Results) -> None:
    for system in ("dramatiq", "eventbus"):
        pending = pending_counter(system, url)
        # End to end: workers idle, publish one by one, until the last is acked.
        flush(url)
        worker = start_worker(system, url, 2, 8)
        started = time.perf_counter()
        if system == "dramatiq":
            dramatiq_publish(url, n)
        else:
            asyncio.run(eventbus_publish(url, n))
        _, done = wait_drained(pending, n + 1)
        out.put(system, "end-to-end/s", n / (done - started))
        worker.stop()
        # Drain: everything queued first, then the workers start.
        flush(url)
        if system == "dramatiq":
            dramatiq_publish(url, n)
        else:
            asyncio.run(eventbus_publish(url, n, many=True))
        worker = start_worker(system, url, 2, 8, settle=False)
        first, last = wait_drained(pending, n)
        out.put(system, "drain/s", n / max(last - first, 1e-9))
        worker.stop()


def measure_latency(url: str, rates: list[tuple[float, float]], out: Results) -> None:
    client = redis.Redis.from_url(url)
    for system in ("dramatiq", "eventbus"):
        flush(url)
        worker = start_worker(system, url, 1, 8)
        key = handlers.LATENCY_KEY if system == "eventbus" else "bench:latency:dramatiq"
        for rate, seconds in rates:
            client.delete(key)
            if system == "eventbus":
                asyncio.run(eventbus_paced(url, rate, seconds))
            else:
                dramatiq_paced(url, rate, seconds)
            expected = int(rate * seconds)
            deadline = time.monotonic() + 30
            while client.llen(key) < expected and time.monotonic() < deadline:
                time.sleep(0.05)
            samples = sorted(float(x) * 1000 for x in client.lrange(key, 0, -1))
            if len(samples) < expected:
                log(f"  {system}: only {len(samples)}/{expected} latency samples")
            p50 = statistics.median(samples)
            p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
            out.put(system, f"p50 ms @{rate:g}/s", p50)
            out.put(system, f"p99 ms @{rate:g}/s", p99)
        worker.stop()


def command_total(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


def measure_idle(url: str, seconds: float, out: Results) -> None:
    client = redis.Redis.from_url(url)
    for system in ("dramatiq", "eventbus"):
        flush(url)
        worker = start_worker(system, url, 1, 8)
        time.sleep(3)  # past dramatiq's backoff ramp-up
        client.config_resetstat()
        time.sleep(seconds)
        calls = command_total(client)
        out.put(system, "idle commands/s", calls / seconds)
        worker.stop()


def table(out: Results) -> str:
    ours, ref = out.values.get("eventbus", {}), out.values.get("dramatiq", {})
    lower_is_better = ("ms", "idle")
    lines = [
        "| metric | eventbus (redis) | raw dramatiq 2.2.1 RedisBroker | ratio | better |",
        "|---|---|---|---|---|",
    ]
    for metric in dict.fromkeys([*ref, *ours]):
        a, b = ours.get(metric), ref.get(metric)
        fa = "-" if a is None else f"{a:,.1f}"
        fb = "-" if b is None else f"{b:,.1f}"
        ratio, better = "-", "-"
        if a is not None and b is not None and b > 0 and a > 0:
            low = any(word in metric for word in lower_is_better)
            ratio = f"{(b / a if low else a / b):.2f}x"
            better = "eventbus" if (a < b if low else a > b) else "dramatiq"
        if metric == "publish_many/s" and a is not None and "publish/s" in ref:
            ratio = f"{a / ref['publish/s']:.2f}x (vs send)"
            better = "eventbus" if a > ref["publish/s"] else "dramatiq"
        lines.append(f"| {metric} | {fa} | {fb} | {ratio} | {better} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="messages per throughput run")
    parser.add_argument("--quick", action="store_true", help="shorter latency and idle runs")
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    args = parser.parse_args()
    rates = [(2.0, 10.0 if args.quick else 30.0), (500.0, 4.0 if args.quick else 10.0)]
    out = Results()
    with redis_server() as url:
        os.environ["BENCH_REDIS_URL"] = url  # read by the dramatiq actors module
        log(f"redis-server at {url}; n={args.n}")
        log("publish ...")
        measure_publish(url, args.n, out)
        log("throughput (-p 2 -t 8) ...")
        measure_throughput(url, args.n, out)
        log("latency (-p 1 -t 8) ...")
        measure_latency(url, rates, out)
        log("idle ...")
        measure_idle(url, 5.0 if args.quick else args.idle_seconds, out)
    print(table(out))


if __name__ == "__main__":
    main()
