"""Raw dramatiq reference actors of bench/redis_bench.py (default RedisBroker setup)."""

from __future__ import annotations

import os
import time
from functools import cache

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import default_middleware

QUEUE = "bench"
#: Redis list where the latency actor records handler-start minus send time (s).
LATENCY_KEY = "bench:latency:dramatiq"

# dramatiq's defaults, minus Prometheus (it would open an HTTP port in each worker).
broker = RedisBroker(
    url=os.environ["BENCH_REDIS_URL"],
    middleware=[m() for m in default_middleware if m.__name__ != "Prometheus"],
)
dramatiq.set_broker(broker)


@cache
def client() -> redis.Redis:
    return redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def noop(i: int) -> None:
    pass


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def latency(sent: float) -> None:
    client().rpush(LATENCY_KEY, time.time() - sent)
