"""Faults on the Kafka backend (a real Kafka-protocol broker, Tansu), with every
event counted: workers SIGKILLed every few seconds, the broker stopped for a few
seconds in the middle of publishing, a worker SIGTERMed during a burst.

Workers are ``python -m eventbus.kafka tests.kafka_handlers``; each
handled event appends ``<pid> <n>`` to a ledger file (:mod:`tests.kafka_handlers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from eventbus import EventBus, EventBusSettings, PublishError
from eventbus.kafka.backend import KafkaBackend
from tests.kafka_events import Numbered
from tests.kafka_helpers import TansuBroker, Worker, committed_offsets, create_topic, owned
from tests.reliability.support import (
    PROFILE,
    Ledger,
    Tally,
    batches,
    paced,
    tally,
    wait_handled,
    wait_until,
)

pytest_plugins = ["tests.kafka_support"]
pytestmark = pytest.mark.timeout(PROFILE.timeout + 60)

PARTITIONS = 4
#: Events per publish call in paced streams.
BATCH = 50
#: Seconds to wait for the last events after the stream ended (rebalances included).
SETTLE_TIMEOUT = 90.0
#: Seconds within which a SIGTERMed worker's partitions must be another worker's once it
#: left (the issue's target, 10 s from the signal, is reported in the notes: the exit
#: itself takes up to EVENTBUS_SHUTDOWN_TIMEOUT while running handlers finish).
TAKEOVER_BOUND = 10.0
_NOT_RUN = re.compile(r"(\d+) handler message\(s\) not run before shutdown")


def events(topic: str, batch: range) -> list[Numbered]:
    return [Numbered(topic=topic, n=n, key=f"k{n}") for n in batch]


async def publisher_bus(bootstrap: str, group: str, **options: object) -> EventBus:
    backend = KafkaBackend(bootstrap, group, idempotence=False, **options)  # type: ignore[arg-type]
    bus = EventBus(backend=backend, settings=EventBusSettings(shutdown_timeout=2))
    await bus.start()
    return bus


@pytest.fixture
async def publisher(kafka_bootstrap: str, kafka_names: tuple[str, str]) -> AsyncIterator[EventBus]:
    """A publish-only bus on the session's broker."""
    bus = await publisher_bus(kafka_bootstrap, kafka_names[1])
    yield bus
    await bus.stop()


async def both_own_partitions(a: Worker, b: Worker) -> None:
    await wait_until(
        lambda: bool(owned(a)) and bool(owned(b)) and owned(a) | owned(b) == set(range(PARTITIONS)),
        30,
        "both workers to own partitions",
    )


async def all_committed(bootstrap: str, group: str, topic: str, records: int) -> None:
    """Wait until the group committed ``records`` records of ``topic``: nothing of
    it can be delivered again after that."""
    deadline = time.monotonic() + 30
    while True:
        committed = await committed_offsets(bootstrap, group, topic, PARTITIONS)
        total = sum(max(0, offset) for offset in committed.values())
        if total >= records:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"only {total} of {records} records committed: {committed}")
        await asyncio.sleep(0.2)


