"""Run: this project's eventbus with its default embedded backend.

Usage: _run_eventbus.py N MODE   (with the repo root on PYTHONPATH)

MODE: publish, publish_many, or like publish with a handler taking two
dependencies (FastAPI's ``Depends``), resolved for every event:
publish_di (an async function and an async ``yield`` dependency, cleaned up after
every event) or publish_di_async (two async functions).

Prints one JSON line: {"publish": seconds, "e2e": seconds, "cpu": seconds}
(cpu: the process's CPU time from the first publish to the end of the drain, all
threads, which a busy machine disturbs less than wall time),
or {"unavailable": reason} when `eventbus` cannot be imported.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from typing import Annotated

try:
    from fastapi import Depends

    from eventbus import BaseEvent, EventBus
except ImportError as exc:  # the library may not exist yet
    print(json.dumps({"unavailable": f"{type(exc).__name__}: {exc}"}))
    sys.exit(0)

TOPIC = "bench"
DRAIN_TIMEOUT_S = 120.0


class Ev(BaseEvent):
    topic: str = TOPIC
    i: int


class Settings:
    prefix = "bench"


async def get_settings() -> Settings:
    return Settings()


async def get_session() -> AsyncIterator[str]:
    session = "session"
    try:
        yield session
    finally:
        del session


handled = 0


async def handler(event: BaseEvent) -> None:
    global handled
    handled += 1


async def get_user() -> str:
    return "user"


async def handler_di(
    event: BaseEvent,
    settings: Annotated[Settings, Depends(get_settings)],
    session: Annotated[str, Depends(get_session)],
) -> None:
    global handled
    handled += 1


async def handler_di_async(
    event: BaseEvent,
    settings: Annotated[Settings, Depends(get_settings)],
    user: Annotated[str, Depends(get_user)],
) -> None:
    global handled
    handled += 1


HANDLERS = {"publish_di": handler_di, "publish_di_async": handler_di_async}


async def run(n: int, mode: str) -> dict[str, float]:
    bus = EventBus()
    await bus.registry.register(TOPIC, HANDLERS.get(mode, handler))
    await bus.start()
    await bus.subscribe(TOPIC)

    c0 = time.process_time()
    t0 = time.perf_counter()
    if mode == "publish_many":
        await bus.publish_many([Ev(i=i) for i in range(n)])
    else:
        for i in range(n):
            await bus.publish(Ev(i=i))
    t1 = time.perf_counter()
    await bus.drain(timeout=DRAIN_TIMEOUT_S)
    t2 = time.perf_counter()
    c2 = time.process_time()

    await bus.stop()
    if handled != n:
        raise RuntimeError(f"handled {handled} events, expected {n}")
    return {"publish": t1 - t0, "e2e": t2 - t0, "cpu": c2 - c0}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(run(int(sys.argv[1]), sys.argv[2]))))
