"""The Kafka dead-letter store (a real Kafka-protocol broker, Tansu): one folded view
per process, markers in offset order, the DLQ topic's configuration checked."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from eventbus import EventBus, FailedEvent
from eventbus.dlq.queue import DeadLetterQueue
from eventbus.kafka.config import KafkaConfig
from eventbus.kafka.dlq import HEADER_OP, KafkaDeadLetterStore
from tests.kafka_events import Numbered
from tests.kafka_helpers import create_topic, read_topic, wait_for

pytest_plugins = ["tests.kafka_support"]


def failed(topic: str, n: int) -> FailedEvent:
    """A dead letter of the n-th event of ``topic``."""
    event = Numbered(topic=topic, n=n)
    return FailedEvent(
        id=f"dl-{topic}-{n}",
        event=event,
        envelope={"type": event.event_type, "event": event.model_dump(mode="json")},
        topic=topic,
        handler="tests.handler",
        queue="eventbus",
        attempts=2,
        error="payment service down",
        error_type="RuntimeError",
    )


@pytest.fixture
def make_store(kafka_bootstrap: str) -> Iterator[Callable[..., KafkaDeadLetterStore]]:
    """Stores on the session's broker, closed after the test."""
    stores: list[KafkaDeadLetterStore] = []

    def factory(topic: str, **options: Any) -> KafkaDeadLetterStore:
        store = KafkaDeadLetterStore(
            KafkaConfig(kafka_bootstrap), topics=lambda: [topic], idempotence=False, **options
        )
        stores.append(store)
        return store

    yield factory
    for store in stores:
        store.close()


async def produce(bootstrap: str, topic: str, *records: dict[str, Any]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for record in records:
            await producer.send_and_wait(topic, **record)
    finally:
        await producer.stop()


async def test_markers_apply_in_offset_order_whatever_the_producers_clocks(
    make_store: Callable[..., KafkaDeadLetterStore],
    kafka_bootstrap: str,
    kafka_names: tuple[str, str],
) -> None:
    topic, _ = kafka_names
    dlq = f"{topic}.dlq"
    await create_topic(kafka_bootstrap, dlq, 1)
    now = int(time.time() * 1000)
    removed, kept = failed(topic, 1), failed(topic, 2)
    await produce(
        kafka_bootstrap,
        dlq,
        {
            "key": removed.id.encode(),
            "value": json.dumps(removed.to_dict()).encode(),
            "timestamp_ms": now,
        },
        # Written after it by a host whose clock is an hour behind; a value-less
        # marker, as earlier versions wrote them.
        {
            "key": removed.id.encode(),
            "value": None,
            "headers": [(HEADER_OP, b"remove")],
            "timestamp_ms": now - 3_600_000,
        },
        {
            "key": kept.id.encode(),
            "value": json.dumps(kept.to_dict()).encode(),
            "timestamp_ms": now - 7_200_000,
        },
    )
    store = make_store(topic)

    assert [r.id for r in store.find(None)] == [kept.id]
    assert store.get(removed.id) is None
    assert store.size() == 1


async def test_markers_carry_a_value_so_compaction_never_sees_a_tombstone(
    make_store: Callable[..., KafkaDeadLetterStore],
    kafka_bootstrap: str,
    kafka_names: tuple[str, str],
) -> None:
    topic, _ = kafka_names
    store = make_store(topic)
    record = failed(topic, 1)
    store.add(record)
    assert [r.id for r in store.find(None)] == [record.id]
    claimed = store.claim(record.id)
    assert claimed is not None and store.get(record.id) is None  # hidden while claimed
    store.release(claimed)
    assert store.get(record.id) is not None
    assert store.remove(record.id) is not None
    assert store.find(None) == [] and store.size() == 0

    raw: list[Any] = await read_topic(kafka_bootstrap, f"{topic}.dlq", 4)
    ops = [dict(r.headers).get(HEADER_OP) for r in raw]
    assert ops == [None, b"claim", b"release", b"remove"]
    assert all(r.value is not None for r in raw)
    assert [json.loads(r.value)["op"] for r in raw[1:]] == ["claim", "release", "remove"]
    assert {r.key for r in raw} == {record.id.encode()}


def test_a_claim_expires_and_the_record_comes_back(
    make_store: Callable[..., KafkaDeadLetterStore], kafka_names: tuple[str, str]
) -> None:
    topic, _ = kafka_names
    store = make_store(topic, claim_timeout=0.5)
    record = failed(topic, 1)
    store.add(record)
    assert store.claim(record.id) is not None
    claimed = time.monotonic()
    assert store.claim(record.id) is None  # a second replay does not get it
    # The replay that claimed it died: the record comes back once the claim expires.
    deadline = claimed + 10
    while store.get(record.id) is None:
        assert time.monotonic() < deadline, "the expired claim still hides the record"
        time.sleep(0.02)


def test_reads_come_from_one_view_that_never_rereads_history(
    make_store: Callable[..., KafkaDeadLetterStore], kafka_names: tuple[str, str]
) -> None:
    topic, _ = kafka_names
    writer = make_store(topic)
    for n in range(30):
        writer.add(failed(topic, n))
    store = make_store(topic)
    assert store.size() == 30
    assert store.records_read == 30
    threads = threading.active_count()
    for _ in range(20):  # Prometheus scrapes, admin lists
        assert store.size() == 30
        assert len(store.find(10)) == 10
        assert store.get(failed(topic, 3).id) is not None
    assert store.records_read == 30  # nothing read twice
    assert threading.active_count() == threads  # no thread per call

    replayed: list[str] = []
    dlq = DeadLetterQueue(store, replayer=lambda record: replayed.append(record.id))
    ids = [failed(topic, n).id for n in range(10)]
    result = dlq.replay(ids)
    assert result.replayed == ids and replayed == ids
    assert store.size() == 20 and writer.size() == 20
    # Replaying N records reads back its own 2N markers (claim, remove), not N
    # histories (the view reads its own writes back in the background).
    deadline = time.monotonic() + 5
    while store.records_read < 30 + 2 * 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.records_read == 30 + 2 * 10


@pytest.fixture
def dlq_warnings(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], list[str]]]:
    caplog.set_level(logging.WARNING, logger="eventbus.backends")
    yield lambda: [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "DLQ" in r.getMessage()
    ]


