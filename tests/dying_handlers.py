"""A handler whose failure kills the dramatiq worker thread that ran it, once
(``EVENTBUS_REDIS_WORKER=threads``), and one that stops the event loop of a loop
worker (``EVENTBUS_REDIS_WORKER=loop``), once.

Dramatiq logs a failed message from inside its worker thread's ``except`` block;
an exception escaping that log call ends the thread (as a RecursionError from a
deeply nested message's repr once did).  A logging filter stands in for it here:
it raises SystemExit from the log call of the first failure.

    dramatiq eventbus.actors tests.dying_handlers
"""

from __future__ import annotations

import asyncio
import logging
import sys

from eventbus import BaseEvent, on_event
from tests.redis_keys import client, key

#: Topic of :class:`Doom` events.
DOOM = "redis.test.doom"


#: Topic of :class:`Halt` events.
HALT = "redis.test.halt"


class Doom(BaseEvent):
    topic: str = DOOM


class Halt(BaseEvent):
    topic: str = HALT


@on_event(Doom, max_retries=0)
def doom(event: Doom) -> None:
    runs = client().incr(key(f"doom:{event.event_id}"))
    if runs == 1:
        raise RuntimeError("the first attempt fails, and its failure log kills the thread")
    client().set(key(f"doomed-ok:{event.event_id}"), runs)


@on_event(Halt, max_retries=0)
async def halt(event: Halt) -> None:
    runs = client().incr(key(f"halt:{event.event_id}"))
    if runs == 1:
        client().set(key("loop-stopped"), 1)
        asyncio.get_running_loop().stop()  # a bug that ends the loop under the handler
        await asyncio.sleep(3600)
    client().set(key(f"halted-ok:{event.event_id}"), runs)


class _KillTheThread(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Failed to process message") and not client().getset(
            key("thread-killed"), 1
        ):
            raise SystemExit("worker thread killed by the test")
        return True


if "dramatiq.cli" in sys.modules:  # in a `dramatiq` worker process only: imported into
    # pytest's own process it would kill every later in-process worker's threads
    logging.getLogger("dramatiq.worker.WorkerThread").addFilter(_KillTheThread())
