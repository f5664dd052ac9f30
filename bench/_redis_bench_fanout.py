"""Five no-op handlers of one topic, for bench/redis_bench.py's "publish with 5
handlers" row (each handler gets its own message, so one publish enqueues five)."""

from __future__ import annotations

from eventbus import BaseEvent, on_event

FANOUT = "bench.fanout"
HANDLERS = 5


class Fanout(BaseEvent):
    topic: str = FANOUT
    i: int


@on_event(Fanout, name="bench.fanout.1")
def fanout_1(event: Fanout) -> None:
    pass


@on_event(Fanout, name="bench.fanout.2")
def fanout_2(event: Fanout) -> None:
    pass


@on_event(Fanout, name="bench.fanout.3")
def fanout_3(event: Fanout) -> None:
    pass


@on_event(Fanout, name="bench.fanout.4")
def fanout_4(event: Fanout) -> None:
    pass


@on_event(Fanout, name="bench.fanout.5")
def fanout_5(event: Fanout) -> None:
    pass
