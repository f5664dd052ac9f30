"""Where handler modules run by test workers record what they did: the Redis server
and key namespace of ``EVENTBUS_REDIS_URL`` / ``EVENTBUS_REDIS_NAMESPACE``.

No handlers here, so importing it registers nothing.
"""

from __future__ import annotations

import os
from functools import cache

import redis


@cache
def client() -> redis.Redis:
    """A client of the test's Redis server (one per process)."""
    return redis.Redis.from_url(os.environ["EVENTBUS_REDIS_URL"])


def key(name: str, namespace: str | None = None) -> str:
    """The Redis key where handlers record ``name`` for a test namespace."""
    ns = namespace or os.environ.get("EVENTBUS_REDIS_NAMESPACE", "eventbus")
    return f"{ns}:test:{name}"
