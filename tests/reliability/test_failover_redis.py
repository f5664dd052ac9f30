"""A Sentinel failover under load, every event counted.

One primary, one replica and three sentinels on loopback
(:class:`tests.sentinel_support.SentinelCluster`, ``down-after-milliseconds
1000``); a publisher publishes continuously through the ``redis+sentinel://``
URL and two worker processes consume through it.  The primary is SIGKILLed
mid-stream: the sentinels promote the replica, and without a restart the
publisher and the workers must find it.  Measured: seconds from the kill until
a publish succeeds again and until an event published after the kill is
handled.  A batch whose publish failed is published again (its events are
counted once sent); with ``EVENTBUS_REDIS_MIN_REPLICAS=0`` Redis replicates
asynchronously, so events the primary acknowledged in its last milliseconds may
be lost with it: counted, reported, not hidden.  With ``=1`` a publish returns
only once a replica has the event, and none may be lost; the cluster then has
two replicas, so that the new primary has one to acknowledge its writes.

The long profile also runs a manual ``SENTINEL FAILOVER`` (asked of the third
sentinel) instead of the kill: the old primary keeps answering until Sentinel
demotes it, some 10 s later, and what it took after the promotion that no worker
took from it is lost at the demotion (counted with ``=0``; with ``=1`` it has no
replica left to acknowledge such writes, so none may be lost).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from eventbus import EventBus
from tests.reliability.handlers import Tracked
from tests.reliability.support import (
    PROFILE,
    Ledger,
    Tally,
    paced,
    publish_until_accepted,
    tally,
    wait_handled,
)

pytest.register_assert_rewrite("tests.redis_support", "tests.sentinel_support")
from tests.redis_support import Workers, require_redis_server_binary  # noqa: E402
from tests.sentinel_support import MASTER, SentinelCluster  # noqa: E402

pytest_plugins = ["tests.redis_support"]
pytestmark = pytest.mark.timeout(PROFILE.timeout)

MODULES = ("tests.reliability.handlers",)
#: Events per publish call.
BATCH = 25
#: Events of the run (about eight seconds at the profile's rate, plus the failover).
TOTAL = PROFILE.kill_events
#: Seconds the whole cluster may take to resume (the issue's bound).
RESUME_BOUND = 15.0
#: Seconds to wait for the last events after the stream ended.
SETTLE_TIMEOUT = 60.0


#: The faults: the primary SIGKILLed (every profile), or a manual ``SENTINEL
#: FAILOVER`` (long profile only: the quick run keeps to a minute; the behaviour
#: itself is tested in tests/test_redis_sentinel.py).
FAULTS = [
    pytest.param("kill", 0, id="kill-0"),
    pytest.param("kill", 1, id="kill-1"),
    *(
        pytest.param(
            "manual",
            n,
            id=f"manual-{n}",
            marks=pytest.mark.skipif(PROFILE.name == "quick", reason="long profile only"),
        )
        for n in (0, 1)
    ),
]


@pytest.mark.parametrize(("fault", "min_replicas"), FAULTS)
async def test_redis_sentinel_failover_under_load(
    fault: str,
    min_replicas: int,
    make_redis_bus: Callable[..., EventBus],
    namespace: str,
    tmp_path: Path,
    report_tally: Callable[[Tally], None],
) -> None:
    require_redis_server_binary()
    directory = tmp_path / "ledger"
    directory.mkdir()
    ledger = Ledger(directory)
    cluster = SentinelCluster(tmp_path, replicas=1 + min_replicas).start()
    workers = Workers(cluster.url, namespace, tmp_path)
    try:
        env = {"RELIABILITY_LEDGER": str(directory)}
        for _ in range(2):
            worker = workers.start(MODULES, threads=4, env=env, wait=False)
            workers.wait_registered(worker, 1, url=cluster.primary.url)
        bus = make_redis_bus(
            url=cluster.url, publish_timeout=1.0, min_replicas=min_replicas, replica_timeout=0.5
        )
        await bus.start()
        sent: set[int] = set()
        sent_after_kill: set[int] = set()
        errors = 0
        killed_at: float | None = None
        publish_resumed: float | None = None

        async def publish(batch: range) -> None:
            nonlocal errors, publish_resumed
            events = [Tracked(n=n) for n in batch]
            errors += await publish_until_accepted(lambda: bus.publish_many(events), 0.05)
            sent.update(batch)
            if killed_at is not None:
                sent_after_kill.update(batch)
                if publish_resumed is None:
                    publish_resumed = time.monotonic() - killed_at

        async def kill() -> None:
            nonlocal killed_at
            await asyncio.sleep(TOTAL / PROFILE.rate / 4)
            if fault == "kill":
                cluster.primary.kill()
            else:  # the third sentinel leads: the clients ask the first one first
                cluster.sentinel(2).execute_command("SENTINEL", "FAILOVER", MASTER)
            killed_at = time.monotonic()

        async def handled_after_kill() -> float:
            while True:
                if sent_after_kill and len(ledger.missing(sent_after_kill)) < len(sent_after_kill):
                    assert killed_at is not None
                    return time.monotonic() - killed_at
                await asyncio.sleep(0.05)

        killer = asyncio.create_task(kill())
        watcher = asyncio.create_task(handled_after_kill())
        started = await paced(TOTAL, BATCH, PROFILE.rate, publish)
        await killer
        handling_resumed = await asyncio.wait_for(watcher, SETTLE_TIMEOUT)
        await wait_handled(ledger, sent, SETTLE_TIMEOUT)
        seconds = time.monotonic() - started
        promoted = cluster.promoted() is not None
        result = tally(
            f"Sentinel failover, MIN_REPLICAS={min_replicas}: "
            + ("primary SIGKILLed mid-run" if fault == "kill" else "SENTINEL FAILOVER mid-run"),
            "redis",
            sent=sent,
            ledger=ledger,
            seconds=seconds,
            faults=1,
            publish_errors=errors,
            notes=(
                f"publishing resumed {publish_resumed or -1:.1f}s and "
                f"handling {handling_resumed:.1f}s after the "
                f"{'kill' if fault == 'kill' else 'command'}; failed publishes retried"
                + ("" if min_replicas else "; lost counted, not asserted (async replication)")
            ),
        )
        report_tally(result)
        assert promoted, "the sentinels did not promote the replica"
        assert publish_resumed is not None and publish_resumed < RESUME_BOUND
        assert handling_resumed < RESUME_BOUND
        assert len(sent) == TOTAL
        if fault == "kill":
            assert errors > 0, "no publish failed: the primary was not down while publishing"
            # Asynchronous replication: only what the primary acknowledged in the
            # moments before its death may be gone, never what came after.
            assert not ledger.missing(sent_after_kill), "events published after the kill lost"
        # A manual failover with MIN_REPLICAS=0: what the old primary took after the
        # promotion and no worker took from it before its demotion is gone (counted).
        if min_replicas:
            assert result.lost == 0, f"{result.lost} events acknowledged by a replica lost"
        assert all(w.process.poll() is None for w in workers.started)
    finally:
        workers.stop_all()
        cluster.stop()
