"""Reference run: raw dramatiq StubBroker + in-process Worker (8 threads).

Usage: _ref_dramatiq.py N
Prints one JSON line: {"publish": seconds, "e2e": seconds}.
"""

from __future__ import annotations

import json
import sys
import time

import dramatiq
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import default_middleware

QUEUE = "bench"
JOIN_TIMEOUT_MS = 300_000  # only to avoid hanging forever if something is broken


def noop(i: int) -> None:
    pass


def run(n: int) -> dict[str, float]:
    middleware = [m() for m in default_middleware if m.__name__ != "Prometheus"]
    broker = StubBroker(middleware=middleware)
    dramatiq.set_broker(broker)
    actor = dramatiq.actor(queue_name=QUEUE, broker=broker)(noop)
    worker = dramatiq.Worker(broker, worker_threads=8)
    worker.start()

    t0 = time.perf_counter()
    for i in range(n):
        actor.send(i)
    t1 = time.perf_counter()
    broker.join(QUEUE, timeout=JOIN_TIMEOUT_MS)
    t2 = time.perf_counter()

    worker.stop()
    broker.close()
    return {"publish": t1 - t0, "e2e": t2 - t0}


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]))))
