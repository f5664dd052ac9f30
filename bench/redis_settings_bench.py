"""What Redis production settings cost a publisher, and how far one primary goes.

Usage (from the repo root):
    python bench/redis_settings_bench.py [--n 5000] [--repeat 3] [--scale-n 20000] [--smoke]

Starts its own redis-server instances on free loopback ports (never the machine's Redis
on 6379), one per setting, each with one subscription (one handler), and measures
``await bus.publish(event)`` on ``RedisBackend``:

* **baseline**: no persistence (``--save "" --appendonly no``);
* **AOF everysec**: ``--appendonly yes --appendfsync everysec`` (Redis' default fsync);
* **AOF always**: ``--appendonly yes --appendfsync always`` (an fsync per write);
* **TLS**: the baseline server speaking only TLS (``rediss://``, a test CA made with
  ``openssl``);
* **MIN_REPLICAS=1**: the baseline server with one replica, ``EVENTBUS_REDIS_MIN_REPLICAS=1``
  (``WAIT 1`` in the fan-out's round trip).

Two rows each: **one by one** (N awaited publishes from one task) and **64 concurrent
callers** (the same N from 64 tasks; concurrent publishes are grouped into one script
call).  For each: events/s, the ratio to the baseline, Redis CPU µs per event
(``INFO cpu`` ``used_cpu_sys + used_cpu_user`` of the setting's servers, the replica
included, before and after, over N) and the publishing process's CPU µs per event
(``time.process_time``).  ``--repeat`` rounds, the settings' order rotated each round;
medians shown.

Then **how far one primary goes**: 1, 2 and 4 publisher processes, each with 64
concurrent callers publishing ``--scale-n`` events to the baseline server at once, to
a topic of 1 and of 5 subscriptions (each event fans out to every one);
aggregate events/s and Redis CPU µs per event (median of ``--repeat``).  On a machine
with fewer cores than publishers plus Redis, the publishers and Redis compete for the
cores: the table then shows the machine's ceiling, and Redis' CPU per event is the
number that carries to a bigger host (a core of Redis time / that = the primary's
ceiling).  Last, **end to end**: the same baseline server while one worker process
(``dramatiq eventbus.actors -p 1 -t 8``, one no-op handler) consumes what one publisher
process publishes from 64 callers: events/s until the last ack, and the Redis CPU per
event of publishing, fetching and acking it.  ``--smoke`` runs tiny N once, in seconds,
for the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._redis_settings_handlers import Delivered  # noqa: E402
from eventbus import BaseEvent, EventBus, EventBusSettings  # noqa: E402
from eventbus.redis.backend import RedisBackend  # noqa: E402
from eventbus.redis.scripts import bodies_key  # noqa: E402
from eventbus.redis.subscriptions import register  # noqa: E402

NAMESPACE = "settingsbench"
TOPIC = "bench.settings"
SERVICE = "bench"
QUEUE = f"{SERVICE}.eventbus"
ACTOR = f"{TOPIC}:bench.handler"
#: Concurrent callers of the "concurrent" row and of each scaling process.
CALLERS = 64
#: Publishes before each timed row (connections opened, script cached, code warm).
WARMUP = 200
#: Seconds a started redis-server or the replica's link may take.
READY_TIMEOUT = 15.0
#: N, scaling N and publisher processes of ``--smoke``.
SMOKE_N = 300
SMOKE_SCALE_N = 300
SMOKE_PROCESSES = (1, 2)
#: Publisher processes of the scaling table.
PROCESSES = (1, 2, 4)
#: Subscriptions of the topic in the scaling table (handlers each event fans out to).
SCALE_SUBSCRIPTIONS = (1, 5)
#: Seconds a publish waits for the replica (well under the publish timeout).
REPLICA_TIMEOUT = 1.0
#: Seconds a scaling child may take to start (imports) and to publish.
CHILD_TIMEOUT = 300.0
#: Worker processes and threads of the end-to-end row (``dramatiq -p 1 -t 8``).
E2E_PROCESSES, E2E_THREADS = 1, 8
#: Seconds the end-to-end row may take to drain.
DRAIN_TIMEOUT = 300.0
ONE_BY_ONE = "one by one"
CONCURRENT = f"{CALLERS} concurrent callers"
ROWS = (ONE_BY_ONE, CONCURRENT)
BASELINE = "baseline (no persistence)"


class BenchEvent(BaseEvent):
    topic: str = TOPIC
    n: int
    payload: str = "x" * 64


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            if condition():
                return
        except (redis.ConnectionError, redis.TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.02)


@dataclass
class Setting:
    """One server setup: the URL the bus publishes to, the clients of its servers."""

    name: str
    url: str
    primary: redis.Redis
    servers: list[redis.Redis]
    min_replicas: int = 0
    replica: redis.Redis | None = None
    runs: dict[str, list[float]] = field(default_factory=dict)

    def redis_cpu(self) -> float:
        """CPU seconds the setting's servers used so far (replicas included)."""
        total = 0.0
        for server in self.servers:
            info = server.info("cpu")
            total += float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
        return total


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_certs(directory: Path) -> tuple[Path, Path, Path]:
    """(CA, server certificate, server key): a test CA and a certificate for 127.0.0.1,
    as tests/test_redis_tls.py makes them."""
    if shutil.which("openssl") is None:
        raise SystemExit("openssl is needed to make the TLS certificates")
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.pem", "k", "csr", "c"))
    _openssl(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
        *("-keyout", str(ca_key), "-out", str(ca), "-subj", "/CN=eventbus-bench-ca"),
    )
    _openssl(
        *("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key)),
        *("-out", str(csr), "-subj", "/CN=127.0.0.1"),
    )
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(
        *("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key)),
        *("-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext)),
    )
    return ca, cert, key


@contextmanager
def servers(directory: Path) -> Iterator[list[Setting]]:
    """Every setting's server(s), started once for the whole run."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    processes: list[subprocess.Popen[bytes]] = []

    def start(name: str, *args: str, tls: bool = False) -> int:
        port = free_port()
        data = directory / name
        data.mkdir()
        listen = ["--port", "0", "--tls-port", str(port)] if tls else ["--port", str(port)]
        processes.append(
            subprocess.Popen(
                [binary, *listen, "--bind", "127.0.0.1", "--dir", str(data), "--save", "", *args],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        return port

    def plain(port: int) -> redis.Redis:
        client = redis.Redis(port=port, socket_timeout=10)
        wait_for(lambda: bool(client.ping()), f"redis-server on port {port}")
        return client

    try:
        settings = []
        port = start("baseline", "--appendonly", "no")
        client = plain(port)
        settings.append(Setting(BASELINE, f"redis://127.0.0.1:{port}/0", client, [client]))
        for fsync in ("everysec", "always"):
            port = start(f"aof-{fsync}", "--appendonly", "yes", "--appendfsync", fsync)
            client = plain(port)
            settings.append(
                Setting(
                    f"AOF, appendfsync {fsync}", f"redis://127.0.0.1:{port}/0", client, [client]
                )
            )
        ca, cert, key = make_certs(directory)
        port = start(
            "tls",
            *("--appendonly", "no", "--tls-cert-file", str(cert), "--tls-key-file", str(key)),
            *("--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"),
            tls=True,
        )
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}"
        client = redis.Redis.from_url(url, socket_timeout=10)
        wait_for(lambda: bool(client.ping()), "the TLS redis-server")
        settings.append(Setting("TLS (rediss://)", url, client, [client]))
        port = start("primary", "--appendonly", "no")
        primary = plain(port)
        replica_port = start("replica", "--appendonly", "no", "--replicaof", "127.0.0.1", str(port))
        replica = plain(replica_port)
        wait_for(
            lambda: (
                replica.info("replication").get("master_link_status") == "up"
                and primary.info("replication").get("connected_slaves") == 1
            ),
            "the replica's link",
        )
        settings.append(
            Setting(
                "MIN_REPLICAS=1, one replica",
                f"redis://127.0.0.1:{port}/0",
                primary,
                [primary, replica],
                min_replicas=1,
                replica=replica,
            )
        )
        yield settings
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def fresh(setting: Setting, subscriptions: int = 1) -> None:
    """An empty database with the topic's subscriptions (on the replica too)."""
    setting.primary.flushall()
    handlers = [(TOPIC, ACTOR + (str(i) if i else ""), QUEUE) for i in range(subscriptions)]
    register(setting.primary, NAMESPACE, SERVICE, handlers)
    if setting.replica is not None:
        offset = setting.primary.info("replication")["master_repl_offset"]
        replica = setting.replica
        wait_for(
            lambda: replica.info("replication")["slave_repl_offset"] >= offset,
            "the replica's copy",
        )


def make_bus(url: str, min_replicas: int = 0) -> EventBus:
    return EventBus(
        backend=RedisBackend(
            url=url, namespace=NAMESPACE, min_replicas=min_replicas, replica_timeout=REPLICA_TIMEOUT
        ),
        settings=EventBusSettings(service=SERVICE),
    )


async def close(bus: EventBus) -> None:
    await bus.stop()
    broker = bus.backend.broker  # type: ignore[attr-defined]
    if broker is not None:
        broker.close()


async def publish_concurrently(bus: EventBus, events: list[BenchEvent]) -> None:
    async def caller(share: list[BenchEvent]) -> None:
        for event in share:
            await bus.publish(event)

    await asyncio.gather(*(caller(events[i::CALLERS]) for i in range(CALLERS)))


async def measure(setting: Setting, n: int) -> dict[str, float]:
    """Events/s, Redis and publisher CPU µs per event of each row, on one fresh bus."""
    bus = make_bus(setting.url, setting.min_replicas)
    await bus.start()
    out: dict[str, float] = {}
    try:
        for _ in range(WARMUP):
            await bus.publish(BenchEvent(n=-1))
        for row in ROWS:
            events = [BenchEvent(n=i) for i in range(n)]
            server_cpu = await asyncio.to_thread(setting.redis_cpu)
            cpu, wall = time.process_time(), time.perf_counter()
            if row == ONE_BY_ONE:
                for event in events:
                    await bus.publish(event)
            else:
                await publish_concurrently(bus, events)
            out[row] = n / (time.perf_counter() - wall)
            out[row + " cpu"] = (time.process_time() - cpu) / n * 1e6
            out[row + " redis"] = (
                (await asyncio.to_thread(setting.redis_cpu) - server_cpu) / n * 1e6
            )
    finally:
        await close(bus)
    return out


# -- how far one primary goes: publisher processes ------------------------------------


async def child(url: str, n: int) -> None:
    """A scaling publisher process: warm up, say ready, wait for "go" on stdin, publish
    ``n`` events from 64 callers, print one JSON line (wall start/end, CPU s)."""
    bus = make_bus(url)
    await bus.start()
    try:
        for _ in range(WARMUP):
            await bus.publish(BenchEvent(n=-1))
        events = [BenchEvent(n=i) for i in range(n)]
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        cpu, start = time.process_time(), time.time()
        await publish_concurrently(bus, events)
        end = time.time()
        print(json.dumps({"start": start, "end": end, "cpu": time.process_time() - cpu}))
    finally:
        await close(bus)


def scale_once(setting: Setting, processes: int, subscriptions: int, n: int) -> dict[str, float]:
    """Aggregate events/s, Redis and publisher CPU µs per event of ``processes``
    publishers publishing at once to a topic of ``subscriptions`` subscriptions."""
    fresh(setting, subscriptions)
    with ExitStack() as stack:
        children = []
        for _ in range(processes):
            proc = subprocess.Popen(
                [sys.executable, __file__, "--child", setting.url, str(n)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
            stack.callback(proc.kill)
            children.append(proc)
        for proc in children:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise SystemExit("a publisher process failed to start")
        before = setting.redis_cpu()
        for proc in children:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in children:
            out, _ = proc.communicate(timeout=CHILD_TIMEOUT)
            if proc.returncode != 0:
                raise SystemExit(f"a publisher process failed ({proc.returncode})")
            results.append(json.loads(out.strip().splitlines()[-1]))
        redis_cpu = setting.redis_cpu() - before
    total = n * processes
    stored = setting.primary.hlen(bodies_key(NAMESPACE, QUEUE))
    if stored < total * subscriptions:
        raise SystemExit(f"Redis holds {stored} messages, expected {total * subscriptions}+")
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {
        "rate": total / wall,
        "redis": redis_cpu / total * 1e6,
        "cpu": sum(r["cpu"] for r in results) / total * 1e6,
    }


# -- end to end: a worker process consuming while the publisher publishes ----------------


def e2e_once(setting: Setting, n: int) -> dict[str, float]:
    """Events/s from the first publish until the worker acked the last, and Redis CPU
    µs per event for all of it (publish, fetch, ack), one no-op handler."""
    setting.primary.flushall()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "EVENTBUS_BACKEND": "redis",
        "EVENTBUS_REDIS_URL": setting.url,
        "EVENTBUS_REDIS_NAMESPACE": NAMESPACE,
    }
    command = [
        sys.executable,
        "-m",
        "dramatiq",
        "eventbus.actors",
        "bench._redis_settings_handlers",
    ]
    command += ["-p", str(E2E_PROCESSES), "-t", str(E2E_THREADS)]
    worker = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(
            lambda: setting.primary.hlen(f"{NAMESPACE}:workers") >= E2E_PROCESSES,
            "the worker's first heartbeat",
        )
        queues = [q.decode() for q in setting.primary.smembers(f"{NAMESPACE}:queues")]

        def pending() -> int:
            return sum(int(setting.primary.hlen(bodies_key(NAMESPACE, q))) for q in queues)

        async def publish(events: list[Delivered]) -> float:
            bus = make_bus(setting.url)
            await bus.start()
            try:
                started = time.perf_counter()
                await publish_concurrently(bus, events)
                return started
            finally:
                await close(bus)

        asyncio.run(publish([Delivered(n=-1) for _ in range(WARMUP)]))  # worker warm
        wait_for(lambda: pending() == 0, "the warm-up events")
        before = setting.redis_cpu()
        started = asyncio.run(publish([Delivered(n=i) for i in range(n)]))
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while pending():
            if time.monotonic() > deadline:
                raise SystemExit(f"{pending()} events not handled in {DRAIN_TIMEOUT:g}s")
            time.sleep(0.005)
        done = time.perf_counter()
        redis_cpu = setting.redis_cpu() - before
    finally:
        worker.terminate()
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    return {"rate": n / (done - started), "redis": redis_cpu / n * 1e6}


# -- output ---------------------------------------------------------------------------


def loadavg() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def median(values: list[float]) -> float:
    return statistics.median(values)


def settings_table(settings: list[Setting], n: int, repeat: int) -> str:
    lines = [
        f"Settings: N = {n:,} per row, one subscription, median of {repeat} rotated run(s)",
        "",
        "| setting | row | events/s | vs baseline | Redis CPU µs/event | publisher CPU µs/event |",
        "|---|---|---:|---:|---:|---:|",
    ]
    base = settings[0]
    for row in ROWS:
        reference = median(base.runs[row])
        for setting in settings:
            rate = median(setting.runs[row])
            lines.append(
                f"| {setting.name} | {row} | {rate:,.0f} | {rate / reference:.2f}x "
                f"| {median(setting.runs[row + ' redis']):,.1f} "
                f"| {median(setting.runs[row + ' cpu']):,.1f} |"
            )
    return "\n".join(lines)


def scale_table(scale: dict[tuple[int, int], list[dict[str, float]]], n: int, repeat: int) -> str:
    lines = [
        f"One primary: publisher processes x {CALLERS} concurrent callers, "
        f"{n:,} events per process, baseline server, median of {repeat}",
        "",
        "| publisher processes | subscriptions | events/s | Redis CPU µs/event "
        "| publishers' CPU µs/event | Redis CPU share of one core "
        "| Redis-bound ceiling events/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (processes, subscriptions), runs in scale.items():
        rate = median([r["rate"] for r in runs])
        redis_us = median([r["redis"] for r in runs])
        lines.append(
            f"| {processes} | {subscriptions} | {rate:,.0f} | {redis_us:,.1f} "
            f"| {median([r['cpu'] for r in runs]):,.1f} | {rate * redis_us / 1e6:.0%} "
            f"| {1e6 / redis_us:,.0f} |"
        )
    return "\n".join(lines)


def e2e_table(runs: list[dict[str, float]], n: int, repeat: int) -> str:
    lines = [
        f"End to end: {n:,} events from 64 concurrent callers while one worker process "
        f"(-p {E2E_PROCESSES} -t {E2E_THREADS}, one no-op handler) consumes, baseline server, "
        f"median of {repeat}",
        "",
        "| shape | events/s | Redis CPU µs/event (publish + fetch + ack) "
        "| Redis-bound ceiling events/s |",
        "|---|---:|---:|---:|",
    ]
    redis_us = median([r["redis"] for r in runs])
    lines.append(
        f"| publish + deliver | {median([r['rate'] for r in runs]):,.0f} | {redis_us:,.1f} "
        f"| {1e6 / redis_us:,.0f} |"
    )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        asyncio.run(child(sys.argv[2], int(sys.argv[3])))
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=5_000, help="publishes per row")
    parser.add_argument("--scale-n", type=int, default=20_000, help="publishes per process")
    parser.add_argument("--repeat", type=int, default=3, help="rotated runs (median shown)")
    parser.add_argument("--smoke", action="store_true", help=f"n={SMOKE_N}, one run")
    args = parser.parse_args()
    n, scale_n, repeat = (
        (SMOKE_N, SMOKE_SCALE_N, 1) if args.smoke else (args.n, args.scale_n, args.repeat)
    )
    processes = SMOKE_PROCESSES if args.smoke else PROCESSES
    if n < CALLERS or scale_n < CALLERS or repeat < 1:
        parser.error(f"--n and --scale-n must be >= {CALLERS} and --repeat >= 1")
    load_before = loadavg()
    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="eventbus-settings-bench-"))
        settings = stack.enter_context(servers(Path(tmp)))
        version = settings[0].primary.info("server")["redis_version"]
        log(f"n={n}; repeat={repeat}; load average {load_before}")
        for round_ in range(repeat):
            shift = round_ % len(settings)
            for setting in settings[shift:] + settings[:shift]:
                fresh(setting)
                result = asyncio.run(measure(setting, n))
                for metric, value in result.items():
                    setting.runs.setdefault(metric, []).append(value)
                log(f"  round {round_ + 1} {setting.name}: {result}")
                stored = setting.primary.hlen(bodies_key(NAMESPACE, QUEUE))
                if stored < 2 * n:
                    raise SystemExit(f"{setting.name}: {stored} events stored, expected 2n")
        shapes = [(p, k) for k in SCALE_SUBSCRIPTIONS for p in processes]
        scale: dict[tuple[int, int], list[dict[str, float]]] = {shape: [] for shape in shapes}
        for round_ in range(repeat):
            for count, subscriptions in shapes if round_ % 2 == 0 else shapes[::-1]:
                result = scale_once(settings[0], count, subscriptions, scale_n)
                scale[count, subscriptions].append(result)
                log(f"  round {round_ + 1} {count} process(es), {subscriptions} sub(s): {result}")
        e2e = []
        for round_ in range(repeat):
            e2e.append(e2e_once(settings[0], scale_n))
            log(f"  round {round_ + 1} end to end: {e2e[-1]}")
    print(
        f"nproc={os.cpu_count()}, python {platform.python_version()}, "
        f"redis-server {version}, redis-py {redis.__version__}; "
        f"load average {load_before} -> {loadavg()}"
    )
    print()
    print(settings_table(settings, n, repeat))
    print()
    print(scale_table(scale, scale_n, repeat))
    print()
    print(e2e_table(e2e, scale_n, repeat))


if __name__ == "__main__":
    main()
