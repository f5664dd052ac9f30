"""FastStream reference of bench/redis_bench.py: one subscriber process.

Runs under bench/.venvs/faststream's python (FastStream 0.7, Redis list); it does
not import eventbus.  Usage::

    _faststream_subscriber.py URL count N   # no-op handler of "bench-list"
    _faststream_subscriber.py URL latency   # handler of "bench-latency"
    _faststream_subscriber.py URL prod-list     # bench/production_bench.py: "bench-prod"
    _faststream_subscriber.py URL prod-stream   # its stream, group "bench-prod", acked

``count``: when the N-th message has been handled, writes the wall clock to
:data:`DONE_KEY` (no Redis command per message).  ``latency``: pushes handler
start minus the publisher's ``sent`` stamp (seconds) to :data:`LATENCY_KEY`.
``prod-*``: counts through ``_production_common.Progress``; several such processes
share the list, or the stream's consumer group (one consumer each, XACK after the
handler returned: FastStream's default ``AckPolicy.REJECT_ON_ERROR``).
Writes :data:`READY_KEY` once the subscriber consumes.  Stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from datetime import datetime

import redis.asyncio as aioredis
from faststream import FastStream
from faststream.redis import RedisBroker, StreamSub
from pydantic import BaseModel

LIST = "bench-list"
LATENCY_LIST = "bench-latency"
READY_KEY = "bench:faststream:ready"
DONE_KEY = "bench:faststream:done"
LATENCY_KEY = "bench:latency:faststream"
PROD_LIST = "bench-prod"
PROD_STREAM = "bench-prod-stream"
PROD_GROUP = "bench-prod"


class Noop(BaseModel):
    """The payload validated like eventbus validates its ``Noop`` event."""

    event_id: str
    topic: str
    timestamp: datetime
    metadata: dict[str, str]
    i: int


class Timed(BaseModel):
    event_id: str
    topic: str
    timestamp: datetime
    metadata: dict[str, str]
    sent: float


class Prod(BaseModel):
    event_id: str
    topic: str
    timestamp: datetime
    metadata: dict[str, str]
    i: int
    sent: float


def build(url: str, mode: str, expect: int) -> FastStream:
    # Per-message access logs ("Received", "Processed") at DEBUG, below the logger's
    # INFO level: eventbus and dramatiq workers log nothing per message either.
    broker = RedisBroker(url, log_level=logging.DEBUG)
    app = FastStream(broker)
    client = aioredis.Redis.from_url(url)
    handled = 0

    if mode == "count":

        @broker.subscriber(list=LIST)
        async def noop(event: Noop) -> None:
            nonlocal handled
            handled += 1
            if handled == expect:
                await client.set(DONE_KEY, time.time())

    elif mode == "latency":

        @broker.subscriber(list=LATENCY_LIST)
        async def latency(event: Timed) -> None:
            lag = time.time() - event.sent
            await client.rpush(LATENCY_KEY, lag)

    elif mode in ("prod-list", "prod-stream"):
        from _production_common import Progress  # beside this script

        progress = Progress(url)
        where: dict[str, object] = (
            {"list": PROD_LIST}
            if mode == "prod-list"
            else {"stream": StreamSub(PROD_STREAM, group=PROD_GROUP, consumer=f"c-{os.getpid()}")}
        )

        @broker.subscriber(**where)  # type: ignore[call-overload]
        async def prod(event: Prod) -> None:
            progress.hit(event.sent)

    else:
        raise SystemExit(f"unknown mode {mode!r}")

    @app.after_startup
    async def ready() -> None:
        await client.set(READY_KEY, 1)

    return app


if __name__ == "__main__":
    expect = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    asyncio.run(build(sys.argv[1], sys.argv[2], expect).run(log_level=logging.WARNING))
