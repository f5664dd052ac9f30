"""The unrouted window on Redis, with every event counted for two services.

* **Redis restarted without persistence** mid-stream: Redis forgets every
  subscription; the publisher goes on the moment it is back; service a's workers
  write their subscriptions again at their next heartbeat, service b's (a longer
  heartbeat) a second later.  Before the window existed, the events published in
  between were acknowledged and dropped (80 of 963 in the first 0.35 s).
* **A fresh deploy**: the web process publishes before any worker exists; a
  worker starts, then a second one of the same service, while publishing goes on.
  (Another service deployed later gets events from its own first registration:
  a deploy is not a replay.)

``sent`` counts events whose publish returned OK; an event is ``handled`` once
every service handled it; ``duplicated`` counts handler runs beyond the first,
over every service.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from eventbus import EventBus, PublishError
from tests.reliability.handlers import Tracked
from tests.reliability.support import PROFILE, Ledger, Tally, paced, wait_handled, wait_until

pytest.register_assert_rewrite("tests.redis_support")  # before it is imported below
from tests.redis_support import (  # noqa: E402
    TEST_REDELIVERY_TIMEOUT,
    RedisServer,
    WorkerProcess,
    Workers,
    require_redis_server_binary,
)

pytest_plugins = ["tests.redis_support"]
pytestmark = pytest.mark.timeout(PROFILE.timeout)

MODULES = ("tests.reliability.handlers",)
#: Events per publish call.
BATCH = 10
#: Seconds to wait for the last events after the stream ended.
SETTLE_TIMEOUT = 60.0
#: Redelivery timeout of service b's workers: their heartbeat (and so the moment
#: they write their subscriptions again after a restart) comes well after a's.
SLOW_REDELIVERY_TIMEOUT = 10.0
SERVICES = ("svca", "svcb")


def ledgers(tmp_path: Path) -> dict[str, Ledger]:
    out = {}
    for service in SERVICES:
        directory = tmp_path / f"ledger-{service}"
        directory.mkdir()
        out[service] = Ledger(directory)
    return out


def start_service(
    workers: Workers, service: str, ledger: Ledger, url: str, redelivery: float
) -> WorkerProcess:
    env = {
        "EVENTBUS_SERVICE": service,
        "RELIABILITY_LEDGER": str(ledger.path),
        "EVENTBUS_REDIS_REDELIVERY_TIMEOUT": str(redelivery),
    }
    return workers.start(MODULES, threads=4, env=env, redis_url=url)


def services_tally(
    scenario: str, sent: set[int], books: dict[str, Ledger], seconds: float, **extra: object
) -> Tally:
    for ledger in books.values():
        ledger.refresh()
    handled = sum(1 for n in sent if all(ledger.done[n] for ledger in books.values()))
    duplicated = sum(
        count - 1 for ledger in books.values() for count in ledger.done.values() if count > 1
    )
    per_service = ", ".join(
        f"{service} handled {sum(1 for n in sent if books[service].done[n])}" for service in books
    )
    notes = str(extra.pop("notes", ""))
    return Tally(
        scenario=scenario,
        backend="redis",
        sent=len(sent),
        handled=handled,
        lost=len(sent) - handled,
        duplicated=duplicated,
        seconds=round(seconds, 2),
        notes=f"{notes}; {per_service}",
        **extra,  # type: ignore[arg-type]
    )


async def test_redis_restart_without_persistence_loses_no_acknowledged_publish(
    make_redis_bus: Callable[..., EventBus],
    workers: Workers,
    tmp_path: Path,
    report_tally: Callable[[Tally], None],
) -> None:
    require_redis_server_binary()
    total = PROFILE.restart_events
    books = ledgers(tmp_path)
    server = RedisServer()  # no persistence: a restart forgets everything
    server.start()
    try:
        start_service(workers, "svca", books["svca"], server.url, TEST_REDELIVERY_TIMEOUT)
        start_service(workers, "svcb", books["svcb"], server.url, SLOW_REDELIVERY_TIMEOUT)
        bus = make_redis_bus(url=server.url, publish_timeout=0.5)
        await bus.start()
        sent: set[int] = set()
        errors = 0
        restarted_at = 0.0
        after_restart: set[int] = set()
        gate = asyncio.Event()
        gate.set()
        in_flight = 0

        async def publish(batch: range) -> None:
            nonlocal errors, in_flight
            events = [Tracked(n=n) for n in batch]
            while True:
                await gate.wait()
                in_flight += 1
                try:
                    await bus.publish_many(events)
                except PublishError:
                    errors += 1
                    await asyncio.sleep(0.02)
                    continue
                finally:
                    in_flight -= 1
                sent.update(batch)
                if restarted_at:
                    after_restart.update(batch)
                return

        async def restart() -> None:
            nonlocal restarted_at
            await asyncio.sleep(total / PROFILE.rate / 3)
            # Without persistence, events queued at the crash are gone with it
            # (durability across a restart needs AOF: test_faults_redis): hold the
            # stream until the workers caught up, so every loss counted here is
            # one of the window after the restart.
            gate.clear()
            await wait_until(lambda: not in_flight, 10, "the publishes under way to finish")
            await wait_handled(books["svca"], set(sent), SETTLE_TIMEOUT)
            await wait_handled(books["svcb"], set(sent), SETTLE_TIMEOUT)
            server.kill()
            await asyncio.to_thread(server.start)  # same port, empty
            restarted_at = time.monotonic()
            gate.set()

        task = asyncio.create_task(restart())
        started = await paced(total, BATCH, PROFILE.rate, publish)
        await task
        for ledger in books.values():
            await wait_handled(ledger, sent, SETTLE_TIMEOUT)
        seconds = time.monotonic() - started
        rewritten = sum("writing its subscriptions again" in w.output() for w in workers.started)
        result = services_tally(
            "Redis restarted without persistence (unrouted window)",
            sent,
            books,
            seconds,
            faults=1,
            publish_errors=errors,
            notes=(
                f"{len(after_restart)} events published after the restart, before and while "
                "the workers of svca then svcb wrote their subscriptions again"
            ),
        )
        report_tally(result)
        assert result.lost == 0, f"{result.lost} acknowledged events never handled by both"
        assert result.duplicated == 0
        assert len(sent) == total
        assert after_restart, "nothing was published after the restart: the test proves nothing"
        assert rewritten >= 2, "the workers did not write their subscriptions again"
        assert all(w.process.poll() is None for w in workers.started)
    finally:
        workers.stop_all()
        server.stop()


async def test_fresh_deploy_publishes_before_any_worker_loses_nothing(
    make_redis_bus: Callable[..., EventBus],
    workers: Workers,
    redis_url: str,
    tmp_path: Path,
    report_tally: Callable[[Tally], None],
) -> None:
    total = PROFILE.burst_events
    books = {"svca": ledgers(tmp_path)["svca"]}
    bus = make_redis_bus()
    await bus.start()
    sent: set[int] = set()

    async def publish(batch: range) -> None:
        await bus.publish_many([Tracked(n=n) for n in batch])
        sent.update(batch)

    async def deploy() -> None:
        # The web process came first; the workers follow, one after the other.
        await wait_until(lambda: len(sent) >= total // 4, 30, "the first events published")
        for _ in range(2):
            await asyncio.to_thread(
                start_service, workers, "svca", books["svca"], redis_url, TEST_REDELIVERY_TIMEOUT
            )

    task = asyncio.create_task(deploy())
    # Slow enough that the workers boot while publishing goes on.
    started = await paced(total, BATCH, PROFILE.rate / 4, publish)
    await task
    await wait_handled(books["svca"], sent, SETTLE_TIMEOUT)
    seconds = time.monotonic() - started
    result = services_tally(
        "publish before any worker (fresh deploy)",
        sent,
        books,
        seconds,
        notes=(
            f"at least {total // 4} events published before any subscription existed; two "
            "workers started one after the other while publishing went on"
        ),
    )
    report_tally(result)
    assert result.lost == 0, f"{result.lost} acknowledged events never handled"
    assert result.duplicated == 0
    assert len(sent) == total
