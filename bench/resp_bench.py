"""The hand-written Redis client ``eventbus/redis/resp.py`` against redis-py, same run.

Usage (from the repo root): python bench/resp_bench.py [--n 20000] [--repeat 3] [--smoke]

DESIGN keeps a hand-written replacement of a maintained library only where a same-run
benchmark shows >= 1.3x on a user-visible number.  ``RespClient`` is used by
``RedisBackend`` for everything the web process sends (the fan-out script of
``publish``, ``pending``/``drain``, ``PING`` of ``start`` and ``health``); workers,
retries and the dead-letter store use the synchronous ``redis.Redis``.  This script
measures, on a private ``redis-server`` (no persistence, free loopback port):

* **bus.publish one by one**: ``await bus.publish(event)`` N times through a real
  ``EventBus`` on ``RedisBackend`` whose publishing client is ``RespClient`` (the
  backend as shipped) or ``redis.asyncio`` (the backend with its client swapped: the
  same ``_script_then`` code path, EVALSHA then EVAL on NOSCRIPT).  One subscription.
* **bus.publish, 64 concurrent callers**: the same N from 64 tasks (the backend
  groups concurrent publishes into one script call per round trip).
* **EVALSHA fan-out one by one / 64 concurrent** (client only): the exact EVALSHA
  command the backend sent for one of those events (captured from ``_script_then``), with
  a fresh timestamp and entry id per call, as ``_fan_out`` and ``publish`` build them.
  ``redis.asyncio`` uses a ``BlockingConnectionPool`` as large as ``RespClient``'s
  (``max_connections``), bounded by the publish timeout as ``RespClient`` is; for
  the 64 callers, a pool of 64 (``RespClient`` pipelines them on its 10).
* **worker, idle path**: the commands the worker's consumer
  (``eventbus/redis/consumer.py``) issues per message when it wakes from a
  blocking wait: ``BLMOVE`` ready -> in flight, ``HGET`` the body, then the ack
  (``MULTI; LREM; HDEL; HINCRBY; EXEC`` in one write).
* **worker, busy path**: the ``FETCH`` script taking ``PREFETCH`` entries (dramatiq's
  default prefetch for ``-t 8``) and one ack per message.

The worker rows run with ``RespClient`` and ``redis.asyncio`` on an event loop, and with
the synchronous ``redis.Redis`` the worker really uses (``RedisBackend.sync_client``,
on the calling thread, as dramatiq's consumer and worker threads call it).

Each client runs in a fresh subprocess (``--child``): ``resp``, redis-py with hiredis
(skipped, with a note, when hiredis is not installed) and redis-py with its
pure-Python parser (hiredis hidden from the import system).  ``--repeat`` rounds, the
order rotated each round; the tables show the median of ops/s and of the client
process's CPU microseconds per operation (``time.process_time``).  Rates vary run to run
on a shared 2-core machine (the round trip waits for whatever else runs); CPU per
operation drifts far less: compare columns of the same run.  ``--smoke`` runs a tiny N
once, in seconds, for the test suite.

A redis-py backend would bound each call, so the swapped client has
``socket_timeout`` = the publish timeout; Redis server time is the same for every
client (the same commands), so it is not in the CPU column.
"""

from __future__ import annotations

import os
import sys

#: Environment variable that makes a child hide hiredis, so redis-py picks its
#: pure-Python parser (it has no public switch for it).
HIDE_HIREDIS_ENV = "BENCH_RESP_HIDE_HIREDIS"
if os.environ.get(HIDE_HIREDIS_ENV) == "1":
    sys.modules["hiredis"] = None  # type: ignore[assignment]  # import hiredis -> ImportError

import argparse  # noqa: E402
import asyncio  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Awaitable, Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import redis  # noqa: E402
import redis.asyncio  # noqa: E402
import redis.utils  # noqa: E402

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from bench.embedded import nproc  # noqa: E402
from bench.redis_bench import redis_server  # noqa: E402

