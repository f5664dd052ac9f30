"""Kafka worker processes in one consumer group, against a real broker (Tansu).

Each worker is ``python -m eventbus.kafka.backend tests.kafka_handlers``; its
handler appends ``<pid> <n>`` to a file per handled event, so the test counts
deliveries across processes, including processes it SIGKILLs.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from eventbus import EventBus, EventBusSettings
from eventbus.kafka.backend import KafkaBackend
from tests.kafka_events import Numbered
from tests.kafka_helpers import (
    Worker,
    committed_offsets,
    create_topic,
    handled,
    owned,
    wait_committed,
    wait_for,
)

pytest_plugins = ["tests.kafka_support"]

PARTITIONS = 4


@pytest.fixture
async def publisher(kafka_bootstrap: str, kafka_names: tuple[str, str]) -> AsyncIterator[EventBus]:
    """A publish-only bus (no consumer in the test process)."""
    backend = KafkaBackend(kafka_bootstrap, kafka_names[1], idempotence=False)
    bus = EventBus(backend=backend, settings=EventBusSettings(shutdown_timeout=2))
    await bus.start()
    yield bus
    await bus.stop()


async def test_two_workers_split_the_partitions_and_handle_each_event_once(
    kafka_workers: Callable[..., Worker],
    publisher: EventBus,
    kafka_bootstrap: str,
    kafka_names: tuple[str, str],
    tmp_path: Path,
) -> None:
    topic, group = kafka_names
    await create_topic(kafka_bootstrap, topic, PARTITIONS)
    out = tmp_path / "handled.txt"
    a = kafka_workers(kafka_bootstrap, group, topic, out)
    b = kafka_workers(kafka_bootstrap, group, topic, out)
    await wait_for(
        lambda: bool(owned(a)) and bool(owned(b)) and owned(a) | owned(b) == set(range(4)),
        30,
        "both workers to own partitions",
    )
    assert not owned(a) & owned(b)

    await publisher.publish_many([Numbered(topic=topic, n=i, key=f"k{i}") for i in range(200)])
    await wait_for(lambda: len(handled(out)) >= 200, 30, "200 handled events")
    # Every record committed: handled for good, nothing delivered again.
    await wait_committed(kafka_bootstrap, group, topic, PARTITIONS, records=200)

    rows = handled(out)
    assert sorted(n for _, n in rows) == list(range(200))  # each exactly once
    by_pid = Counter(pid for pid, _ in rows)
    assert set(by_pid) == {a.pid, b.pid}, by_pid
    assert a.terminate() == 0 and b.terminate() == 0
    committed = await committed_offsets(kafka_bootstrap, group, topic, PARTITIONS)
    assert sum(committed.values()) == 200


async def test_sigkill_mid_stream_every_event_handled_at_least_once(
    kafka_workers: Callable[..., Worker],
    publisher: EventBus,
    kafka_bootstrap: str,
    kafka_names: tuple[str, str],
    tmp_path: Path,
) -> None:
    topic, group = kafka_names
    await create_topic(kafka_bootstrap, topic, PARTITIONS)
    out = tmp_path / "handled.txt"
    a = kafka_workers(kafka_bootstrap, group, topic, out, delay=0.05)
    b = kafka_workers(kafka_bootstrap, group, topic, out, delay=0.05)
    await wait_for(
        lambda: owned(a) | owned(b) == set(range(4)) and bool(owned(a)) and bool(owned(b)),
        30,
        "both workers to own partitions",
    )

    total = 400
    for batch in range(20):  # a stream of 20 events every 50 ms
        await publisher.publish_many(
            [Numbered(topic=topic, n=i, key=f"k{i}") for i in range(batch * 20, batch * 20 + 20)]
        )
        if batch == 8:
            a.kill()
            killed_after = len(handled(out))
        await asyncio.sleep(0.05)
    await wait_for(
        lambda: {n for _, n in handled(out)} == set(range(total)), 40, "every event handled"
    )

    rows = handled(out)
    counts = Counter(n for _, n in rows)
    duplicates = {n: c for n, c in counts.items() if c > 1}
    print(
        f"\n{len(rows)} deliveries of {total} events; {len(duplicates)} handled twice or more "
        f"(SIGKILL after {killed_after} deliveries)"
    )
    assert set(counts) == set(range(total))
    assert any(pid == b.pid for pid, _ in rows)
    # Duplicates are only possible for records the killed worker had not committed.
    assert len(duplicates) <= sum(1 for pid, _ in rows if pid == a.pid)
    assert b.terminate() == 0
    committed = await committed_offsets(kafka_bootstrap, group, topic, PARTITIONS)
    assert sum(committed.values()) == total


async def test_restarted_worker_resumes_from_committed_offsets(
    kafka_workers: Callable[..., Worker],
    publisher: EventBus,
    kafka_bootstrap: str,
    kafka_names: tuple[str, str],
    tmp_path: Path,
) -> None:
    topic, group = kafka_names
    await create_topic(kafka_bootstrap, topic, 2)
    out = tmp_path / "handled.txt"
    first = kafka_workers(kafka_bootstrap, group, topic, out)
    await publisher.publish_many([Numbered(topic=topic, n=i, key=f"k{i}") for i in range(30)])
    await wait_for(lambda: len(handled(out)) >= 30, 30, "the first 30 events")
    assert first.terminate() == 0  # SIGTERM: finish, commit, leave
    assert sum((await committed_offsets(kafka_bootstrap, group, topic, 2)).values()) == 30

    await publisher.publish_many([Numbered(topic=topic, n=i, key=f"k{i}") for i in range(30, 60)])
    second = kafka_workers(kafka_bootstrap, group, topic, out)
    await wait_for(lambda: len(handled(out)) >= 60, 30, "the next 30 events")
    await wait_committed(kafka_bootstrap, group, topic, 2, records=60)

    rows = handled(out)
    assert sorted(n for _, n in rows) == list(range(60))  # nothing handled twice
    assert {n for pid, n in rows if pid == second.pid} == set(range(30, 60))
    assert second.terminate() == 0


async def test_dramatiq_eventbus_actors_runs_the_kafka_bridge(
    kafka_workers: Callable[..., Worker],
    publisher: EventBus,
    kafka_bootstrap: str,
    kafka_names: tuple[str, str],
    tmp_path: Path,
) -> None:
    topic, group = kafka_names
    await create_topic(kafka_bootstrap, topic, PARTITIONS)
    out = tmp_path / "handled.txt"
    worker = kafka_workers(kafka_bootstrap, group, topic, out, dramatiq_cli=True)

    await publisher.publish_many([Numbered(topic=topic, n=i, key=f"k{i}") for i in range(50)])
    await wait_for(lambda: len(handled(out)) >= 50, 40, "50 handled events")
    await wait_committed(kafka_bootstrap, group, topic, PARTITIONS, records=50)

    assert sorted(n for _, n in handled(out)) == list(range(50)), worker.output()
    assert worker.terminate(30) == 0, worker.output()
    committed = await committed_offsets(kafka_bootstrap, group, topic, PARTITIONS)
    assert sum(committed.values()) == 50
    # where the handlers ran, and that dramatiq's --threads did not, is said at boot
    assert "dramatiq's --threads stay idle" in worker.output()
