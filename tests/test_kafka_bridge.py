"""The Kafka bridge under records and handlers that misbehave (a real Kafka-protocol
broker, Tansu): poison that crashes decoders, stuck partitions, dead letters that
cannot be written."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from eventbus import EventBus, HealthStatus
from eventbus.kafka.backend import KafkaBackend
from eventbus.kafka.dlq import HEADER_ERROR, HEADER_ORIGINAL_OFFSET
from tests.kafka_events import Numbered
from tests.kafka_helpers import (
    bridge_went_round,
    committed_offsets,
    create_topic,
    keys_of_partition,
    read_topic,
    wait_for,
)

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


async def test_a_stuck_partition_pauses_alone_and_the_others_get_the_budget(
    make_kafka_bus: Callable[..., EventBus],
    kafka_bootstrap: str,
    kafka_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import eventbus.kafka.bridge as kafka_bridge

    monkeypatch.setattr(kafka_bridge, "PAUSE_AFTER", 0.5)  # seconds stuck before a pause
    topic, _ = kafka_names
    await create_topic(kafka_bootstrap, topic, 2)
    stuck_keys = keys_of_partition(0, 2, 12)
    free_keys = keys_of_partition(1, 2, 40)
    release = asyncio.Event()
    started: list[str] = []

    async def handler(event: Numbered) -> None:
        started.append(event.key)
        if event.key in stuck_keys:
            await release.wait()  # a handler stuck on partition 0

    bus = make_kafka_bus(max_in_flight=8)
    await bus.registry.register(topic, handler, name=f"{topic}.h")
    await bus.start()
    await bus.publish_many([Numbered(topic=topic, n=i, key=k) for i, k in enumerate(stuck_keys)])
    await wait_for(lambda: len(started) == 8, 20, "partition 0 to take the whole budget")
    backend = bus.backend
    assert isinstance(backend, KafkaBackend) and backend.bridge is not None
    bridge = backend.bridge
    # Stuck for longer than PAUSE_AFTER: the bridge pauses the partition.
    await wait_for(lambda: bool(bridge.paused), 20, "partition 0 to be paused")
    free = [Numbered(topic=topic, n=100 + i, key=k) for i, k in enumerate(free_keys)]
    await bus.publish_many(free)

    await wait_for(
        lambda: set(free_keys) <= set(started), 20, "partition 1 to flow past partition 0"
    )
    assert len([k for k in started if k in stuck_keys]) == 8  # what it held, no more
    assert [tp.partition for tp in bridge.paused] == [0]  # paused alone
    [health] = [r for r in await bus.health.check() if r.backend == "kafka-bridge"]
    assert health.status is HealthStatus.HEALTHY, health.detail
    assert "1 partition(s) paused" in health.detail

    release.set()
    await bus.drain(timeout=20)
    assert sorted(started) == sorted(stuck_keys + free_keys)
    assert bridge.paused == [] and bridge.in_flight == 0


async def test_a_partition_that_gets_stuck_beside_a_busy_one_takes_only_its_share(
    make_kafka_bus: Callable[..., EventBus], kafka_bootstrap: str, kafka_names: tuple[str, str]
) -> None:
    topic, _ = kafka_names
    await create_topic(kafka_bootstrap, topic, 2)
    stuck_keys = keys_of_partition(0, 2, 12)
    busy_keys = keys_of_partition(1, 2, 42)
    gate, release = asyncio.Event(), asyncio.Event()
    started: list[str] = []

    async def handler(event: Numbered) -> None:
        started.append(event.key)
        if event.key in stuck_keys:
            await release.wait()  # stuck on partition 0
        elif event.key in busy_keys[:2]:
            await gate.wait()  # partition 1 busy for a while

    bus = make_kafka_bus(max_in_flight=8)  # 4 each while both have records in flight
    await bus.registry.register(topic, handler, name=f"{topic}.h")
    await bus.start()
    await bus.publish_many([Numbered(topic=topic, n=i, key=k) for i, k in enumerate(busy_keys[:2])])
    await wait_for(lambda: len(started) == 2, 20, "partition 1 to be busy")
    await bus.publish_many([Numbered(topic=topic, n=i, key=k) for i, k in enumerate(stuck_keys)])
    await wait_for(lambda: len(started) == 6, 20, "partition 0's share to start")
    backend = bus.backend
    assert isinstance(backend, KafkaBackend) and backend.bridge is not None
    await bridge_went_round(backend.bridge)  # where it would take more, were it allowed
    assert backend.bridge.in_flight == 6
    assert len([k for k in started if k in stuck_keys]) == 4

    gate.set()
    rest = [Numbered(topic=topic, n=100 + i, key=k) for i, k in enumerate(busy_keys[2:])]
    await bus.publish_many(rest)
    await wait_for(lambda: set(busy_keys) <= set(started), 20, "partition 1 to go on")
    assert backend.bridge.paused == []  # nobody waited for partition 0 to be paused
    release.set()
    await bus.drain(timeout=20)
    assert sorted(started) == sorted(stuck_keys + busy_keys)


async def test_a_dead_letter_that_cannot_be_written_shows_in_health(
    make_kafka_bus: Callable[..., EventBus], kafka_bootstrap: str, kafka_names: tuple[str, str]
) -> None:
    # A 249-character topic is valid; its DLQ topic (253 characters) is not: every
    # write of its dead letters fails, and the partition cannot commit past them.
    topic = (kafka_names[0] + ".") + "x" * (249 - len(kafka_names[0]) - 1)
    await create_topic(kafka_bootstrap, topic, 1)

    async def fails(event: Numbered) -> None:
        raise RuntimeError("payment service down")

    bus = make_kafka_bus(publish_timeout=1)
    await bus.registry.register(topic, fails, name="tests.fails")
    await bus.start()
    await bus.publish(Numbered(topic=topic, n=1))

    async def bridge_health() -> Any:
        return next(r for r in await bus.health.check() if r.backend == "kafka-bridge")

    health = await bridge_health()
    for _ in range(100):
        if health.status is not HealthStatus.HEALTHY:
            break
        await asyncio.sleep(0.1)
        health = await bridge_health()
    assert health.status is HealthStatus.DEGRADED, health.detail
    assert "dead letter" in health.detail and f"{topic}.dlq" in health.detail
    assert "not written" in health.detail


# -- the caller's cancellation ----------------------------------------------------------


async def test_closing_the_bridge_never_swallows_the_callers_cancellation() -> None:
    # No broker needed: with nothing subscribed the bridge only waits for topics.
    from eventbus.backends.embedded import EmbeddedBroker
    from eventbus.kafka.bridge import BridgeMiddleware, KafkaBridge
    from eventbus.kafka.config import KafkaConfig

    middleware = BridgeMiddleware()
    bridge = KafkaBridge(
        KafkaConfig("127.0.0.1:9"),  # never contacted: no topic, no consumer
        "group",
        EmbeddedBroker(middleware=[middleware]),
        middleware,
        route=lambda topic: [],
        topics=lambda: [],
        dead_letters=None,  # type: ignore[arg-type]  # no record, no dead letter
    )
    bridge.start()
    closer = asyncio.create_task(bridge.close())
    await asyncio.sleep(0)  # close() now waits for the consumer task to end
    closer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closer
    assert closer.cancelled()


async def test_pausing_the_bridge_never_swallows_the_callers_cancellation(
    make_kafka_bus: Callable[..., EventBus], kafka_bootstrap: str, kafka_names: tuple[str, str]
) -> None:
    topic, _ = kafka_names
    await create_topic(kafka_bootstrap, topic, 1)

    async def handler(event: Numbered) -> None:
        pass

    bus = make_kafka_bus()
    await bus.registry.register(topic, handler)
    await bus.start()
    backend = bus.backend
    assert isinstance(backend, KafkaBackend) and backend.bridge is not None
    bridge = backend.bridge
    await wait_for(lambda: bool(bridge.assignment), 20, "the partition")  # fetching now
    pauser = asyncio.create_task(bridge.pause())
    await asyncio.sleep(0)  # pause() now waits for the fetch loop to stop
    pauser.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pauser
    assert pauser.cancelled()
