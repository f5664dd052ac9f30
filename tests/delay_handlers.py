"""Handlers for the delayed-publish and concurrency-limit tests, run by real
worker processes (``dramatiq eventbus.actors tests.delay_handlers``).

They record in Redis (the server and namespace of ``EVENTBUS_REDIS_URL`` /
``EVENTBUS_REDIS_NAMESPACE``) when they ran and how many runs overlapped.
"""

from __future__ import annotations

import time

from eventbus import BaseEvent, on_event
from tests.redis_keys import client, key

#: Topic of :class:`Delayed` events.
DELAYED = "delay.test.delayed"
#: Topic of :class:`Limited` events.
LIMITED = "limit.test.limited"
#: The concurrency limit of :func:`limited`.
LIMIT = 2

#: Count one more run in KEYS[1] and keep the highest count seen in KEYS[2].
ENTER = """
local running = redis.call('INCR', KEYS[1])
if running > tonumber(redis.call('GET', KEYS[2]) or '0') then
  redis.call('SET', KEYS[2], running)
end
return running
"""


class Delayed(BaseEvent):
    topic: str = DELAYED
    n: int


class Limited(BaseEvent):
    topic: str = LIMITED
    n: int
    #: Seconds each run takes.
    seconds: float = 0.05


@on_event(Delayed)
def record_delayed(event: Delayed) -> None:
    client().hset(key("handled_at"), str(event.n), repr(time.time()))


@on_event(Limited, concurrency=LIMIT)
def limited(event: Limited) -> None:
    redis = client()
    redis.eval(ENTER, 2, key("running"), key("most"))
    try:
        # Sleep, or less once a test sets "release" (the long runs of a killed
        # worker, redelivered, must not hold the slots for long).
        deadline = time.monotonic() + event.seconds
        while (left := deadline - time.monotonic()) > 0 and not redis.exists(key("release")):
            time.sleep(min(left, 0.05))
    finally:
        redis.decr(key("running"))
    with redis.pipeline(transaction=False) as pipe:
        pipe.sadd(key("done"), event.n)
        pipe.incr(key("runs"))
        pipe.execute()
