"""The eventbus handler of bench/production_bench.py, run by ``dramatiq eventbus.actors``.

One topic, one async no-op handler (the shape of a FastAPI service's handlers) that
counts what it handled through :mod:`bench._production_common`.
"""

from __future__ import annotations

import os

from bench._production_common import Progress
from eventbus import BaseEvent, on_event

TOPIC = "prod.event"

progress = Progress(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))


class Prod(BaseEvent):
    """``sent``: the publish wall clock of a latency event, 0 for a throughput one."""

    topic: str = TOPIC
    i: int = 0
    sent: float = 0.0


@on_event(Prod, name="prod.handle")
async def handle(event: Prod) -> None:
    progress.hit(event.sent)
