"""``eventbus_backlog`` on Kafka: the consumer group's lag per partition (a real
Kafka-protocol broker, Tansu)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

import eventbus.kafka.lag as kafka_lag
from eventbus import EventBus, EventBusSettings
from eventbus.kafka.backend import KafkaBackend
from eventbus.prometheus import PrometheusMetricsCollector
from tests.kafka_events import Numbered
from tests.kafka_helpers import (
    FAST,
    HEARTBEAT_INTERVAL_MS,
    SESSION_TIMEOUT_MS,
    create_topic,
    keys_of_partition,
)

pytest_plugins = ["tests.kafka_support"]


async def test_backlog_is_the_groups_lag_per_partition_on_the_metrics(
    make_kafka_bus: Callable[..., EventBus],
    kafka_bootstrap: str,
    kafka_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kafka_lag, "BACKLOG_TTL", 0.2)  # seconds a reading is reused
    topic, group = kafka_names
    await create_topic(kafka_bootstrap, topic, 3)
    handled: list[int] = []

    async def handler(event: Numbered) -> None:
        handled.append(event.n)

    # A web process: the service's handlers imported, not consuming, Prometheus on.
    registry = CollectorRegistry()
    web = EventBus(
        backend=KafkaBackend(kafka_bootstrap, group, idempotence=False),
        settings=EventBusSettings(shutdown_timeout=3),
        retry_policy=FAST,
        metrics=PrometheusMetricsCollector(registry=registry),
    )
    await web.registry.register(topic, handler, name=f"{topic}.h")
    await web.start()
    try:
        # One publish per event: Tansu answers "latest offset" with the start of
        # the last record batch (Kafka answers the end); lone records agree.
        for i, key in enumerate(keys_of_partition(0, 3, 5)):
            await web.publish(Numbered(topic=topic, n=i, key=key))
        for i, key in enumerate(keys_of_partition(1, 3, 3)):
            await web.publish(Numbered(topic=topic, n=10 + i, key=key))

        def scrape() -> dict[str, float]:  # the collector runs in the scraper's thread
            # (only this test's topic: decorated handlers of other test modules
            # subscribe their topics too)
            return {
                sample.labels["queue"]: sample.value
                for metric in registry.collect()
                if metric.name == "eventbus_backlog"
                for sample in metric.samples
                if sample.labels["queue"].startswith(f"{topic}:")
            }

        assert await asyncio.to_thread(scrape) == {
            f"{topic}:0": 5,
            f"{topic}:1": 3,
            f"{topic}:2": 0,
        }
        # On the event loop's own thread backlog() answers at once, from its cache.
        mine = {k: v for k, v in web.backend.backlog().items() if k.startswith(f"{topic}:")}
        assert mine == {f"{topic}:0": 5, f"{topic}:1": 3, f"{topic}:2": 0}

        worker = EventBus(
            backend=KafkaBackend(
                kafka_bootstrap,
                group,
                idempotence=False,
                session_timeout_ms=SESSION_TIMEOUT_MS,
                heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS,
            ),
            settings=EventBusSettings(shutdown_timeout=3),
            retry_policy=FAST,
        )
        await worker.registry.register(topic, handler, name=f"{topic}.h")
        await worker.start(consume=True)
        try:
            await web.drain(timeout=20)
            assert sorted(handled) == [0, 1, 2, 3, 4, 10, 11, 12]
            last: dict[str, float] = {}

            async def caught_up() -> bool:
                last.update(await asyncio.to_thread(scrape))
                return set(last.values()) == {0}

            for _ in range(50):
                if await caught_up():
                    break
                await asyncio.sleep(0.1)
            assert last == {f"{topic}:0": 0, f"{topic}:1": 0, f"{topic}:2": 0}
        finally:
            await worker.stop()
    finally:
        await web.stop()


async def test_backlog_is_empty_before_start_and_covers_the_subscribed_topics_only(
    kafka_bootstrap: str, kafka_names: tuple[str, str]
) -> None:
    topic, group = kafka_names
    await create_topic(kafka_bootstrap, topic, 2)
    bus = EventBus(backend=KafkaBackend(kafka_bootstrap, group, idempotence=False))
    assert bus.backend.backlog() == {}
    await bus.start()
    try:
        await bus.publish(Numbered(topic=topic))  # a topic this bus does not subscribe
        backlog = await asyncio.to_thread(bus.backend.backlog)
        assert {key.rsplit(":", 1)[0] for key in backlog} <= set(bus.topics)
        assert not any(key.startswith(f"{topic}:") for key in backlog)
    finally:
        await bus.stop()
