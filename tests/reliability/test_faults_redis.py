"""Faults on the Redis backend, with every event counted: workers SIGKILLed every
few seconds, Redis itself killed and restarted mid-run, a worker SIGTERMed in
the middle of a burst.  Each scenario asserts that no event whose publish
succeeded is lost; duplicates (at-least-once re-runs) are counted and reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from eventbus import EventBus
from eventbus.redis.scripts import inflight_key
from tests.reliability.handlers import Tracked
from tests.reliability.support import (
    PROFILE,
    Ledger,
    Tally,
    batches,
    paced,
    publish_until_accepted,
    reclaimed,
    tally,
    wait_handled,
    wait_until,
)

pytest.register_assert_rewrite("tests.redis_support")  # before it is imported below
from tests.redis_support import (  # noqa: E402
    TEST_REDELIVERY_TIMEOUT,
    RedisServer,
    WorkerProcess,
    Workers,
    queue_name,
    require_redis_server_binary,
)

pytest_plugins = ["tests.redis_support"]
pytestmark = pytest.mark.timeout(PROFILE.timeout)

MODULES = ("tests.reliability.handlers",)
QUEUE = queue_name()  # the default queue of service "tests"
#: Events per publish call in paced streams.
BATCH = 50
#: Seconds to wait for the last events after the stream ended.
SETTLE_TIMEOUT = 60.0


def ledger_in(tmp_path: Path) -> tuple[Ledger, dict[str, str]]:
    """A ledger directory and the worker environment that writes to it."""
    directory = tmp_path / "ledger"
    directory.mkdir()
    return Ledger(directory), {"RELIABILITY_LEDGER": str(directory)}


def worker_ids(workers: Workers, worker: WorkerProcess, url: str | None = None) -> list[str]:
    """The Redis worker ids of ``worker``'s processes (registered and alive now)."""
    return [w.decode() for w in workers.registered(url) if Workers._is_child(worker, w)]


def held(client: redis.Redis, namespace: str, ids: list[str]) -> int:
    """Messages in the in-flight lists of the worker ids ``ids``."""
    return sum(int(client.llen(inflight_key(namespace, wid, QUEUE))) for wid in ids)


async def test_redis_sigkill_a_worker_every_few_seconds(
    make_redis_bus: Callable[..., EventBus],
    workers: Workers,
    namespace: str,
    redis_url: str,
    tmp_path: Path,
    report_tally: Callable[[Tally], None],
) -> None:
    total = PROFILE.kill_events
    ledger, env = ledger_in(tmp_path)
    slots = [workers.start(MODULES, threads=4, env=env) for _ in range(2)]
    bus = make_redis_bus()
    await bus.start()
    client = redis.Redis.from_url(redis_url)
    kills = 0
    held_at_kill = 0

    async def killer() -> None:
        nonlocal kills, held_at_kill
        while True:
            await asyncio.sleep(PROFILE.kill_interval)
            victim = slots[kills % 2]
            ids = worker_ids(workers, victim)
            victim.kill()  # SIGKILL, the dramatiq master and its worker process at once
            victim.process.wait(5)
            held_at_kill += held(client, namespace, ids)
            slots[kills % 2] = workers.start(MODULES, threads=4, env=env, wait=False)
            kills += 1

    async def publish(batch: range) -> None:
        # 10 ms handlers: the workers always hold some events when one is killed.
        await bus.publish_many([Tracked(n=n, delay=0.01) for n in batch])

    task = asyncio.create_task(killer())
    try:
        started = await paced(total, BATCH, PROFILE.rate, publish)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await wait_handled(ledger, range(total), SETTLE_TIMEOUT)
    seconds = time.monotonic() - started
    await bus.drain(timeout=TEST_REDELIVERY_TIMEOUT + 20)
    client.close()

    result = tally(
        "SIGKILL a worker every few seconds",
        "redis",
        sent=range(total),
        ledger=ledger,
        seconds=seconds,
        faults=kills,
        notes=(
            f"SIGKILL every {PROFILE.kill_interval:g}s (master and worker process); "
            f"{held_at_kill} events were in flight in killed workers, redelivered by the "
            "survivors' heartbeat recovery"
        ),
    )
    report_tally(result)
    assert result.lost == 0, f"{result.lost} events never handled"
    assert set(ledger.done) <= set(range(total))
    assert kills >= 2
    assert held_at_kill > 0, "no kill caught an event in flight: the test proves nothing"


