"""Redis backend benchmark: eventbus vs raw dramatiq 2.2.1 and FastStream 0.7 on the
same Redis, same run, same N.

Usage (from the repo root): python bench/redis_bench.py [--n 20000] [--quick]
[--repeat 3] [--only eventbus,dramatiq,faststream]

Starts its own ``redis-server`` on a free loopback port (no persistence) so the
command counts are not polluted by anything else, then measures, one system at
a time, with the same worker layout for eventbus and dramatiq (``dramatiq ... -p P -t T``):

* **publish/s**: N events published one by one (``await bus.publish``) vs
  ``actor.send`` on dramatiq's ``RedisBroker`` and ``await broker.publish(...,
  list=...)`` on FastStream's ``RedisBroker``; ``publish_many`` in batches; the
  same N from 64 concurrent callers (``asyncio.gather`` of 64 tasks publishing
  one by one); and to a topic with 5 handlers (5 messages per event).  No
  worker runs meanwhile: the eventbus workers are started once beforehand (they
  register the subscriptions) and stopped, so messages wait in Redis, as
  FastStream's wait in its list.  Best of ``--repeat`` runs, the systems interleaved.
* **end-to-end/s**: workers (``-p 2 -t 8``) already idle; N no-op events published
  one by one; N / time from the first publish until the last one is acked.  Also
  with one process (``-p 1 -t 8``), vs one FastStream subscriber process (best of
  ``--repeat``).
* **drain/s**: N no-op messages already queued; workers (``-p 2 -t 8``) start;
  N / time from the first ack to the last.
* **latency p50/p99**: one worker process (``-p 1 -t 8``) or FastStream subscriber;
  events published at 2/s and 500/s; handler start minus publish start (wall
  clock, same host).
* **idle commands/s**: one idle worker process, ``INFO commandstats`` delta over
  ``--idle-seconds`` (commands run inside Lua scripts count too).

FastStream runs in a venv of its own, ``bench/.venvs/faststream`` (created on first
run with ``faststream[redis]>=0.7,<0.8``), through ``_faststream_publisher.py`` and
``_faststream_subscriber.py``.  Prints a markdown table with eventbus/reference
ratios.  Rates vary run to run (+/-20 % on 2 cores): compare rows of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from bench.embedded import nproc, venv_python  # noqa: E402

try:  # eventbus/ may be mid-refactor: the references still run without it
    from bench import _redis_bench_fanout as fanout
    from bench import _redis_bench_handlers as handlers
    from eventbus import EventBus, EventBusSettings
    from eventbus.redis.backend import RedisBackend

    EVENTBUS_ERROR: str | None = None
except Exception as exc:  # any import-time failure of the package under test
    EVENTBUS_ERROR = f"{type(exc).__name__}: {exc}"

NAMESPACE = "bench"
#: Handler modules an eventbus worker imports.
EVENTBUS_MODULES = ["bench._redis_bench_handlers", "bench._redis_bench_fanout"]
#: Seconds a worker may take to come up.
READY_TIMEOUT = 20.0
#: Events per publish_many call.
BATCH = 1000
#: Concurrent publishers of the "publish 64 concurrent/s" row.
CALLERS = 64
SYSTEMS = ("eventbus", "dramatiq", "faststream")
#: Messages per run in --smoke mode (the test suite's run: every path, in seconds).
SMOKE_N = 200
#: Seconds of each latency rate and of the idle measurement in --smoke mode.
SMOKE_SECONDS = 1.0

FASTSTREAM_VENV = BENCH / ".venvs" / "faststream"
FASTSTREAM_REQUIREMENT = "faststream[redis]>=0.7,<0.8"
FASTSTREAM_SERIES = "0.7."
# Keys and lists of _faststream_subscriber.py / _faststream_publisher.py.
FS_LIST = "bench-list"
FS_LATENCY_LIST = "bench-latency"
FS_READY_KEY = "bench:faststream:ready"
FS_DONE_KEY = "bench:faststream:done"
FS_LATENCY_KEY = "bench:latency:faststream"

# Metric names (table rows).
PUBLISH = "publish/s"
CONCURRENT = f"publish {CALLERS} concurrent/s"
FANOUT5 = "publish, 5 handlers/s"
MANY = "publish_many/s"
E2E = "end-to-end/s"
E2E_ONE = "end-to-end/s, 1 process"
DRAIN = "drain/s"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def redis_server() -> Iterator[str]:
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


# -- the FastStream venv ------------------------------------------------------------------


def ensure_faststream_venv() -> tuple[str, str]:
    """(python, version) of bench/.venvs/faststream, created unless it already works."""
    py = venv_python(FASTSTREAM_VENV)
    check = [
        py,
        "-I",
        "-c",
        "import importlib.metadata as m, faststream.redis; print(m.version('faststream'))",
    ]

    def version() -> str:
        if not os.path.exists(py):
            return ""
        proc = subprocess.run(check, check=False, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    found = version()
    if found.startswith(FASTSTREAM_SERIES):
        return py, found
    log(f"creating {FASTSTREAM_VENV.relative_to(ROOT)} with {FASTSTREAM_REQUIREMENT} ...")
    venv.EnvBuilder(clear=True, with_pip=True).create(FASTSTREAM_VENV)
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, FASTSTREAM_REQUIREMENT], check=True)
    found = version()
    if not found.startswith(FASTSTREAM_SERIES):
        raise RuntimeError(f"{FASTSTREAM_VENV} has faststream {found or 'missing'}")
    return py, found


# -- workers ------------------------------------------------------------------------------


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


@contextmanager
def running(worker: Worker) -> Iterator[Worker]:
    try:
        yield worker
    finally:
        worker.stop()


def start_worker(
    system: str,
    url: str,
    processes: int,
    threads: int,
    *,
    settle: bool = True,
    extra_env: dict[str, str] | None = None,
    modules: list[str] | None = None,
) -> Worker:
    """``dramatiq`` worker processes of ``system``; ``modules``: the handler (eventbus)
    or actor (dramatiq) modules to import instead of this benchmark's."""
    env = {
        **os.environ,
        **(extra_env or {}),
        "PYTHONPATH": str(ROOT),
        "EVENTBUS_BACKEND": "redis",
        "EVENTBUS_REDIS_URL": url,
        "EVENTBUS_REDIS_NAMESPACE": NAMESPACE,
        "BENCH_REDIS_URL": url,
    }
    if system == "eventbus":
        args = ["eventbus.actors", *(modules or EVENTBUS_MODULES)]
    else:
        args = modules or ["bench._dramatiq_bench_actors"]
    command = [sys.executable, "-m", "dramatiq", *args, "-p", str(processes), "-t", str(threads)]
    with tempfile.TemporaryFile() as errors:  # read only if the worker does not start
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=errors,
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
                exited = process.returncode
                Worker(process).stop()
                errors.seek(0)
                tail = errors.read().decode(errors="replace").strip().splitlines() or ["-"]
                reason = next((line for line in reversed(tail) if "Error" in line), tail[-1])
                how = f"exit {exited}" if exited is not None else f"not ready in {READY_TIMEOUT:g}s"
                raise RuntimeError(f"{system} worker did not start ({how}): {reason}")
            time.sleep(0.05)
    time.sleep(0.5)  # let every consumer thread reach its first fetch
    return Worker(process)


