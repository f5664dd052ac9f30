"""A handler whose failure kills the dramatiq worker thread that ran it, once.

Dramatiq logs a failed message from inside its worker thread's ``except`` block;
an exception escaping that log call ends the thread (as a RecursionError from a
deeply nested message's repr once did).  A logging filter stands in for it here:
it raises SystemExit from the log call of the first failure.

    dramatiq eventbus.actors tests.dying_handlers
"""

from __future__ import annotations

import logging
import sys

from eventbus import BaseEvent, on_event
from tests.redis_keys import client, key

#: Topic of :class:`Doom` events.
DOOM = "redis.test.doom"


class Doom(BaseEvent):
    topic: str = DOOM


@on_event(Doom, max_retries=0)
def doom(event: Doom) -> None:
    runs = client().incr(key(f"doom:{event.event_id}"))
    if runs == 1:
        raise RuntimeError("the first attempt fails, and its failure log kills the thread")
    client().set(key(f"doomed-ok:{event.event_id}"), runs)


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
