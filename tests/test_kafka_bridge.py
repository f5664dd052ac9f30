"""The Kafka bridge under records and handlers that misbehave (a real Kafka-protocol
broker, Tansu): poison that crashes decoders, stuck partitions, dead letters that
cannot be written."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from eventbus import EventBus
from eventbus.backends.kafka import KafkaBackend
from eventbus.backends.kafka_dlq import HEADER_ERROR, HEADER_ORIGINAL_OFFSET
from tests.kafka_events import Numbered
from tests.kafka_helpers import committed_offsets, create_topic, read_topic

pytest_plugins = ["tests.kafka_support"]


def deep(depth: int) -> bytes:
    """An envelope of a known type whose field nests ``depth`` lists deep."""
    head = '{"type":"tests.kafka.Numbered","event":{"topic":"t","n":1,"p":'
    return (head + "[" * depth + "]" * depth + "}}").encode()


async def test_deeply_nested_records_are_dead_lettered_and_the_partition_moves_on(
    make_kafka_bus: Callable[..., EventBus], kafka_bootstrap: str, kafka_names: tuple[str, str]
) -> None:
    from aiokafka import AIOKafkaProducer

    topic, group = kafka_names
    await create_topic(kafka_bootstrap, topic, 1)
    got: list[int] = []

    async def handler(event: Numbered) -> None:
        got.append(event.n)

    bus = make_kafka_bus()
    await bus.registry.register(topic, handler)
    await bus.start()
    depths = [100_000, 5_000, 990, 100]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for depth in depths:
            await producer.send_and_wait(topic, deep(depth))
    finally:
        await producer.stop()
    await bus.publish(Numbered(topic=topic, n=7))
    await bus.drain(timeout=20)

    assert got == [7]
    assert await committed_offsets(kafka_bootstrap, group, topic) == {0: len(depths) + 1}
    backend = bus.backend
    assert isinstance(backend, KafkaBackend) and backend.bridge is not None
    assert backend.bridge.reconnects == 0  # the consumer never failed
    dead: list[Any] = await read_topic(kafka_bootstrap, f"{topic}.dlq", len(depths))
    dead.sort(key=lambda r: int(dict(r.headers)[HEADER_ORIGINAL_OFFSET]))
    reasons = [dict(r.headers)[HEADER_ERROR].decode() for r in dead]
    assert all("too deeply nested" in reason for reason in reasons), reasons
    # The dead letters keep the records' values, as text (too deep to nest in JSON).
    records = sorted(await bus.dlq.apeek(limit=10), key=lambda r: r.offset or 0)
    assert [r.envelope for r in records] == [deep(depth).decode() for depth in depths]
    assert [json.loads(r.value)["offset"] for r in dead] == [0, 1, 2, 3]
