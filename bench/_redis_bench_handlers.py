"""Handlers of bench/redis_bench.py, run by ``dramatiq eventbus.actors``."""

from __future__ import annotations

import os
import time
from functools import cache

import redis

from eventbus import BaseEvent, on_event

NOOP = "bench.noop"
LATENCY = "bench.latency"
#: Redis list where the latency handler records handler-start minus publish time (s).
LATENCY_KEY = "bench:latency:eventbus"


class Noop(BaseEvent):
    topic: str = NOOP
    i: int


class Timed(BaseEvent):
    topic: str = LATENCY
    sent: float


# bench/observability.py: the real SDK, a batch processor, an in-memory exporter.
if os.environ.get("BENCH_OTEL_SDK"):
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    _provider = TracerProvider()
    _provider.add_span_processor(BatchSpanProcessor(InMemorySpanExporter()))
    trace.set_tracer_provider(_provider)


@cache
def client() -> redis.Redis:
    return redis.Redis.from_url(os.environ["EVENTBUS_REDIS_URL"])


@on_event(Noop, name="bench.noop")
def noop(event: Noop) -> None:
    pass


@on_event(Timed, name="bench.latency")
def latency(event: Timed) -> None:
    client().rpush(LATENCY_KEY, time.time() - event.sent)
