"""Handlers of tests/test_redis_production.py, run by real worker processes.

The workers consume a Redis that the test fills up (``maxmemory``), so the handlers
record what they did on another server: ``EVENTBUS_TEST_RECORD_URL`` (the session's
Redis), under ``EVENTBUS_REDIS_NAMESPACE``.
"""

from __future__ import annotations

import os
from functools import cache

import redis

from eventbus import BaseEvent, on_event

#: Topic of :class:`Filler` events, each handled by two handlers (two queues).
TOPIC = "redis.test.production"
#: The second handler's queue.
OTHER_QUEUE = "production_other"


class Filler(BaseEvent):
    topic: str = TOPIC
    n: int
    pad: str = ""


@cache
def recorder() -> redis.Redis:
    """A client of the server where the handlers record (not the one that fills up)."""
    return redis.Redis.from_url(os.environ["EVENTBUS_TEST_RECORD_URL"])


def record_key(name: str, namespace: str | None = None) -> str:
    ns = namespace or os.environ.get("EVENTBUS_REDIS_NAMESPACE", "eventbus")
    return f"{ns}:test:{name}"


@on_event(Filler)
def first(event: Filler) -> None:
    recorder().sadd(record_key("first"), event.n)


@on_event(Filler, queue=OTHER_QUEUE)
def second(event: Filler) -> None:
    recorder().sadd(record_key("second"), event.n)
