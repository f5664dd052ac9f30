"""Kafka test fixtures; use them with ``pytest_plugins = ["tests.kafka_support"]``.

Helpers (broker, worker processes, topic readers) are in :mod:`tests.kafka_helpers`.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from eventbus import EventBus, EventBusSettings
from eventbus.kafka.backend import KafkaBackend
from tests.kafka_helpers import (
    FAST,
    HEARTBEAT_INTERVAL_MS,
    SESSION_TIMEOUT_MS,
    TansuBroker,
    Worker,
)

_ids = itertools.count()


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[TansuBroker]:
    """A Tansu broker for the whole session."""
    broker = TansuBroker.start()
    yield broker
    broker.stop()


@pytest.fixture
def kafka_bootstrap(kafka_broker: TansuBroker) -> str:
    """``host:port`` of the session's broker."""
    return kafka_broker.bootstrap


@pytest.fixture
def kafka_names() -> tuple[str, str]:
    """A topic and a consumer group no other test uses."""
    n = next(_ids)
    return f"kt.{os.getpid()}.{n}", f"kg.{os.getpid()}.{n}"


@pytest.fixture
def kafka_workers() -> Iterator[Callable[..., Worker]]:
    """Start worker processes; every one still running is killed after the test."""
    started: list[Worker] = []

    def factory(*args: object, **kwargs: object) -> Worker:
        worker = Worker(*args, **kwargs)  # type: ignore[arg-type]
        started.append(worker)
        return worker

    yield factory
    for worker in started:
        worker.kill()


@pytest.fixture
async def make_kafka_bus(
    kafka_bootstrap: str, kafka_names: tuple[str, str]
) -> AsyncIterator[Callable[..., EventBus]]:
    """Buses on the Kafka backend (this test's group), stopped after the test."""
    buses: list[EventBus] = []

    def factory(tracer: Any = None, consume: bool = True, **backend_options: Any) -> EventBus:
        """A bus that runs its handlers here (``consume``, as a worker does) or only
        publishes (``consume=False``, a web process's default)."""
        backend_options.setdefault("group_id", kafka_names[1])
        backend = KafkaBackend(
            kafka_bootstrap,
            idempotence=False,  # Tansu has no idempotent producer
            session_timeout_ms=SESSION_TIMEOUT_MS,
            heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS,
            **backend_options,
        )
        bus = EventBus(
            backend=backend,
            settings=EventBusSettings(shutdown_timeout=3, consume=consume),
            retry_policy=FAST,
            tracer=tracer,
        )
        buses.append(bus)
        return bus

    yield factory
    for bus in buses:
        await bus.stop()
