"""Reference run: fastapi-eventbus 0.1.1 (PyPI) with its in-memory sync backend.

Runs under the seed venv's python (bench/.venvs/seed). Usage: _ref_seed.py N
Prints one JSON line: {"publish": seconds, "e2e": seconds}.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from fastapi_eventbus import BaseEvent, EventBus

TOPIC = "bench"
HANG_GUARD_S = 300.0  # only to avoid hanging forever if something is broken


class Ev(BaseEvent):
    topic: str = TOPIC
    i: int


async def run(n: int) -> dict[str, float]:
    handled = 0

    async def handler(event: BaseEvent) -> None:
        nonlocal handled
        handled += 1

    bus = EventBus()
    await bus.registry.register(TOPIC, handler)
    await bus.start()  # subscribes registered topics and starts the listener task

    t0 = time.perf_counter()
    for i in range(n):
        await bus.publish(Ev(i=i))
    t1 = time.perf_counter()
    # The listener task polls the queue (10 ms sleep when idle): yield until done.
    while handled < n:
        if time.perf_counter() - t0 > HANG_GUARD_S:
            raise RuntimeError(f"only {handled}/{n} events handled")
        await asyncio.sleep(0)
    t2 = time.perf_counter()

    await bus.stop()
    return {"publish": t1 - t0, "e2e": t2 - t0}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(run(int(sys.argv[1])))))
