"""Handlers of bench/delay_concurrency_bench.py, run by ``dramatiq eventbus.actors``.

Each topic has one sync handler that sleeps ``Work.ms`` milliseconds: without a
limit, with ``concurrency=8`` (as many as the worker's threads: the limit never
binds, only its round trips cost) and with ``concurrency=2`` (it binds).
"""

from __future__ import annotations

import time

from eventbus import BaseEvent, on_event

#: Topic of the delayed-publish rows (a handler that does nothing).
NOOP = "bench.delay.noop"
#: Topics of the end-to-end rows, by the handler's limit (None: no limit).
LIMITED = {None: "bench.limit.none", 8: "bench.limit.8", 2: "bench.limit.2"}


class Noop(BaseEvent):
    topic: str = NOOP
    i: int


class Work(BaseEvent):
    i: int
    #: Milliseconds the handler sleeps.
    ms: float = 0.0


@on_event(NOOP)
def noop(event: BaseEvent) -> None:
    pass


def _work(event: BaseEvent) -> None:
    ms = float(getattr(event, "ms", 0.0) or 0.0)
    if ms:
        time.sleep(ms / 1000)


on_event(LIMITED[None], name="bench.limit.none")(_work)
on_event(LIMITED[8], name="bench.limit.8", concurrency=8)(_work)
on_event(LIMITED[2], name="bench.limit.2", concurrency=2)(_work)
