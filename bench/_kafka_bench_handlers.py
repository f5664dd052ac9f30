"""Handler module of the Kafka benchmark's worker process.

Environment: ``BENCH_TOPIC`` (topic), ``BENCH_N`` (events expected), ``BENCH_OUT``
(file). When the N-th event is handled, the handler writes ``time.time()`` to
``BENCH_OUT``; with ``BENCH_LATENCY=1`` it also appends each event's
publish-to-handler latency in seconds, one per line, to ``BENCH_OUT.lat``.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime

from _kafka_bench_events import BenchEvent

from eventbus import on_event

TOPIC = os.environ["BENCH_TOPIC"]
N = int(os.environ["BENCH_N"])
OUT = os.environ["BENCH_OUT"]
LATENCY = os.environ.get("BENCH_LATENCY") == "1"

_count = 0
_latencies: list[float] = []


@on_event(TOPIC, name="bench.kafka.noop")
async def noop(event: BenchEvent) -> None:
    global _count
    _count += 1
    if LATENCY:
        _latencies.append((datetime.now(UTC) - event.timestamp).total_seconds())
    if _count == N:
        done = time.time()
        if LATENCY:
            _write(OUT + ".lat", "\n".join(f"{x:.6f}" for x in _latencies))
        _write(OUT, f"{done:.6f}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
