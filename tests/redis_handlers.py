"""Handlers for the Redis backend tests, run by real worker processes:

    dramatiq eventbus.actors tests.redis_handlers

The test process imports it for the event classes only: publishing needs no
handler, the workers' subscriptions in Redis route the events.  Handlers record
what they did in Redis (the server and namespace of ``EVENTBUS_REDIS_URL`` /
``EVENTBUS_REDIS_NAMESPACE``), where the tests read it back.
"""

from __future__ import annotations

import asyncio
import time

from eventbus import BaseEvent, on_event
from tests.redis_keys import client, key

#: Topic of :class:`Numbered` events, each recorded by two handlers.
RECORD = "redis.test.record"
#: Topic of :class:`Slow` events.
SLOW = "redis.test.slow"
#: Topic of :class:`Flaky` events: the handler fails on the first attempt.
FLAKY = "redis.test.flaky"
#: The second queue (the async handler of RECORD runs there).
OTHER_QUEUE = "redis_test_other"


class Numbered(BaseEvent):
    topic: str = RECORD
    n: int
    #: Seconds the sync handler sleeps before recording.
    delay: float = 0.0


class Slow(BaseEvent):
    topic: str = SLOW
    seconds: float


class Flaky(BaseEvent):
    topic: str = FLAKY


@on_event(Numbered)
def record(event: Numbered) -> None:
    if event.delay:
        time.sleep(event.delay)
    with client().pipeline(transaction=False) as pipe:
        pipe.sadd(key("handled"), event.n)
        pipe.incr(key("runs"))
        pipe.execute()


@on_event(Numbered, queue=OTHER_QUEUE)
async def record_async(event: Numbered) -> None:
    await asyncio.sleep(0)
    client().sadd(key("handled_async"), event.n)


@on_event(Slow)
def slow(event: Slow) -> None:
    client().incr(key(f"starts:{event.event_id}"))
    time.sleep(event.seconds)
    client().incr(key(f"done:{event.event_id}"))


@on_event(Flaky)
def flaky(event: Flaky) -> None:
    attempts = client().incr(key(f"attempts:{event.event_id}"))
    if attempts == 1:
        raise RuntimeError("the first attempt fails")
    client().set(key(f"ok:{event.event_id}"), attempts)