async def test_redis_restart_mid_run(
    make_redis_bus: Callable[..., EventBus],
    workers: Workers,
    tmp_path: Path,
    report_tally: Callable[[Tally], None],
) -> None:
    """Redis is SIGKILLed (a crash) and restarted on the same port mid-stream.

    Durability across a Redis restart needs Redis persistence: the server runs
    with ``appendonly yes, appendfsync always`` (what a production deployment
    of a durable queue uses); without it a restart empties every queue.  The
    publisher retries a batch on PublishError until it is accepted.
    """
    require_redis_server_binary()
    total = PROFILE.restart_events
    ledger, env = ledger_in(tmp_path)
    data = tmp_path / "redis-data"
    data.mkdir()
    durable = ("--appendonly", "yes", "--appendfsync", "always", "--dir", str(data))
    server = RedisServer(args=durable)
    server.start()
    try:
        workers.start(
            MODULES,
            processes=2,
            threads=4,
            env={**env, "EVENTBUS_REDIS_REDELIVERY_TIMEOUT": "10"},
            redis_url=server.url,
        )
        bus = make_redis_bus(url=server.url, publish_timeout=0.5, redelivery_timeout=10)
        await bus.start()
        sent: set[int] = set()
        errors = 0
        down = 0.0

        async def publish(batch: range) -> None:
            nonlocal errors
            events = [Tracked(n=n) for n in batch]
            errors += await publish_until_accepted(lambda: bus.publish_many(events))
            sent.update(batch)

        async def restart() -> None:
            nonlocal down
            await asyncio.sleep(total / PROFILE.rate / 3)
            server.kill()
            stopped = time.monotonic()
            await asyncio.sleep(1.0)
            await asyncio.to_thread(server.start)  # same port, reloads the append-only file
            down = time.monotonic() - stopped

        task = asyncio.create_task(restart())
        started = await paced(total, BATCH, PROFILE.rate, publish)
        await task
        await wait_handled(ledger, sent, SETTLE_TIMEOUT)
        seconds = time.monotonic() - started
        await bus.drain(timeout=30)
        back = sum("Redis is back" in w.output() for w in workers.started)
        reclaimed_after = sum(reclaimed(w.output()) for w in workers.started)
        result = tally(
            "Redis killed and restarted mid-run",
            "redis",
            sent=sent,
            ledger=ledger,
            seconds=seconds,
            faults=1,
            publish_errors=errors,
            notes=(
                f"SIGKILL + restart, down {down:.1f}s (AOF, fsync always); failed publishes "
                f"retried; {reclaimed_after} events taken by fetches whose reply was lost, "
                "put back"
            ),
        )
        report_tally(result)
        assert result.lost == 0, f"{result.lost} events never handled"
        assert len(sent) == total
        assert errors > 0, "no publish failed: Redis was not down while publishing"
        assert all(w.process.poll() is None for w in workers.started)
        assert back >= 1, "the workers did not report reconnecting"
    finally:
        workers.stop_all()
        server.stop()


