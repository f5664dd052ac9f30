"""Run: this project's eventbus with its default embedded backend.

Usage: _run_eventbus.py N {publish,publish_many}   (with the repo root on PYTHONPATH)
Prints one JSON line: {"publish": seconds, "e2e": seconds},
or {"unavailable": reason} when `eventbus` cannot be imported.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

try:
    from eventbus import BaseEvent, EventBus
except ImportError as exc:  # the library may not exist yet
    print(json.dumps({"unavailable": f"{type(exc).__name__}: {exc}"}))
    sys.exit(0)

TOPIC = "bench"
DRAIN_TIMEOUT_S = 120.0


class Ev(BaseEvent):
    topic: str = TOPIC
    i: int


async def run(n: int, mode: str) -> dict[str, float]:
    handled = 0

    async def handler(event: BaseEvent) -> None:
        nonlocal handled
        handled += 1

    bus = EventBus()
    await bus.registry.register(TOPIC, handler)
    await bus.start()
    await bus.subscribe(TOPIC)

    t0 = time.perf_counter()
    if mode == "publish_many":
        await bus.publish_many([Ev(i=i) for i in range(n)])
    else:
        for i in range(n):
            await bus.publish(Ev(i=i))
    t1 = time.perf_counter()
    await bus.drain(timeout=DRAIN_TIMEOUT_S)
    t2 = time.perf_counter()

    await bus.stop()
    if handled != n:
        raise RuntimeError(f"handled {handled} events, expected {n}")
    return {"publish": t1 - t0, "e2e": t2 - t0}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(run(int(sys.argv[1]), sys.argv[2]))))
