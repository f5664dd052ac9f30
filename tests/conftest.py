"""Shared fixtures.  Backend-specific ones live in their own support modules."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from eventbus import EventBus, EventBusSettings, RetryPolicy

_ids = itertools.count()

#: A retry policy fast enough for tests: 3 retries, 10 ms apart, doubling.
FAST_RETRIES = RetryPolicy(max_retries=3, delay=0.01, backoff_factor=2.0, max_delay=0.1)


@pytest.fixture
def topic() -> str:
    """A topic name no other test uses (decorated handlers are process-wide)."""
    return f"test.{os.getpid()}.{next(_ids)}"


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """An OpenTelemetry SDK provider exporting every finished span to memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.fixture
async def make_bus() -> AsyncIterator[Callable[..., EventBus]]:
    """Build buses that are stopped after the test."""
    buses: list[EventBus] = []

    def factory(**kwargs: object) -> EventBus:
        kwargs.setdefault("settings", EventBusSettings(shutdown_timeout=2.0))
        kwargs.setdefault("retry_policy", FAST_RETRIES)
        bus = EventBus(**kwargs)  # type: ignore[arg-type]
        buses.append(bus)
        return bus

    yield factory
    for bus in buses:
        await bus.stop()
