"""A Redis outage while handlers fail, with every event counted.

Handlers fail some of their attempts throughout the run; in the middle, Redis is
SIGKILLed and stays down for several seconds before it restarts on the same port
(append-only file, fsync always).  Attempts that fail while it is down can write
neither their retry nor their dead letter: they must be handed over again once
Redis is back, never acknowledged away.  Every event that can succeed is handled,
every event that always fails is dead-lettered; nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from eventbus import EventBus
from tests.durable_handlers import Flaky
from tests.reliability.support import (
    PROFILE,
    Ledger,
    Tally,
    paced,
    publish_until_accepted,
    wait_until,
)

pytest.register_assert_rewrite("tests.redis_support")  # before it is imported below
from tests.redis_support import RedisServer, Workers, require_redis_server_binary  # noqa: E402

pytest_plugins = ["tests.redis_support"]
pytestmark = pytest.mark.timeout(PROFILE.timeout)

MODULES = ("tests.durable_handlers",)
#: Events of the run: a third of the Redis restart run's.
EVENTS = PROFILE.restart_events // 3
#: Events per second, and per publish call: the stream outlasts the outage.
RATE = 100.0
BATCH = 10
#: Seconds Redis stays down.
OUTAGE = {"quick": 4.0, "long": 8.0}.get(PROFILE.name, 8.0)
#: Retries of the workers' handlers.
MAX_RETRIES = 3
#: Seconds each attempt takes: some are always running when Redis goes down.
ATTEMPT_TIME = 0.05
#: Seconds to wait for the last outcomes after the stream ended.
SETTLE_TIMEOUT = 60.0
#: What the workers log for each failed attempt they handed over again.
HANDED_OVER = "Neither a retry nor a dead letter could be written"


def fails_of(n: int) -> int:
    """Failing attempts of event ``n``: every tenth fails for good (-1), every other
    one twice (then succeeds on its second retry), the rest never."""
    if n % 10 == 5:
        return -1
    return 2 if n % 2 == 0 else 0


async def test_redis_outage_while_handlers_fail(
    make_redis_bus: Callable[..., EventBus],
    workers: Workers,
    tmp_path: Path,
    report_tally: Callable[[Tally], None],
) -> None:
    require_redis_server_binary()
    data, ledger_dir, marks = tmp_path / "redis-data", tmp_path / "ledger", tmp_path / "marks"
    for directory in (data, ledger_dir, marks):
        directory.mkdir()
    durable = ("--appendonly", "yes", "--appendfsync", "always", "--dir", str(data))
    server = RedisServer(args=durable).start()
    ledger = Ledger(ledger_dir)
    try:
        started_workers = workers.start(
            MODULES,
            processes=2,
            threads=8,
            env={
                "DURABLE_LEDGER": str(ledger_dir),
                "DURABLE_MARKS": str(marks),
                "EVENTBUS_MAX_RETRIES": str(MAX_RETRIES),
                "EVENTBUS_REDIS_REDELIVERY_TIMEOUT": "10",
            },
            redis_url=server.url,
        )
        bus = make_redis_bus(url=server.url, publish_timeout=0.5, redelivery_timeout=10)
        await bus.start()
        sent: set[int] = set()
        errors = 0
        down = 0.0

        async def publish(batch: range) -> None:
            nonlocal errors
            events = [Flaky(n=n, fails=fails_of(n), delay=ATTEMPT_TIME) for n in batch]
            errors += await publish_until_accepted(lambda: bus.publish_many(events))
            sent.update(batch)

        async def outage() -> None:
            nonlocal down
            await asyncio.sleep(EVENTS / RATE / 3)
            server.kill()
            stopped = time.monotonic()
            await asyncio.sleep(OUTAGE)
            await asyncio.to_thread(server.start)  # same port, reloads the append-only file
            down = time.monotonic() - stopped

        task = asyncio.create_task(outage())
        began = await paced(EVENTS, BATCH, RATE, publish)
        await task
        doomed = {n for n in sent if fails_of(n) < 0}
        good = sent - doomed

        def dead_lettered() -> set[int]:
            records = bus.dlq.store.find(None)
            return {r.event.n for r in records if r.event is not None and hasattr(r.event, "n")}

        def settled() -> bool:
            return not ledger.missing(good) and doomed <= dead_lettered()

        with contextlib.suppress(AssertionError):  # the tally shows what is missing
            await wait_until(settled, SETTLE_TIMEOUT, "every event's outcome")
        seconds = time.monotonic() - began
        ledger.refresh()
        letters = dead_lettered()
        outcome = {n for n in good if ledger.done[n]} | (doomed & letters)
        handed_over = started_workers.output().count(HANDED_OVER)
        result = Tally(
            scenario="Redis down while handlers fail",
            backend="redis",
            sent=len(sent),
            handled=len(outcome),
            lost=len(sent) - len(outcome),
            duplicated=sum(count - 1 for count in ledger.done.values() if count > 1),
            seconds=round(seconds, 2),
            faults=1,
            publish_errors=errors,
            notes=(
                f"SIGKILL + restart, down {down:.1f}s (AOF, fsync always); handlers fail "
                f"2 attempts of every other event, every attempt of one in ten "
                f"({len(doomed)}, all to be dead-lettered); {handed_over} failed attempts "
                "could write neither retry nor dead letter and were handed over again"
            ),
        )
        report_tally(result)
        assert result.lost == 0, (
            f"{result.lost} events lost: {len(ledger.missing(good))} never handled, "
            f"{len(doomed - letters)} never dead-lettered"
        )
        assert not (letters & good), "an event that could succeed was dead-lettered"
        assert len(sent) == EVENTS
        assert errors > 0, "no publish failed: Redis was not down while publishing"
        assert handed_over > 0, "no attempt failed while Redis was down: the test proves nothing"
        await bus.drain(timeout=30)  # nothing left pending
    finally:
        workers.stop_all()
        server.stop()
