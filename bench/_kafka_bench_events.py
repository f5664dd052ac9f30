"""The event class of the Kafka benchmark, shared by the publisher and the worker."""

from __future__ import annotations

from eventbus import BaseEvent


class BenchEvent(BaseEvent):
    __event_type__ = "bench.kafka.BenchEvent"
    n: int = 0