async def test_kafka_sigkill_a_worker_every_few_seconds(
    kafka_workers: Callable[..., Worker],
    publisher: EventBus,
    kafka_bootstrap: str,
    kafka_names: tuple[str, str],
    tmp_path: Path,
    report_tally: Callable[[Tally], None],
) -> None:
    total = PROFILE.kafka_kill_events
    topic, group = kafka_names
    await create_topic(kafka_bootstrap, topic, PARTITIONS)
    out = tmp_path / "handled.txt"
    ledger = Ledger(out, single=True)
    slots = [kafka_workers(kafka_bootstrap, group, topic, out, delay=0.002) for _ in range(2)]
    await both_own_partitions(*slots)
    kills = 0

    async def killer() -> None:
        nonlocal kills
        while True:
            await asyncio.sleep(PROFILE.kafka_kill_interval)
            slots[kills % 2].kill()  # SIGKILL: no shutdown, no commit
            slots[kills % 2] = kafka_workers(kafka_bootstrap, group, topic, out, delay=0.002)
            kills += 1

    async def publish(batch: range) -> None:
        await publisher.publish_many(events(topic, batch))

    task = asyncio.create_task(killer())
    try:
        started = await paced(total, BATCH, PROFILE.rate, publish)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await wait_handled(ledger, range(total), SETTLE_TIMEOUT)
    seconds = time.monotonic() - started
    await all_committed(kafka_bootstrap, group, topic, total)

    result = tally(
        "SIGKILL a worker every few seconds",
        "kafka",
        sent=range(total),
        ledger=ledger,
        seconds=seconds,
        faults=kills,
        notes=(
            f"SIGKILL every {PROFILE.kafka_kill_interval:g}s, {PARTITIONS} partitions; "
            "uncommitted records of a killed worker are delivered again"
        ),
    )
    report_tally(result)
    assert result.lost == 0, f"{result.lost} events never handled"
    assert set(ledger.done) <= set(range(total))
    assert kills >= 1