NAMESPACE = "respbench"
#: Concurrent callers of the "64 concurrent" rows.
CALLERS = 64
#: Entries the busy-path FETCH takes at once: dramatiq's default prefetch
#: (``min(worker_threads * 2, 65535)``) for ``-t 8``.
PREFETCH = 16
#: Events per ``publish_many`` call when filling a queue for the worker rows.
FILL_BATCH = 500
#: Publishes before the timed rows (connections opened, script cached, code warm).
WARMUP = 200
#: Seconds a child may take, at most, per 1,000 events of N (plus a constant).
CHILD_SECONDS_PER_1000 = 30.0
#: N of ``--smoke``.
SMOKE_N = 300

KINDS = ("resp", "hiredis", "pure")
#: Column titles of the kinds (the sync columns are the "hiredis"/"pure" children's).
ASYNC_TITLE = {
    "resp": "resp",
    "hiredis": "redis.asyncio + hiredis",
    "pure": "redis.asyncio, pure-Python parser",
}
SYNC_TITLE = {
    "hiredis": "redis.Redis (sync) + hiredis",
    "pure": "redis.Redis (sync), pure-Python parser",
}

# Rows (metric names); the worker rows also have a synchronous variant.
BUS_PUBLISH = "bus.publish one by one"
BUS_CONCURRENT = f"bus.publish, {CALLERS} concurrent callers"
SCRIPT_PUBLISH = "EVALSHA fan-out one by one (client only)"
SCRIPT_CONCURRENT = f"EVALSHA fan-out, {CALLERS} concurrent callers (client only)"
WORKER_IDLE = "worker idle path: BLMOVE + HGET + ack, per message"
WORKER_BUSY = f"worker busy path: FETCH x{PREFETCH} + ack, per message"
ROWS = (BUS_PUBLISH, BUS_CONCURRENT, SCRIPT_PUBLISH, SCRIPT_CONCURRENT, WORKER_IDLE, WORKER_BUSY)
WORKER_ROWS = (WORKER_IDLE, WORKER_BUSY)
#: Suffix of a worker row measured with the synchronous client.
SYNC = " [sync]"
#: Suffix of a row's CPU time per operation (µs, the client process) in a child's result.
CPU = " [cpu us]"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sha1(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


# -- the child: one client kind, every row ------------------------------------------------


def child(kind: str, url: str, n: int) -> dict[str, float]:
    """Every row with the ``kind`` client; {metric: ops/s}."""
    if kind != "resp" and (kind == "hiredis") != redis.utils.HIREDIS_AVAILABLE:
        raise SystemExit(
            f"child {kind}: redis-py HIREDIS_AVAILABLE={redis.utils.HIREDIS_AVAILABLE}"
        )
    return asyncio.run(_async_rows(kind, url, n))


class RedisPyClient:
    """``RespClient``'s interface (``execute``, ``call``, ``close``) over
    ``redis.asyncio``: what ``RedisBackend`` would hold if it used redis-py."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client

    async def execute(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        from eventbus.redis.resp import RespError

        if len(commands) == 1:  # the backend's only case: one script call
            try:
                return [await self.client.execute_command(*commands[0])]
            except redis.exceptions.NoScriptError as exc:  # redis-py drops the error code
                return [RespError(f"NOSCRIPT {exc}")]
            except redis.ResponseError as exc:  # returned, not raised, as RespClient does
                return [RespError(str(exc))]
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute(raise_on_error=False))

    async def call(self, *args: Any) -> Any:
        return await self.client.execute_command(*args)

    async def close(self) -> None:
        await self.client.aclose()


def redis_asyncio_client(url: str, max_connections: int, timeout: float) -> redis.asyncio.Redis:
    """The ``redis.asyncio`` client a redis-py ``RedisBackend`` would build: a pool as
    large as ``RespClient``'s that waits for a free connection, every call bounded."""
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )
    return redis.asyncio.Redis(connection_pool=pool)


def bench_backend(kind: str, url: str) -> Any:
    """A ``RedisBackend``; for redis-py kinds its publishing client is swapped, and it
    records the (script, args) of its script calls while ``recording`` is set."""
    from eventbus.redis.backend import RedisBackend

    class BenchBackend(RedisBackend):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.recording: list[tuple[str, list[Any]]] | None = None
            self.swapped: dict[asyncio.AbstractEventLoop, RedisPyClient] = {}

        def _client(self) -> Any:
            if kind == "resp":
                return super()._client()  # RespClient, as shipped
            loop = asyncio.get_running_loop()
            if loop not in self.swapped:
                self.swapped[loop] = RedisPyClient(
                    redis_asyncio_client(self.url, self.max_connections, self.publish_timeout)
                )
            return self.swapped[loop]

        async def _script_then(
            self, script: str, args: list[Any], then: tuple[Any, ...] = ()
        ) -> list[Any]:
            if self.recording is not None:
                self.recording.append((script, list(args)))
            return await super()._script_then(script, args, then)

        async def stop(self, timeout: float) -> None:
            await super().stop(timeout)
            client = self.swapped.pop(asyncio.get_running_loop(), None)
            if client is not None:
                await client.close()

    return BenchBackend(url=url, namespace=NAMESPACE)


