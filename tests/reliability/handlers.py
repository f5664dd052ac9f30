"""The handler that reliability workers run (``dramatiq eventbus.actors
tests.reliability.handlers``); the publishing test process imports it too, so
both sides route :class:`Tracked` events to the same actor.

Every invocation appends two lines to a ledger file of its own process
(``$RELIABILITY_LEDGER/<pid>.log``): ``s <n>`` when it starts and ``d <n>`` when
it is done.  Unbuffered ``O_APPEND`` writes: a SIGKILL loses no finished line,
and the ledger lives outside the broker, so a broker restart cannot touch it.
Without ``RELIABILITY_LEDGER`` (the test process itself) nothing is written.
"""

from __future__ import annotations

import os
import time
from functools import cache

from eventbus import BaseEvent, on_event

#: The topic of :class:`Tracked` events.
TOPIC = "reliability.tracked"


class Tracked(BaseEvent):
    """The ``n``-th event of a reliability run."""

    __event_type__ = "tests.reliability.Tracked"

    topic: str = TOPIC
    n: int
    #: Seconds the handler sleeps between its start and done lines.
    delay: float = 0.0


@cache
def _ledger() -> int | None:
    directory = os.environ.get("RELIABILITY_LEDGER")
    if not directory:
        return None
    path = os.path.join(directory, f"{os.getpid()}.log")
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def _write(line: str) -> None:
    fd = _ledger()
    if fd is not None:
        os.write(fd, line.encode())


@on_event(Tracked, name="reliability.record")
def record(event: Tracked) -> None:
    _write(f"s {event.n}\n")
    if event.delay:
        time.sleep(event.delay)
    _write(f"d {event.n}\n")
