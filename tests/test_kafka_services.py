"""Who consumes on Kafka: web processes publish, workers consume, each service in
its own consumer group (a real Kafka-protocol broker, Tansu)."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Callable

import pytest

from eventbus import EventBus
from eventbus.kafka.backend import KafkaBackend
from tests.kafka_events import Numbered
from tests.kafka_helpers import (
    HEARTBEAT_INTERVAL_MS,
    SESSION_TIMEOUT_MS,
    committed_offsets,
    create_topic,
    wait_committed,
    wait_for,
)

pytest_plugins = ["tests.kafka_support"]

_ids = itertools.count()


@pytest.fixture
def service() -> Callable[[str], str]:
    """``service(label)``: a service name no other test uses."""
    run = f"{os.getpid()}_{next(_ids)}"
    return lambda label: f"{label}_{run}"


@pytest.fixture
async def buses(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[[], EventBus]]:
    """Buses configured as a deployment would be: from ``EVENTBUS_*`` variables only."""
    for name, value in {
        "EVENTBUS_BACKEND": "kafka",
        "EVENTBUS_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "EVENTBUS_KAFKA_SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS),
        "EVENTBUS_KAFKA_HEARTBEAT_INTERVAL_MS": str(HEARTBEAT_INTERVAL_MS),
        "EVENTBUS_KAFKA_IDEMPOTENCE": "false",  # Tansu has no idempotent producer
        "EVENTBUS_SHUTDOWN_TIMEOUT": "3",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("EVENTBUS_CONSUME", "EVENTBUS_KAFKA_GROUP_ID", "EVENTBUS_SERVICE"):
        monkeypatch.delenv(name, raising=False)
    made: list[EventBus] = []

    def factory() -> EventBus:
        bus = EventBus()
        made.append(bus)
        return bus

    yield factory
    for bus in made:
        await bus.stop()


async def test_web_process_publishes_without_joining_the_group_and_a_worker_consumes(
    buses: Callable[[], EventBus],
    service: Callable[[str], str],
    kafka_bootstrap: str,
    kafka_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic, _ = kafka_names
    await create_topic(kafka_bootstrap, topic, 2)
    name = service("shop")
    monkeypatch.setenv("EVENTBUS_SERVICE", name)
    in_web: list[int] = []
    in_worker: list[int] = []

    async def web_handler(event: Numbered) -> None:
        in_web.append(event.n)

    async def worker_handler(event: Numbered) -> None:
        in_worker.append(event.n)

    # The same handler module imported by both processes; EVENTBUS_CONSUME unset.
    web = buses()
    await web.registry.register(topic, web_handler, name=f"{topic}.handle")
    worker = buses()
    await worker.registry.register(topic, worker_handler, name=f"{topic}.handle")
    await web.start()
    await worker.start(consume=True)  # what `dramatiq eventbus.actors` does

    await web.publish_many([Numbered(topic=topic, n=i, key=f"k{i}") for i in range(20)])
    await web.drain(timeout=20)  # the group's commits, made by the worker

    assert sorted(in_worker) == list(range(20))
    assert in_web == []
    assert isinstance(worker.backend, KafkaBackend) and worker.backend.bridge is not None
    assert isinstance(web.backend, KafkaBackend) and web.backend.bridge is None
    assert web.backend.group_id == worker.backend.group_id == name  # the service's group
    # Had the web process joined the group, it would own one of the two partitions.
    assert {tp.partition for tp in worker.backend.bridge.assignment if tp.topic == topic} == {0, 1}
    assert "kafka-bridge" not in {r.backend for r in await web.health.check()}
    assert "kafka-bridge" in {r.backend for r in await worker.health.check()}
    committed = await committed_offsets(kafka_bootstrap, name, topic, 2)
    assert sum(max(o, 0) for o in committed.values()) == 20


async def test_two_services_each_get_every_event_of_a_shared_topic(
    buses: Callable[[], EventBus],
    service: Callable[[str], str],
    kafka_bootstrap: str,
    kafka_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic, _ = kafka_names
    await create_topic(kafka_bootstrap, topic, 3)
    seen: dict[str, list[int]] = {}
    started: list[EventBus] = []
    for label in ("billing", "shipping"):
        monkeypatch.setenv("EVENTBUS_SERVICE", service(label))
        bus = buses()
        handled = seen.setdefault(bus.service, [])

        async def handler(event: Numbered, handled: list[int] = handled) -> None:
            handled.append(event.n)

        await bus.registry.register(topic, handler, name=f"{topic}.{label}")
        await bus.start(consume=True)
        started.append(bus)
    monkeypatch.setenv("EVENTBUS_SERVICE", service("web"))
    publisher = buses()
    await publisher.start()

    await publisher.publish_many([Numbered(topic=topic, n=i, key=f"k{i}") for i in range(30)])
    await wait_for(
        lambda: all(len(handled) >= 30 for handled in seen.values()), 30, "both services"
    )
    groups = [bus.backend.group_id for bus in started if isinstance(bus.backend, KafkaBackend)]
    assert groups == list(seen) and len(set(groups)) == 2
    for group in groups:
        assert group is not None
        # Each group commits every record of the topic: what it handled is final.
        await wait_committed(kafka_bootstrap, group, topic, 3, records=30)

    assert {name: sorted(handled) for name, handled in seen.items()} == {
        name: list(range(30)) for name in seen
    }