async def test_redis_sigterm_a_worker_during_a_burst(
    make_redis_bus: Callable[..., EventBus],
    workers: Workers,
    namespace: str,
    redis_url: str,
    tmp_path: Path,
    report_tally: Callable[[Tally], None],
) -> None:
    """SIGTERM lets the stopping worker finish the handlers it runs and put back
    what it prefetched; the other worker handles the rest."""
    total = PROFILE.burst_events
    ledger, env = ledger_in(tmp_path)
    stopping = workers.start(MODULES, threads=8, env=env)
    workers.start(MODULES, threads=8, env=env)
    bus = make_redis_bus()
    await bus.start()
    client = redis.Redis.from_url(redis_url)

    started = time.monotonic()
    for batch in batches(total, 500):
        await bus.publish_many([Tracked(n=n, delay=0.05) for n in batch])
    await wait_until(
        lambda: sum(ledger.refresh().done.values()) >= total // 5, 30, "the burst to be under way"
    )
    ids = worker_ids(workers, stopping)
    pids = {int(wid.split(".")[-2]) for wid in ids}
    in_flight = held(client, namespace, ids)
    ledger.refresh()
    done_before = sum(sum(ledger.done_by_pid.get(pid, {}).values()) for pid in pids)
    code = await asyncio.to_thread(stopping.stop, 30)  # SIGTERM, then wait
    assert code == 0, stopping.output()
    assert not [wid for wid in ids if wid.encode() in workers.registered()]
    assert held(client, namespace, ids) == 0
    await wait_handled(ledger, range(total), SETTLE_TIMEOUT)
    seconds = time.monotonic() - started
    await bus.drain(timeout=20)
    client.close()

    ledger.refresh()
    started_there = sum(sum(ledger.started_by_pid.get(pid, {}).values()) for pid in pids)
    finished_there = sum(sum(ledger.done_by_pid.get(pid, {}).values()) for pid in pids)
    finished_after = finished_there - done_before
    result = tally(
        "SIGTERM a worker during a burst",
        "redis",
        sent=range(total),
        ledger=ledger,
        seconds=seconds,
        faults=1,
        notes=(
            f"{finished_after} handlers finished in the SIGTERMed worker after the signal "
            f"(every one it started), the events it had prefetched requeued; exit code {code}"
        ),
    )
    report_tally(result)
    assert result.lost == 0, f"{result.lost} events never handled"
    assert started_there == finished_there > 0, "a handler was cut off by SIGTERM"
    assert result.duplicated == 0  # a graceful stop re-runs nothing
    assert in_flight > 0


async def test_a_fetch_whose_reply_is_lost_is_put_back(
    make_redis_bus: Callable[..., EventBus],
    namespace: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The connection drops after Redis moved messages into a worker's in-flight
    list but before the worker read the reply (what the restart run above hit).
    The worker is alive, so no recovery pass would ever hand those messages to
    anyone: the consumer must put them back itself once Redis answers again."""
    bus = make_redis_bus()
    bus.backend.runs_worker = False  # type: ignore[attr-defined]  # we drive the consumer
    await bus.start(consume=True)  # subscribes this process's handlers
    await bus.publish_many([Tracked(n=n) for n in range(3)])
    broker = bus.broker
    consumer = broker.consume(QUEUE, prefetch=8, timeout=100)
    client = broker.client  # type: ignore[attr-defined]
    execute = client.execute_command
    lost: list[str] = []

    def reply_lost_once(*args: object, **options: object) -> object:
        reply = execute(*args, **options)  # the server runs the command...
        if args[0] in ("EVALSHA", "BLMOVE") and not lost:
            lost.append(str(args[0]))  # ...and the reply never arrives
            raise redis.ConnectionError("Connection closed by server.")
        return reply

    monkeypatch.setattr(client, "execute_command", reply_lost_once)
    try:
        assert next(consumer) is None  # the fetch "failed"
        assert lost
        r = redis.Redis.from_url(redis_url)
        assert r.llen(inflight_key(namespace, broker.worker_id, QUEUE)) == 3  # type: ignore[attr-defined]
        got = []
        deadline = time.monotonic() + 5
        while len(got) < 3 and time.monotonic() < deadline:
            message = next(consumer)
            if message is not None:
                got.append(message.args[0]["event"]["n"])
        assert got == [0, 1, 2]  # put back in their order
        assert r.llen(inflight_key(namespace, broker.worker_id, QUEUE)) == 3  # type: ignore[attr-defined]
        r.close()
    finally:
        consumer.close()
