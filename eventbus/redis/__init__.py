"""The Redis backend (``pip install "fastapi-eventbus[redis]"``): subscriptions stored
in Redis, a fan-out script, ``dramatiq eventbus.actors`` workers with reliable
fetch, ack and recovery, and the Redis dead-letter store.

    from eventbus.redis import RedisBackend
"""

from __future__ import annotations

from eventbus.redis.backend import RedisBackend

__all__ = ["RedisBackend"]
