"""The no-op handler of bench/redis_settings_bench.py's end-to-end row, run by
``dramatiq eventbus.actors bench._redis_settings_handlers``."""

from __future__ import annotations

from eventbus import BaseEvent, on_event

TOPIC = "bench.settings.e2e"


class Delivered(BaseEvent):
    topic: str = TOPIC
    n: int
    payload: str = "x" * 64


@on_event(Delivered)
def noop(event: Delivered) -> None:
    """Does nothing: the row measures the bus and Redis, not a handler."""
