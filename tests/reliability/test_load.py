"""Load: a stream of events through the Redis backend to 2 worker processes,
every handler run recorded in per-process ledgers: none lost, none run twice.

10,000 events in the quick profile, 100,000 in the long one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from eventbus import EventBus
from tests.reliability.handlers import Tracked
from tests.reliability.support import PROFILE, Ledger, Tally, batches, tally, wait_handled

if TYPE_CHECKING:
    from tests.redis_support import Workers

pytest_plugins = ["tests.redis_support"]
pytestmark = pytest.mark.timeout(PROFILE.timeout)

MODULES = ("tests.reliability.handlers",)
#: Events per publish_many call.
BATCH = 500
#: Worker redelivery timeout: the production default, so a busy but live worker
#: is never mistaken for a dead one (which would legitimately run events twice).
REDELIVERY_TIMEOUT = 30.0


async def test_redis_load_two_worker_processes(
    make_redis_bus: Callable[..., EventBus],
    workers: Workers,
    tmp_path: Path,
    report_tally: Callable[[Tally], None],
) -> None:
    total = PROFILE.load_events
    ledger_dir = tmp_path / "ledger"
    ledger_dir.mkdir()
    ledger = Ledger(ledger_dir)
    workers.start(
        MODULES,
        processes=2,
        threads=8,
        env={
            "RELIABILITY_LEDGER": str(ledger_dir),
            "EVENTBUS_REDIS_REDELIVERY_TIMEOUT": str(REDELIVERY_TIMEOUT),
        },
    )
    bus = make_redis_bus(redelivery_timeout=REDELIVERY_TIMEOUT)
    await bus.start()

    started = time.monotonic()
    for batch in batches(total, BATCH):
        await bus.publish_many([Tracked(n=n) for n in batch])
    publish_seconds = time.monotonic() - started
    await wait_handled(ledger, range(total), timeout=PROFILE.timeout - 30)
    seconds = time.monotonic() - started
    await bus.drain(timeout=20)  # nothing ready, delayed or in flight: nothing more can run

    processes = {pid: sum(c.values()) for pid, c in ledger.refresh().done_by_pid.items()}
    result = tally(
        "load: 2 worker processes",
        "redis",
        sent=range(total),
        ledger=ledger,
        seconds=seconds,
        notes=(
            f"{total / seconds:,.0f} events/s end to end, published at "
            f"{total / publish_seconds:,.0f}/s; per process: "
            + ", ".join(f"{n:,}" for n in sorted(processes.values(), reverse=True))
        ),
    )
    report_tally(result)
    assert result.lost == 0, f"{result.lost} events never handled"
    assert set(ledger.done) == set(range(total)), "a handler ran for an event never sent"
    # No fault here: a live worker's events are never handed to another one.
    assert result.duplicated == 0
    assert len(processes) == 2 and min(processes.values()) > 0, processes
    assert bus.dlq.size() == 0
