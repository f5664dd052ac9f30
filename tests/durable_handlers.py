"""Handlers of the durable-acknowledgement tests and the outage scenario, run by
worker processes (``dramatiq eventbus.actors tests.durable_handlers``); the test
process imports it for the event classes.

Every invocation of :func:`flaky` appends to files of its own process in
``$DURABLE_LEDGER`` (unbuffered ``O_APPEND`` writes, outside the broker):
``<pid>.log`` gets ``s <n>`` when it starts and ``d <n>`` when it succeeds (the
format :class:`tests.reliability.support.Ledger` reads), ``<pid>.fail`` gets
``f <n>`` for each failed attempt.

An event fails its first ``fails`` attempts (every attempt when ``fails`` is
negative), counted across processes by marker files created with ``O_EXCL`` in
``$DURABLE_MARKS``: whichever worker runs an attempt, the count is exact.  With
``gate``, an attempt waits until the file ``$DURABLE_GATE`` exists before it
fails or succeeds (the tests take the broker down first).
"""

from __future__ import annotations

import os
import time
from functools import cache

from eventbus import BaseEvent, RetryPolicy, on_event

#: The topics of the two event classes.
FLAKY_TOPIC = "durable.flaky"
BROKEN_TOPIC = "durable.broken-policy"
#: Seconds a gated attempt waits for the gate at most.
GATE_TIMEOUT = 60.0
#: Seconds between two looks at the gate.
GATE_POLL = 0.01


class Flaky(BaseEvent):
    """The ``n``-th event of a run; its first ``fails`` attempts raise."""

    __event_type__ = "tests.durable.Flaky"

    topic: str = FLAKY_TOPIC
    n: int
    fails: int = 0
    gate: bool = False
    #: Seconds each attempt takes before it fails or succeeds.
    delay: float = 0.0


class FlakyError(RuntimeError):
    """What a failing attempt of :func:`flaky` raises."""


class Broken(BaseEvent):
    """An event whose handler fails under a retry policy that raises."""

    __event_type__ = "tests.durable.Broken"

    topic: str = BROKEN_TOPIC
    n: int = 0


class BrokenBackoff(RetryPolicy):
    """A retry policy whose backoff computation raises (a bug in user code)."""

    def get_delay(self, attempt: int) -> float:
        raise OverflowError("backoff computation failed")


@cache
def _fd(suffix: str) -> int | None:
    directory = os.environ.get("DURABLE_LEDGER")
    if not directory:
        return None
    path = os.path.join(directory, f"{os.getpid()}.{suffix}")
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def _write(suffix: str, line: str) -> None:
    fd = _fd(suffix)
    if fd is not None:
        os.write(fd, line.encode())


def _claim_failure(n: int, fails: int) -> bool:
    """Whether this attempt of event ``n`` is one of its first ``fails``."""
    if fails < 0:
        return True
    marks = os.environ.get("DURABLE_MARKS")
    if not marks or not fails:
        return False
    for k in range(fails):
        try:
            os.close(os.open(os.path.join(marks, f"{n}.{k}"), os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            continue
        return True
    return False


def _wait_for_gate() -> None:
    gate = os.environ.get("DURABLE_GATE")
    if not gate:
        return
    deadline = time.monotonic() + GATE_TIMEOUT
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(GATE_POLL)


@on_event(Flaky, name="durable.flaky")
def flaky(event: Flaky) -> None:
    _write("log", f"s {event.n}\n")
    if event.gate:
        _wait_for_gate()
    if event.delay:
        time.sleep(event.delay)
    if _claim_failure(event.n, event.fails):
        _write("fail", f"f {event.n}\n")
        raise FlakyError(f"attempt of event {event.n} failed on purpose")
    _write("log", f"d {event.n}\n")


@on_event(Broken, name="durable.broken", retry=BrokenBackoff(max_retries=3, delay=0.01))
def broken(event: Broken) -> None:
    raise FlakyError(f"event {event.n} always fails")
