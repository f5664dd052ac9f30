"""Raw dramatiq actor of bench/production_bench.py: ``dramatiq bench._production_actors``.

dramatiq's default RedisBroker setup (that of bench/_dramatiq_bench_actors.py, whose
queue it shares); a no-op actor that counts what it handled through :mod:`bench._production_common`.
"""

from __future__ import annotations

import os

import dramatiq

from bench._dramatiq_bench_actors import QUEUE
from bench._production_common import Progress

progress = Progress(os.environ["BENCH_REDIS_URL"])


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def prod(i: int, sent: float) -> None:
    progress.hit(sent)
