"""Kafka test fixtures; use them with ``pytest_plugins = ["tests.kafka_support"]``.

Helpers (broker, worker processes, topic readers) are in :mod:`tests.kafka_helpers`.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator

import pytest

from tests.kafka_helpers import TansuBroker, Worker

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
