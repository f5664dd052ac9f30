"""FastStream reference of bench/redis_bench.py: the publishing side.

Runs under bench/.venvs/faststream's python (FastStream 0.7, Redis list); it does
not import eventbus.  Usage::

    _faststream_publisher.py URL publish N      # await broker.publish(...) one by one
    _faststream_publisher.py URL concurrent N   # the same from 64 concurrent tasks
    _faststream_publisher.py URL paced RATE SECONDS   # stamped payloads at RATE/s
    _faststream_publisher.py URL prod list|stream   # bench/production_bench.py

Prints one JSON line: ``{"seconds": s, "started": wall clock of the first publish}``
(``prod``: driven over stdin, see ``_production_common.serve``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from faststream.redis import RedisBroker

LIST = "bench-list"
LATENCY_LIST = "bench-latency"
#: The list and the stream of bench/production_bench.py.
PROD_LIST = "bench-prod"
PROD_STREAM = "bench-prod-stream"
#: Concurrent callers of the ``concurrent`` mode.
CALLERS = 64


def event(topic: str, **fields: Any) -> dict[str, Any]:
    """A payload shaped like an eventbus event's JSON (``BaseEvent.model_dump``)."""
    return {
        "event_id": uuid.uuid4().hex,
        "topic": topic,
        "timestamp": datetime.now(UTC).isoformat(),
        "metadata": {},
        **fields,
    }


async def run(url: str, mode: str, args: list[str]) -> dict[str, float]:
    # Access logs one level down, as in the subscriber (publish logs nothing anyway).
    broker = RedisBroker(url, log_level=logging.DEBUG)
    await broker.connect()
    try:
        if mode == "prod":  # ``prod list|stream``
            from _production_common import serve  # beside this script

            where = {"list": PROD_LIST} if args[0] == "list" else {"stream": PROD_STREAM}

            async def send(i: int, sent: float) -> None:
                await broker.publish(event("prod.event", i=i, sent=sent), **where)

            await serve(send)
            return {}
        if mode == "paced":
            rate, seconds = float(args[0]), float(args[1])
            interval = 1 / rate
            started = time.time()
            start = time.perf_counter()
            for i in range(int(rate * seconds)):
                delay = start + i * interval - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                await broker.publish(event("bench.latency", sent=time.time()), list=LATENCY_LIST)
            return {"seconds": time.perf_counter() - start, "started": started}

        n = int(args[0])
        payloads = [event("bench.noop", i=i) for i in range(n)]  # built before the clock
        if mode == "publish":
            started = time.time()
            start = time.perf_counter()
            for payload in payloads:
                await broker.publish(payload, list=LIST)
        elif mode == "concurrent":

            async def caller(share: list[dict[str, Any]]) -> None:
                for payload in share:
                    await broker.publish(payload, list=LIST)

            shares = [payloads[k::CALLERS] for k in range(CALLERS)]
            started = time.time()
            start = time.perf_counter()
            await asyncio.gather(*(caller(share) for share in shares))
        else:
            raise SystemExit(f"unknown mode {mode!r}")
        return {"seconds": time.perf_counter() - start, "started": started}
    finally:
        await broker.stop()


if __name__ == "__main__":
    result = asyncio.run(run(sys.argv[1], sys.argv[2], sys.argv[3:]))
    if result:  # "prod" printed its own
        print(json.dumps(result))
