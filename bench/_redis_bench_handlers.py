"""Handlers of bench/redis_bench.py, run by ``dramatiq eventbus.actors``."""

from __future__ import annotations

import os
import time
from functools import cache

import redis

from eventbus import BaseEvent, on_event

NOOP = "bench.noop"
WRITE = "bench.write"
LATENCY = "bench.latency"
#: Redis list where the latency handler records handler-start minus publish time (s).
LATENCY_KEY = "bench:latency:eventbus"


class Noop(BaseEvent):
    topic: str = NOOP
    i: int


class Order(BaseEvent):
    """bench/observability.py's realistic workload: a handler stores each event."""

    topic: str = WRITE
    i: int
    customer: str = "c-1042"
    items: list[str] = ["book", "pen", "lamp"]
    total_cents: int = 4599


class Timed(BaseEvent):
    topic: str = LATENCY
    sent: float


# bench/observability.py: the real SDK, a batch processor, an in-memory exporter.
if os.environ.get("BENCH_OTEL_SDK"):
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    _ratio = float(os.environ.get("BENCH_OTEL_RATIO", "1"))
    _provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(_ratio)))
    _provider.add_span_processor(BatchSpanProcessor(InMemorySpanExporter()))
    trace.set_tracer_provider(_provider)


@cache
def client() -> redis.Redis:
    return redis.Redis.from_url(os.environ["EVENTBUS_REDIS_URL"])


@on_event(Noop, name="bench.noop")
def noop(event: Noop) -> None:
    pass


@on_event(Order, name="bench.write")
def write(event: Order) -> None:
    client().set(f"bench:order:{event.i}", event.model_dump_json())


@on_event(Timed, name="bench.latency")
def latency(event: Timed) -> None:
    client().rpush(LATENCY_KEY, time.time() - event.sent)


SLEEPY = "bench.sleepy"
#: Redis list of the ``i`` of every Sleepy event handled, with the time it finished.
SLEEPY_DONE = "bench:sleepy:done"


class Sleepy(BaseEvent):
    """bench/redis_recovery.py: an event whose handler takes a while."""

    topic: str = SLEEPY
    i: int
    seconds: float = 0.2


@on_event(Sleepy, name="bench.sleepy")
def sleepy(event: Sleepy) -> None:
    time.sleep(event.seconds)
    client().rpush(SLEEPY_DONE, f"{event.i} {time.time()}")