def record(out: dict[str, float], metric: str, n: int, wall: float, cpu: float) -> None:
    """Operations per second, and the process's CPU microseconds per operation: the
    figure that drifts least on a shared machine."""
    out[metric] = n / wall
    out[metric + CPU] = cpu / n * 1e6


async def timed(
    out: dict[str, float], metric: str, n: int, run: Callable[[], Awaitable[None]]
) -> None:
    wall, cpu = time.perf_counter(), time.process_time()
    await run()
    record(out, metric, n, time.perf_counter() - wall, time.process_time() - cpu)


async def concurrently(n: int, one: Callable[[], Awaitable[Any]]) -> None:
    async def caller(count: int) -> None:
        for _ in range(count):
            await one()

    await asyncio.gather(*(caller(n // CALLERS + (k < n % CALLERS)) for k in range(CALLERS)))


async def _async_rows(kind: str, url: str, n: int) -> dict[str, float]:
    import eventbus.redis.scripts as lua
    from bench import _redis_bench_handlers as handlers
    from eventbus import EventBus, EventBusSettings
    from eventbus.redis.resp import RespClient

    backend = bench_backend(kind, url)
    bus = EventBus(backend=backend, settings=EventBusSettings(shutdown_timeout=2.0))
    sync = backend.sync_client
    await bus.start()  # publishes only (consume is off by default)

    def reset() -> None:
        """An empty database but for the subscriptions (the workers' boot write)."""
        sync.flushdb()
        backend.register_subscriptions()

    async def check_pending(expected: int, metric: str) -> None:
        left = await backend.pending()
        if left != expected:
            raise RuntimeError(f"{kind} {metric}: {left} events queued, expected {expected}")

    out: dict[str, float] = {}
    reset()
    [queue] = {s.queue for s in backend.subscription_list() if s.topic == handlers.NOOP}
    actor = "bench.noop"
    events = [handlers.Noop(i=i) for i in range(n)]

    # Warm up, and capture the script call the backend makes for one event.
    backend.recording = []
    await bus.publish(handlers.Noop(i=-1))
    # The first publish of a process also notes its topic (another script call).
    fanouts = [(s, a) for s, a in backend.recording if s == lua.PUBLISH]
    backend.recording = None
    if len(fanouts) != 1:
        raise RuntimeError(f"the backend's publish ran the fan-out script {len(fanouts)} times")
    [(script, template)] = fanouts
    for i in range(WARMUP):
        await bus.publish(handlers.Noop(i=i))

    async def one_by_one() -> None:
        for event in events:
            await bus.publish(event)

    async def from_callers() -> None:
        async def caller(share: list[Any]) -> None:
            for event in share:
                await bus.publish(event)

        await asyncio.gather(*(caller(events[k::CALLERS]) for k in range(CALLERS)))

    for metric, run in ((BUS_PUBLISH, one_by_one), (BUS_CONCURRENT, from_callers)):
        reset()
        await timed(out, metric, n, run)
        await check_pending(n, metric)

    # The client alone: the captured EVALSHA, fresh timestamp and entry id per call.
    sha = sha1(script)
    # The call's arguments: a head (namespace, strict, timestamp in ms, ...) and 4 per
    # event (topic, envelope, options, entry id base): ``publish`` and ``_fan_out``.
    head, event = template[:-4], template[-4:-1]
    if not (isinstance(head[2], int) and abs(head[2] - time.time() * 1000) < 60_000):
        raise RuntimeError(f"the fan-out call's third argument is not its timestamp: {head}")

    def fan_out_args() -> list[Any]:
        return [*head[:2], int(time.time() * 1000), *head[3:], *event, os.urandom(8).hex()]

    async def fill() -> None:
        """An empty database but for the subscriptions, then ``n`` events published
        by the bus (``publish_many``, ``FILL_BATCH`` at a time)."""
        reset()
        for start in range(0, n, FILL_BATCH):
            await bus.publish_many(events[start : start + FILL_BATCH])

    resp: RespClient | None = None
    aio: redis.asyncio.Redis | None = None
    if kind == "resp":
        resp = RespClient.from_url(
            url, timeout=backend.publish_timeout, max_connections=backend.max_connections
        )
        client = resp

        async def fan_out() -> Any:
            [reply] = await client.execute([("EVALSHA", sha, 0, *fan_out_args())])
            return reply

        fan_out_wide = fan_out  # multiplexed: the same 10 connections

    else:
        aio = redis_asyncio_client(url, backend.max_connections, backend.publish_timeout)
        # redis.asyncio holds a connection per command in flight: for 64 callers, one
        # connection each.  (With the 10 of the pool above, callers wait for a
        # connection, unfairly: some waited past the 2 s timeout and failed with
        # "No connection available" on this machine.)
        wide = redis_asyncio_client(url, CALLERS, backend.publish_timeout)

        async def fan_out(client: redis.asyncio.Redis = aio) -> Any:
            return await client.evalsha(sha, 0, *fan_out_args())

        async def fan_out_wide() -> Any:
            return await fan_out(wide)

    for _ in range(WARMUP):
        await fan_out()

    async def script_one_by_one() -> None:
        for _ in range(n):
            await fan_out()

    async def script_from_callers() -> None:
        await concurrently(n, fan_out_wide)

    for metric, run in (
        (SCRIPT_PUBLISH, script_one_by_one),
        (SCRIPT_CONCURRENT, script_from_callers),
    ):
        reset()
        await timed(out, metric, n, run)
        await check_pending(n, metric)
    if kind != "resp":
        await wide.aclose()

    # The worker's round trips, on an event loop.
    keys = WorkerKeys(queue, actor)
    fetch_sha = sync.script_load(lua.FETCH)
    idle_path: Callable[[], Awaitable[None]]
    busy_path: Callable[[], Awaitable[None]]
    if resp is not None:
        rc = resp

        async def ack(entry: bytes) -> None:
            replies = await rc.execute(
                [
                    ("MULTI",),
                    ("LREM", keys.inflight, 1, entry),
                    ("HDEL", keys.bodies, entry),
                    ("HINCRBY", keys.backlog, actor, -1),
                    ("EXEC",),
                ]
            )
            if not isinstance(replies[-1], list):
                raise RuntimeError(f"ack failed: {replies}")

        async def idle_path() -> None:
            for _ in range(n):
                entry = await rc.call("BLMOVE", keys.ready, keys.inflight, "LEFT", "RIGHT", 1)
                await rc.call("HGET", keys.bodies, entry)
                await ack(entry)

        async def busy_path() -> None:
            done = 0
            while done < n:
                reply = await rc.call(
                    "EVALSHA", fetch_sha, 4, *keys.fetch, PREFETCH, keys.max_fetch
                )
                if len(reply) < 2:
                    raise RuntimeError(f"queue empty after {done} of {n} messages")
                for entry in reply[:-1:2]:
                    await ack(entry)
                    done += 1

    else:
        assert aio is not None
        ac = aio
        afetch = ac.register_script(lua.FETCH)

        async def aack(entry: bytes) -> None:
            async with ac.pipeline(transaction=True) as pipe:
                pipe.lrem(keys.inflight, 1, entry)  # type: ignore[arg-type]
                pipe.hdel(keys.bodies, entry)  # type: ignore[arg-type]
                pipe.hincrby(keys.backlog, actor, -1)
                await pipe.execute()

        async def idle_path() -> None:
            for _ in range(n):
                entry = await ac.execute_command(
                    "BLMOVE", keys.ready, keys.inflight, "LEFT", "RIGHT", 1
                )
                await ac.execute_command("HGET", keys.bodies, entry)
                await aack(entry)

        async def busy_path() -> None:
            done = 0
            while done < n:
                reply = await afetch(keys=keys.fetch, args=[PREFETCH, keys.max_fetch])
                if len(reply) < 2:
                    raise RuntimeError(f"queue empty after {done} of {n} messages")
                for entry in reply[:-1:2]:
                    await aack(entry)
                    done += 1

    for metric, run in ((WORKER_IDLE, idle_path), (WORKER_BUSY, busy_path)):
        await fill()
        await timed(out, metric, n, run)
        keys.check_empty(sync, metric)
    if kind != "resp":  # blocking calls, as on the worker's threads (nothing else runs)
        for metric, blocking in sync_worker_paths(sync, keys, n).items():
            await fill()
            wall, cpu = time.perf_counter(), time.process_time()
            blocking()
            record(out, metric + SYNC, n, time.perf_counter() - wall, time.process_time() - cpu)
            keys.check_empty(sync, metric)

    if resp is not None:
        await resp.close()
    if aio is not None:
        await aio.aclose()
    await bus.stop()
    return out


class WorkerKeys:
    """The keys the consumer of ``queue`` uses (``eventbus.redis.consumer.RedisConsumer``)."""

    def __init__(self, queue: str, actor: str) -> None:
        import eventbus.redis.consumer as redis_consumer
        import eventbus.redis.scripts as lua

        worker_id = f"respbench.{os.getpid()}"
        self.actor = actor
        self.ready = lua.ready_key(NAMESPACE, queue)
        self.delayed = lua.delayed_key(NAMESPACE, queue)
        self.bodies = lua.bodies_key(NAMESPACE, queue)
        self.backlog = lua.backlog_key(NAMESPACE, queue)
        self.inflight = lua.inflight_key(NAMESPACE, worker_id, queue)
        self.fetch = [self.ready, self.delayed, self.inflight, self.bodies]
        self.max_fetch = redis_consumer.MAX_FETCH

    def check_empty(self, client: redis.Redis, metric: str) -> None:
        """Every message fetched and acked: nothing ready, held or counted."""
        left = (
            client.llen(self.ready),
            client.llen(self.inflight),
            client.hlen(self.bodies),
            int(client.hget(self.backlog, self.actor) or 0),
        )
        if any(left):
            raise RuntimeError(f"{metric}: ready, in flight, bodies, backlog left: {left}")


def sync_worker_paths(
    client: redis.Redis, keys: WorkerKeys, n: int
) -> dict[str, Callable[[], None]]:
    """The worker rows with the synchronous client the worker uses
    (``RedisBackend.sync_client``) and the calls of ``RedisConsumer``: ``_next``
    (BLMOVE, HGET, the FETCH script) and ``_delete_entry`` (the ack)."""
    import eventbus.redis.scripts as lua

    fetch = client.register_script(lua.FETCH)
    actor = keys.actor

    def ack(entry: bytes) -> None:
        with client.pipeline(transaction=True) as pipe:
            pipe.lrem(keys.inflight, 1, entry)  # type: ignore[arg-type]
            pipe.hdel(keys.bodies, entry)  # type: ignore[arg-type]
            pipe.hincrby(keys.backlog, actor, -1)
            pipe.execute()

    def idle_path() -> None:
        for _ in range(n):
            entry = client.execute_command(  # type: ignore[no-untyped-call]
                "BLMOVE", keys.ready, keys.inflight, "LEFT", "RIGHT", 1
            )
            client.execute_command("HGET", keys.bodies, entry)  # type: ignore[no-untyped-call]
            ack(entry)

    def busy_path() -> None:
        done = 0
        while done < n:
            reply = fetch(keys=keys.fetch, args=[PREFETCH, keys.max_fetch])
            if len(reply) < 2:
                raise RuntimeError(f"queue empty after {done} of {n} messages")
            for entry in reply[:-1:2]:
                ack(entry)
                done += 1

    return {WORKER_IDLE: idle_path, WORKER_BUSY: busy_path}


# -- the parent: alternate the children, median, table ------------------------------------


def run_child(kind: str, url: str, n: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(HIDE_HIREDIS_ENV, None)
    if kind == "pure":
        env[HIDE_HIREDIS_ENV] = "1"
    proc = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            kind,
            "--url",
            url,
            "--n",
            str(n),
        ],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60 + CHILD_SECONDS_PER_1000 * n / 1000,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        lines = proc.stderr.strip().splitlines() or ["no output"]
        log("\n".join(lines[-15:]))
        tail = lines[-1]
        raise RuntimeError(f"child {kind} exit {proc.returncode}: {tail}")
    result: dict[str, float] = json.loads(lines[-1])
    return result


def ratio(top: float | None, bottom: float | None) -> str:
    return "-" if top is None or not bottom else f"{top / bottom:.2f}x"


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def fmt_us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def section(medians: dict[str, dict[str, float]], suffix: str) -> list[str]:
    """One table: rates (``suffix`` "") or CPU µs per operation (``CPU``)."""
    resp = medians.get("resp", {})
    hi = medians.get("hiredis", {})
    pure = medians.get("pure", {})
    rates = suffix == ""
    show = fmt if rates else fmt_us

    def better(a: float | None, b: float | None) -> str:
        return ratio(a, b) if rates else ratio(b, a)

    lines = [
        f"| {'ops/s' if rates else 'client CPU us per op'} | {ASYNC_TITLE['resp']} "
        f"| {ASYNC_TITLE['hiredis']} | {ASYNC_TITLE['pure']} "
        f"| {SYNC_TITLE['hiredis']} | {SYNC_TITLE['pure']} "
        "| resp vs redis.asyncio+hiredis | resp vs the redis-py client of that side, +hiredis |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for metric in ROWS:
        key, sync_key = metric + suffix, metric + SYNC + suffix
        # Publishing must not block the event loop: redis.asyncio.  The worker is
        # synchronous (dramatiq threads): redis.Redis.
        best = hi.get(sync_key) if metric in WORKER_ROWS else hi.get(key)
        lines.append(
            f"| {metric} | {show(resp.get(key))} | {show(hi.get(key))} "
            f"| {show(pure.get(key))} | {show(hi.get(sync_key))} | {show(pure.get(sync_key))} "
            f"| {better(resp.get(key), hi.get(key))} | {better(resp.get(key), best)} |"
        )
    return lines


def table(
    medians: dict[str, dict[str, float]], n: int, repeat: int, notes: list[str], load: str
) -> str:
    lines = [
        f"N = {n:,} per row, median of {repeat} alternated run(s); nproc={nproc()}, "
        f"python {platform.python_version()}, redis-py {redis.__version__}; load average {load}",
        "",
        *section(medians, ""),
        "",
        *section(medians, CPU),
        "",
        "ratios > 1: resp faster / cheaper.  The last column compares resp with "
        "redis.asyncio + hiredis for the publish rows and with the synchronous redis.Redis "
        "+ hiredis the worker uses (on the calling thread, no event loop) for the worker rows.",
    ]
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines)


def loadavg() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="operations per row")
    parser.add_argument("--repeat", type=int, default=3, help="alternated runs (median shown)")
    parser.add_argument("--smoke", action="store_true", help=f"n={SMOKE_N}, one run")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.url, args.n)))
        return
    n, repeat = (SMOKE_N, 1) if args.smoke else (args.n, args.repeat)
    if n < CALLERS or repeat < 1:
        parser.error(f"--n must be >= {CALLERS} and --repeat >= 1")
    notes: list[str] = []
    failed = False
    kinds = list(KINDS)
    if not redis.utils.HIREDIS_AVAILABLE:
        kinds.remove("hiredis")
        notes.append("redis-py + hiredis not measured: hiredis (>= 3.2) is not installed")
    runs: dict[str, dict[str, list[float]]] = {}
    load_before = loadavg()
    with redis_server() as url:
        log(f"redis-server at {url}; n={n}; repeat={repeat}; load average {load_before}")
        for round_ in range(repeat):
            order = kinds[round_ % len(kinds) :] + kinds[: round_ % len(kinds)]
            for kind in order:
                try:
                    result = run_child(kind, url, n)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    notes.append(f"round {round_ + 1}, {kind} failed: {exc}")
                    log(f"  NOTE: {notes[-1]}")
                    failed = True
                    continue
                for metric, value in result.items():
                    runs.setdefault(kind, {}).setdefault(metric, []).append(value)
                    log(f"  round {round_ + 1} {kind:8} {metric:68} {value:,.1f}")
    medians = {
        kind: {metric: statistics.median(values) for metric, values in rows.items()}
        for kind, rows in runs.items()
    }
    print(table(medians, n, repeat, notes, f"{load_before} -> {loadavg()}"))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