async def test_kafka_broker_stopped_mid_publish(
    kafka_workers: Callable[..., Worker],
    kafka_names: tuple[str, str],
    tmp_path: Path,
    report_tally: Callable[[Tally], None],
) -> None:
    """The broker stops answering for a few seconds in the middle of a stream.

    Tansu is frozen with SIGSTOP, then resumed with SIGCONT: a broker that is
    down for a while without losing its log (Tansu's only local storage engine
    is in memory, so a killed and restarted Tansu would come back empty, which
    says nothing about this library).  Each publish either raises PublishError
    within the publish timeout or succeeds; every event whose publish succeeded
    is handled at least once.  Events whose publish raised are not retried (a
    timed-out record may still be written: those are counted, not required).
    """
    total = PROFILE.kafka_stop_events
    publish_timeout = 1.0
    pause = 3.0
    broker = TansuBroker.start()  # our own: the session's broker is not frozen
    started_workers: list[Worker] = []
    try:
        topic, group = kafka_names
        await create_topic(broker.bootstrap, topic, PARTITIONS)
        out = tmp_path / "handled.txt"
        ledger = Ledger(out, single=True)
        a = kafka_workers(broker.bootstrap, group, topic, out)
        b = kafka_workers(broker.bootstrap, group, topic, out)
        started_workers += [a, b]
        await both_own_partitions(a, b)
        bus = await publisher_bus(broker.bootstrap, group, publish_timeout=publish_timeout)
        sent: set[int] = set()
        refused: set[int] = set()
        errors = 0
        slowest = 0.0

        async def publish(batch: range) -> None:
            nonlocal errors, slowest
            began = time.monotonic()
            try:
                await bus.publish_many(events(topic, batch))
            except PublishError:
                errors += 1
                refused.update(batch)
            else:
                sent.update(batch)
            slowest = max(slowest, time.monotonic() - began)

        async def stop_broker() -> None:
            await asyncio.sleep(total / PROFILE.rate / 4)
            os.kill(broker.process.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(pause)
            finally:
                os.kill(broker.process.pid, signal.SIGCONT)

        task = asyncio.create_task(stop_broker())
        try:
            started = await paced(total, BATCH // 2, PROFILE.rate, publish, concurrent=True)
        finally:
            await task
            await bus.stop()
        await wait_handled(ledger, sent, SETTLE_TIMEOUT)
        seconds = time.monotonic() - started
        delivered_anyway = sum(1 for n in refused if ledger.refresh().done[n])

        result = tally(
            "Kafka broker stopped mid-publish",
            "kafka",
            sent=sent,
            ledger=ledger,
            seconds=seconds,
            faults=1,
            publish_errors=errors,
            notes=(
                f"broker frozen {pause:g}s (SIGSTOP/SIGCONT); {len(refused)} events refused "
                f"with PublishError ({delivered_anyway} of them written anyway), not retried; "
                f"slowest publish {slowest:.1f}s (timeout {publish_timeout:g}s)"
            ),
        )
        report_tally(result)
        assert result.lost == 0, f"{result.lost} events never handled"
        assert sent | refused == set(range(total))
        assert set(ledger.done) <= set(range(total))
        assert errors > 0, "no publish failed: the broker was not stopped while publishing"
        assert slowest < publish_timeout + 1.5, "a publish outlived its timeout"
    finally:
        for worker in started_workers:
            worker.kill()  # before the broker goes: no reconnect loop against nothing
        broker.stop()


async def test_kafka_sigterm_a_worker_during_a_burst(
    kafka_workers: Callable[..., Worker],
    publisher: EventBus,
    kafka_bootstrap: str,
    kafka_names: tuple[str, str],
    tmp_path: Path,
    report_tally: Callable[[Tally], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGTERM: the worker stops fetching, lets running handlers finish within
    ``EVENTBUS_SHUTDOWN_TIMEOUT`` (5 s here), commits what finished and leaves
    the group; what it fetched but could not run in time stays uncommitted and
    the other worker handles it."""
    total = PROFILE.burst_events
    topic, group = kafka_names
    await create_topic(kafka_bootstrap, topic, PARTITIONS)
    out = tmp_path / "handled.txt"
    ledger = Ledger(out, single=True)
    # 16 quarter-second handlers at once per worker: the SIGTERMed worker holds
    # more events than it can finish in its 5 s shutdown timeout.
    monkeypatch.setenv("EVENTBUS_MAX_CONCURRENCY", "16")
    stopping = kafka_workers(kafka_bootstrap, group, topic, out, delay=0.25)
    other = kafka_workers(kafka_bootstrap, group, topic, out, delay=0.25)
    await both_own_partitions(stopping, other)

    started = time.monotonic()
    for batch in batches(total, 500):
        await publisher.publish_many(events(topic, batch))
    await wait_until(
        lambda: sum(ledger.refresh().done.values()) >= total // 10, 30, "the burst to be under way"
    )
    theirs = owned(stopping)
    sigterm = time.monotonic()
    takeover = asyncio.create_task(_taken_over(other, theirs, sigterm))
    code = await asyncio.to_thread(stopping.terminate, 30)
    exited = time.monotonic() - sigterm
    reassigned = await takeover
    await wait_handled(ledger, range(total), SETTLE_TIMEOUT)
    seconds = time.monotonic() - started
    await all_committed(kafka_bootstrap, group, topic, total)

    log = stopping.output()
    not_run = sum(int(n) for n in _NOT_RUN.findall(log))
    handled_there = sum(ledger.done_by_pid.get(stopping.pid, {}).values())
    result = tally(
        "SIGTERM a worker during a burst",
        "kafka",
        sent=range(total),
        ledger=ledger,
        seconds=seconds,
        faults=1,
        notes=(
            f"SIGTERMed worker handled {handled_there}, exited {exited:.1f} s after the "
            f"signal (code {code}); its partitions were the other worker's "
            f"{reassigned:.1f} s after it; {not_run} queued handler messages not run there "
            "were delivered again; the rest of the time is the handlers' own (0.25 s each, "
            "16 at once on the one worker left)"
        ),
    )
    report_tally(result)
    assert code == 0, log
    assert result.lost == 0, f"{result.lost} events never handled"
    assert handled_there > 0
    assert not_run > 0, "the SIGTERMed worker finished everything: the test proves less"
    assert reassigned - exited <= TAKEOVER_BOUND, (
        f"partitions reassigned {reassigned - exited:.1f} s after the worker left"
    )


async def _taken_over(other: Worker, partitions: set[int], since: float) -> float:
    """Seconds from ``since`` until ``other`` logged ``partitions`` as its own."""
    await wait_until(lambda: partitions <= owned(other), 60, "the partitions to move over")
    return time.monotonic() - since