def start_subscriber(python: str, url: str, mode: str, expect: int = 0) -> Worker:
    """One FastStream subscriber process; returns once it consumes."""
    client = redis.Redis.from_url(url)
    client.delete(FS_READY_KEY, FS_DONE_KEY)
    script = str(BENCH / "_faststream_subscriber.py")
    process = subprocess.Popen(
        [python, script, url, mode, str(expect)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + READY_TIMEOUT
    while not client.exists(FS_READY_KEY):
        if process.poll() is not None or time.monotonic() > deadline:
            Worker(process).stop()
            raise RuntimeError("FastStream subscriber did not start")
        time.sleep(0.05)
    time.sleep(0.5)  # as for the workers: let it reach its first fetch
    return Worker(process)


def faststream_publisher(python: str, url: str, *args: object) -> dict[str, float]:
    """Run _faststream_publisher.py; its JSON line ({"seconds", "started"})."""
    script = str(BENCH / "_faststream_publisher.py")
    proc = subprocess.run(
        [python, script, url, *map(str, args)],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"FastStream publisher exit {proc.returncode}: {tail}")
    result: dict[str, float] = json.loads(lines[-1])
    return result


# -- Redis state --------------------------------------------------------------------------


@contextmanager
def pending_counter(system: str, url: str) -> Iterator[Callable[[], int]]:
    """Messages not yet acked (ready + in flight) of the no-op queue; for eventbus,
    of its queues as its backend counts them (``RedisBackend.pending``)."""
    if system == "dramatiq":
        client = redis.Redis.from_url(url)
        yield lambda: int(client.hlen("dramatiq:bench.msgs"))
        return
    loop = asyncio.new_event_loop()
    bus = make_bus(url)
    loop.run_until_complete(bus.start())
    backend: Any = bus.backend
    try:
        yield lambda: int(loop.run_until_complete(backend.pending()))
    finally:
        loop.run_until_complete(bus.stop())
        loop.close()


def wait_drained(
    pending: Callable[[], int], n: int, timeout: float = 300.0
) -> tuple[float, float, int]:
    """(time of the first ack, time the last one was acked, messages pending at the
    first look)."""
    first = None
    seen = -1
    deadline = time.monotonic() + timeout
    while True:
        left = pending()
        now = time.perf_counter()
        if seen < 0:
            seen = left
        if first is None and left < n:
            first = now
        if left == 0:
            return (first or now), now, seen
        if time.monotonic() > deadline:
            raise RuntimeError(f"{left} messages still pending")
        time.sleep(0.002)


def flush(url: str) -> None:
    redis.Redis.from_url(url).flushdb()


def fresh_subscriptions(url: str) -> None:
    """An empty Redis but for the eventbus subscriptions: workers register theirs
    when they boot, so start them once and stop them; what is published next
    waits in Redis (whatever the backend's key layout)."""
    flush(url)
    start_worker("eventbus", url, 1, 1).stop()


# -- publishers -------------------------------------------------------------------------


def make_bus(url: str) -> EventBus:
    return EventBus(
        backend=RedisBackend(url=url, namespace=NAMESPACE),
        settings=EventBusSettings(shutdown_timeout=2.0),
    )


async def eventbus_publish(
    url: str, n: int, mode: str = "publish", handlers_of_topic: int = 1
) -> tuple[float, float]:
    """(perf_counter at the first publish, seconds to publish all n events).

    mode: "publish" (one by one), "many" (publish_many in batches of BATCH),
    "concurrent" (CALLERS tasks each publishing their share one by one).
    """
    bus = make_bus(url)
    await bus.start()
    kind = fanout.Fanout if handlers_of_topic > 1 else handlers.Noop
    events = [kind(i=i) for i in range(n)]
    started = time.perf_counter()
    if mode == "many":
        for i in range(0, n, BATCH):
            await bus.publish_many(events[i : i + BATCH])
    elif mode == "concurrent":

        async def caller(share: list[Any]) -> None:
            for event in share:
                await bus.publish(event)

        await asyncio.gather(*(caller(events[k::CALLERS]) for k in range(CALLERS)))
    else:
        for event in events:
            await bus.publish(event)
    elapsed = time.perf_counter() - started
    await bus.stop()
    return started, elapsed


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
    systems: tuple[str, ...]
    values: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    faststream_python: str = ""
    faststream_version: str = "0.7"

    def put(self, system: str, metric: str, value: float) -> None:
        """Record a value; of a rate measured several times, the best is kept."""
        values = self.values.setdefault(system, {})
        values[metric] = max(value, values.get(metric, value))
        log(f"  {system:10} {metric:24} {value:,.2f}")

    def note(self, text: str) -> None:
        self.notes.append(text)
        log(f"  NOTE: {text}")

    @contextmanager
    def attempt(self, system: str, what: str) -> Iterator[None]:
        """Run one system's measurement; a failure becomes a note, the others go on."""
        try:
            yield
        except Exception as exc:
            self.note(f"{system} {what} failed: {type(exc).__name__}: {exc}")

    def has(self, system: str) -> bool:
        return system in self.systems


def measure_publish(url: str, n: int, repeat: int, out: Results) -> None:
    """Every publish row ``repeat`` times, the systems interleaved; the best is kept."""
    client = redis.Redis.from_url(url)
    eventbus_runs = (
        [
            (PUBLISH, "publish", 1),
            (CONCURRENT, "concurrent", 1),
            (FANOUT5, "publish", fanout.HANDLERS),
            (MANY, "many", 1),
        ]
        if out.has("eventbus")
        else []
    )
    for _ in range(repeat):
        if out.has("dramatiq"):
            flush(url)
            with out.attempt("dramatiq", PUBLISH):
                out.put("dramatiq", PUBLISH, dramatiq_publish(url, n))
        if out.has("faststream"):
            for mode, metric in (("publish", PUBLISH), ("concurrent", CONCURRENT)):
                flush(url)
                with out.attempt("faststream", metric):
                    result = faststream_publisher(out.faststream_python, url, mode, n)
                    queued = int(client.llen(FS_LIST))
                    if queued != n:
                        out.note(f"faststream {metric}: {queued} of {n} messages in the list")
                    out.put("faststream", metric, n / result["seconds"])
        for metric, mode, fan in eventbus_runs:
            with out.attempt("eventbus", metric):
                fresh_subscriptions(url)
                _, seconds = asyncio.run(eventbus_publish(url, n, mode, fan))
                with pending_counter("eventbus", url) as pending:
                    queued = pending()
                if queued != n * fan:
                    out.note(f"eventbus {metric}: {queued} of {n * fan} messages queued")
                out.put("eventbus", metric, n / seconds)
    flush(url)


def eventbus_e2e(url: str, n: int, processes: int) -> float:
    flush(url)
    with (
        running(start_worker("eventbus", url, processes, 8)),
        pending_counter("eventbus", url) as pending,
    ):
        started, _ = asyncio.run(eventbus_publish(url, n))
        _, done, _seen = wait_drained(pending, n + 1)
    # Nothing pending at the first look means the workers kept pace with the publisher
    # (the drain row, with everything queued first, checks that the count sees messages).
    return n / (done - started)


def dramatiq_e2e(url: str, n: int, processes: int) -> float:
    flush(url)
    with (
        running(start_worker("dramatiq", url, processes, 8)),
        pending_counter("dramatiq", url) as pending,
    ):
        started = time.perf_counter()
        dramatiq_publish(url, n)
        _, done, _ = wait_drained(pending, n + 1)
    return n / (done - started)


def faststream_e2e(out: Results, url: str, n: int, timeout: float = 300.0) -> float:
    flush(url)
    client = redis.Redis.from_url(url)
    with running(start_subscriber(out.faststream_python, url, "count", n)):
        started = faststream_publisher(out.faststream_python, url, "publish", n)["started"]
        deadline = time.monotonic() + timeout
        while (done := client.get(FS_DONE_KEY)) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{client.llen(FS_LIST)} messages still in the list")
            time.sleep(0.002)
    return n / (float(done) - started)


def measure_throughput(url: str, n: int, out: Results) -> None:
    for system in ("dramatiq", "eventbus"):
        if not out.has(system):
            continue
        e2e = eventbus_e2e if system == "eventbus" else dramatiq_e2e
        # End to end: workers idle, publish one by one, until the last is acked.
        with out.attempt(system, "end-to-end"):
            out.put(system, E2E, e2e(url, n, 2))
        # Drain: everything queued first, then the workers start.
        with out.attempt(system, "drain"):
            if system == "dramatiq":
                flush(url)
                dramatiq_publish(url, n)
            else:
                fresh_subscriptions(url)
                asyncio.run(eventbus_publish(url, n, "many"))
            with pending_counter(system, url) as pending:
                queued = pending()
                if queued != n:
                    raise RuntimeError(f"{queued} of {n} messages queued")
                with running(start_worker(system, url, 2, 8, settle=False)):
                    first, last, _ = wait_drained(pending, n)
            out.put(system, DRAIN, n / max(last - first, 1e-9))


def measure_one_process(url: str, n: int, repeat: int, out: Results) -> None:
    """End to end with one consuming process: -p 1 -t 8, or one FastStream subscriber;
    ``repeat`` times, the systems interleaved, the best kept."""
    for _ in range(repeat):
        for system in SYSTEMS:
            if not out.has(system):
                continue
            with out.attempt(system, E2E_ONE):
                if system == "faststream":
                    rate = faststream_e2e(out, url, n)
                elif system == "eventbus":
                    rate = eventbus_e2e(url, n, 1)
                else:
                    rate = dramatiq_e2e(url, n, 1)
                out.put(system, E2E_ONE, rate)


def percentiles(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def measure_latency(url: str, rates: list[tuple[float, float]], out: Results) -> None:
    client = redis.Redis.from_url(url)
    keys = {
        "dramatiq": "bench:latency:dramatiq",
        "eventbus": "bench:latency:eventbus",
        "faststream": FS_LATENCY_KEY,
    }
    for system in SYSTEMS:
        if not out.has(system):
            continue
        flush(url)
        key = keys[system]
        with out.attempt(system, "latency"):
            if system == "faststream":
                worker = start_subscriber(out.faststream_python, url, "latency")
            else:
                worker = start_worker(system, url, 1, 8)
            with running(worker):
                for rate, seconds in rates:
                    client.delete(key)
                    if system == "eventbus":
                        asyncio.run(eventbus_paced(url, rate, seconds))
                    elif system == "dramatiq":
                        dramatiq_paced(url, rate, seconds)
                    else:
                        faststream_publisher(out.faststream_python, url, "paced", rate, seconds)
                    expected = int(rate * seconds)
                    deadline = time.monotonic() + 30
                    while client.llen(key) < expected and time.monotonic() < deadline:
                        time.sleep(0.05)
                    samples = [float(x) * 1000 for x in client.lrange(key, 0, -1)]
                    if len(samples) < expected:
                        out.note(f"{system}: only {len(samples)}/{expected} latency samples")
                    p50, p99 = percentiles(samples)
                    out.put(system, f"p50 ms @{rate:g}/s", p50)
                    out.put(system, f"p99 ms @{rate:g}/s", p99)


def command_total(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


def measure_idle(url: str, seconds: float, out: Results) -> None:
    client = redis.Redis.from_url(url)
    for system in SYSTEMS:
        if not out.has(system):
            continue
        flush(url)
        with out.attempt(system, "idle"):
            if system == "faststream":
                worker = start_subscriber(out.faststream_python, url, "count", 1)
            else:
                worker = start_worker(system, url, 1, 8)
            with running(worker):
                time.sleep(3)  # past dramatiq's backoff ramp-up
                client.config_resetstat()
                time.sleep(seconds)
                calls = command_total(client)
            out.put(system, "idle commands/s", calls / seconds)


# -- report -------------------------------------------------------------------------------


def fmt(value: float | None, metric: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:,.2f}" if "ms" in metric else f"{value:,.1f}"


def ratio(metric: str, ours: float | None, ref: float | None) -> str:
    """eventbus vs a reference, > 1 when eventbus is better (faster or fewer)."""
    if ours is None or ref is None or ours <= 0 or ref <= 0:
        return "-"
    lower_is_better = "ms" in metric or "idle" in metric
    return f"{(ref / ours if lower_is_better else ours / ref):.2f}x"


def table(out: Results, n: int, repeat: int) -> str:
    ours = out.values.get("eventbus", {})
    dq = out.values.get("dramatiq", {})
    fs = out.values.get("faststream", {})
    fs_name = f"FastStream {out.faststream_version} Redis list"
    lines = [
        f"N = {n:,} events (publish and 1-process end-to-end rows: best of {repeat}); "
        f"nproc={nproc()}, python {platform.python_version()}",
        "",
        f"| metric | eventbus (redis) | raw dramatiq 2.2.1 RedisBroker | {fs_name} "
        "| eventbus vs dramatiq | eventbus vs FastStream |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for metric in dict.fromkeys([*ours, *dq, *fs]):
        a, b, c = ours.get(metric), dq.get(metric), fs.get(metric)
        vs_dq = ratio(metric, a, b)
        if metric == MANY and a is not None and PUBLISH in dq:
            vs_dq = f"{a / dq[PUBLISH]:.2f}x (vs send)"
        lines.append(
            f"| {metric} | {fmt(a, metric)} | {fmt(b, metric)} | {fmt(c, metric)} "
            f"| {vs_dq} | {ratio(metric, a, c)} |"
        )
    lines.append("")
    lines.append("ratios > 1: eventbus faster (rates) or quicker (ms) / fewer (commands).")

    def quotient(top: float | None, bottom: float | None) -> str:
        return "-" if top is None or not bottom else f"{top / bottom:.2f}"

    def pair(metric: str) -> str:
        return f"{fmt(ours.get(metric), metric)} / {fmt(fs.get(metric), metric)}"

    lines += [
        "",
        "| ratio | value |",
        "|---|---:|",
        "| eventbus publish one by one / FastStream publish one by one "
        f"| {quotient(ours.get(PUBLISH), fs.get(PUBLISH))} |",
        f"| eventbus publish {CALLERS} concurrent / eventbus publish one by one "
        f"| {quotient(ours.get(CONCURRENT), ours.get(PUBLISH))} |",
        f"| FastStream publish {CALLERS} concurrent / FastStream publish one by one "
        f"| {quotient(fs.get(CONCURRENT), fs.get(PUBLISH))} |",
        "| eventbus publish with 5 handlers / with 1 handler (events/s) "
        f"| {quotient(ours.get(FANOUT5), ours.get(PUBLISH))} |",
        "| eventbus end-to-end, 1 worker process `-p 1 -t 8` / FastStream end-to-end, "
        f"1 subscriber process | {quotient(ours.get(E2E_ONE), fs.get(E2E_ONE))} |",
        f"| latency p50 @2/s, ms: eventbus / FastStream | {pair('p50 ms @2/s')} |",
        f"| latency p99 @2/s, ms: eventbus / FastStream | {pair('p99 ms @2/s')} |",
    ]
    if out.notes:
        lines += ["", *(f"- {note}" for note in out.notes)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="messages per throughput run")
    parser.add_argument("--quick", action="store_true", help="shorter latency and idle runs")
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of the publish and one-process end-to-end rows (best kept; default 3)",
    )
    parser.add_argument(
        "--only",
        default=",".join(SYSTEMS),
        help="comma-separated systems to run (default: %(default)s)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny run that exercises every path in seconds (skips faststream, whose "
        "venv is installed on demand); numbers mean nothing",
    )
    args = parser.parse_args()
    if args.smoke:
        args.n, args.repeat, args.idle_seconds = SMOKE_N, 1, SMOKE_SECONDS
        args.only = ",".join(s for s in args.only.split(",") if s != "faststream")
    systems = tuple(s for s in SYSTEMS if s in args.only.split(","))
    unknown = set(args.only.split(",")) - set(SYSTEMS)
    if unknown or not systems:
        parser.error(f"--only takes some of {', '.join(SYSTEMS)}")
    out = Results(systems)
    if "eventbus" in systems and EVENTBUS_ERROR is not None:
        out.note(f"eventbus not measured: cannot import it: {EVENTBUS_ERROR}")
        out.systems = tuple(s for s in out.systems if s != "eventbus")
    if "faststream" in systems:
        try:
            out.faststream_python, out.faststream_version = ensure_faststream_venv()
        except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
            out.note(f"faststream not measured: {exc}")
            out.systems = tuple(s for s in out.systems if s != "faststream")
    rates = [(2.0, 10.0 if args.quick else 30.0), (500.0, 4.0 if args.quick else 10.0)]
    if args.smoke:
        rates = [(50.0, SMOKE_SECONDS), (500.0, SMOKE_SECONDS)]
    with redis_server() as url:
        os.environ["BENCH_REDIS_URL"] = url  # read by the dramatiq actors module
        log(f"redis-server at {url}; n={args.n}; systems: {', '.join(out.systems)}")
        log("publish ...")
        measure_publish(url, args.n, args.repeat, out)
        log("throughput (-p 2 -t 8) ...")
        measure_throughput(url, args.n, out)
        log("end-to-end, one process (-p 1 -t 8) ...")
        measure_one_process(url, args.n, args.repeat, out)
        log("latency (-p 1 -t 8) ...")
        measure_latency(url, rates, out)
        log("idle ...")
        quick = 5.0 if args.quick else args.idle_seconds
        measure_idle(url, SMOKE_SECONDS if args.smoke else quick, out)
    print(table(out, args.n, args.repeat))


if __name__ == "__main__":
    main()