async def create_with_dlq(bootstrap: str, topic: str, dlq_configs: dict[str, str]) -> None:
    """Create ``topic`` and its ``.dlq`` topic with ``dlq_configs``."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, 1, 1), NewTopic(f"{topic}.dlq", 1, 1, topic_configs=dlq_configs)]
        )
    finally:
        await admin.close()


async def test_a_dlq_topic_that_would_lose_dead_letters_is_named_at_start(
    make_kafka_bus: Callable[..., EventBus],
    kafka_bootstrap: str,
    kafka_names: tuple[str, str],
    dlq_warnings: Callable[[], list[str]],
) -> None:
    topic, _ = kafka_names
    await create_with_dlq(
        kafka_bootstrap, topic, {"cleanup.policy": "compact", "retention.ms": "86400000"}
    )

    async def handler(event: Numbered) -> None:
        pass

    bus = make_kafka_bus(consume=False)  # a web process checks too
    await bus.registry.register(topic, handler, name=f"{topic}.h")
    await bus.start()
    await wait_for(lambda: bool(dlq_warnings()), 10, "a warning about the DLQ topic")

    [warning] = dlq_warnings()
    assert f"{topic}.dlq" in warning
    assert "cleanup.policy=compact" in warning and "retention.ms=86400000" in warning


async def test_a_dlq_topic_that_keeps_dead_letters_raises_no_warning(
    make_kafka_bus: Callable[..., EventBus],
    kafka_bootstrap: str,
    kafka_names: tuple[str, str],
    dlq_warnings: Callable[[], list[str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    topic, _ = kafka_names
    await create_with_dlq(
        kafka_bootstrap, topic, {"cleanup.policy": "delete", "retention.ms": "-1"}
    )

    async def handler(event: Numbered) -> None:
        pass

    bus = make_kafka_bus()
    await bus.registry.register(topic, handler, name=f"{topic}.h")
    with caplog.at_level(logging.INFO, logger="eventbus.kafka.dlq"):
        await bus.start()
        store = bus.backend.dead_letter_store(bus.settings)
        assert isinstance(store, KafkaDeadLetterStore)
        assert await bus.dlq.asize() == 0  # the view checked the topic too
        # The check the bus started in the background, done here if it is not yet:
        # once it returns, the topic's configuration was read and judged.
        await store.topic_check.check([f"{topic}.dlq"])
    assert not [r for r in caplog.records if "Could not check" in r.getMessage()]
    assert dlq_warnings() == []
