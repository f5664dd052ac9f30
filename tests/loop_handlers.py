"""Handlers for tests/test_redis_loop_worker.py, run by real worker processes:

    dramatiq eventbus.actors tests.loop_handlers

Each records in Redis where (which thread) and how it ran, for the test to read.
"""

from __future__ import annotations

import asyncio
import threading
import time

from eventbus import BaseEvent, on_event
from tests.redis_keys import client, key

#: The queue of :func:`on_other_queue` (consumed only when ``--queues`` names it).
OTHER_QUEUE = "loop_test_other"


class Where(BaseEvent):
    topic: str = "loop.test.where"


class TooSlow(BaseEvent):
    topic: str = "loop.test.too_slow"


class Lingering(BaseEvent):
    topic: str = "loop.test.lingering"
    seconds: float


class Elsewhere(BaseEvent):
    topic: str = "loop.test.elsewhere"


@on_event(Where)
async def where_async(event: Where) -> None:
    client().set(key(f"async-thread:{event.event_id}"), threading.current_thread().name)


@on_event(Where)
def where_sync(event: Where) -> None:
    client().set(key(f"sync-thread:{event.event_id}"), threading.current_thread().name)


@on_event(TooSlow, time_limit=0.3, max_retries=0)
async def too_slow(event: TooSlow) -> None:
    client().incr(key(f"too-slow-started:{event.event_id}"))
    await asyncio.sleep(30)


@on_event(Lingering)
async def lingering(event: Lingering) -> None:
    client().incr(key(f"lingering-started:{event.event_id}"))
    await asyncio.sleep(event.seconds)
    client().incr(key(f"lingering-done:{event.event_id}"))


@on_event(Elsewhere, queue=OTHER_QUEUE)
async def on_other_queue(event: Elsewhere) -> None:
    client().incr(key(f"elsewhere:{event.event_id}"))


@on_event(Elsewhere)
def on_default_queue(event: Elsewhere) -> None:
    time.sleep(0)
    client().incr(key(f"default:{event.event_id}"))
