"""Handler time limits on the in-process dispatcher (embedded backend, Kafka bridge).

A time limit counts from the moment a handler starts, never from when its event
waited for a free thread; handler code cannot swallow the interrupt with
``except Exception`` (as on a dramatiq worker, where it is ``TimeLimitExceeded``);
and an attempt that was given up never starts, nor runs on, afterwards.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from eventbus import BaseEvent, EventBus, EventBusSettings, HandlerTimeout

MakeBus = Callable[..., EventBus]


class Ping(BaseEvent):
    n: int = 0


def spin(seconds: float) -> None:
    """Busy Python code: an interrupt lands within microseconds."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass


def handler_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("eventbus-handler")}


async def wait_for(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll ``condition`` on the event loop until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.005)


async def test_time_limit_counts_from_the_handler_start_not_the_wait_for_a_thread(
    make_bus: MakeBus, topic: str
) -> None:
    handled: list[int] = []

    def slow(event: Ping) -> None:
        time.sleep(0.3)
        handled.append(event.n)

    bus = make_bus(settings=EventBusSettings(worker_threads=1, shutdown_timeout=2))
    await bus.registry.register(topic, slow, time_limit=0.5, max_retries=0)
    await bus.start()
    await bus.publish_many([Ping(topic=topic, n=i) for i in range(10)])
    await bus.drain(timeout=10)

    assert handled == list(range(10))  # one thread: 3 s in all, each within its 0.5 s
    assert bus.dlq.peek(20) == []


async def test_sync_attempts_given_up_at_stop_never_run_afterwards(
    make_bus: MakeBus, topic: str
) -> None:
    before = handler_threads()
    started, release = threading.Event(), threading.Event()
    effects: list[str] = []

    def blocker(event: Ping) -> None:
        started.set()
        while not release.is_set():
            time.sleep(0.01)
        effects.append("blocker ran on")

    def queued(event: Ping) -> None:
        effects.append("queued job started")

    bus = make_bus(settings=EventBusSettings(worker_threads=1, shutdown_timeout=0.3))
    await bus.registry.register(topic, blocker, max_retries=0)
    await bus.registry.register(topic + ".queued", queued, time_limit=0.1, max_retries=0)
    await bus.start()
    await bus.publish(Ping(topic=topic))
    assert await asyncio.to_thread(started.wait, 2)
    await bus.publish(Ping(topic=topic + ".queued"))  # waits for the only thread
    # The scenario: the queued handler waits past its 0.1 s time limit (which counts
    # from its start, so it is not dead-lettered as timed out meanwhile).
    await asyncio.sleep(0.2)
    await bus.stop()
    release.set()  # the pool's thread would be free for the queued job now
    # Once every handler thread has ended, nothing is left that could run the queued
    # job or the rest of the blocker: what they did by then is all they ever do.
    await wait_for(lambda: handler_threads() - before == set(), "the handler threads to end")

    assert effects == []
    reasons = sorted((f.handler.rsplit(".", 1)[-1], f.error_type) for f in bus.dlq.peek(10))
    assert reasons == [("blocker", "ShutdownError"), ("queued", "ShutdownError")]


async def test_sync_handler_cannot_swallow_its_time_limit(
    make_bus: MakeBus, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    effects: list[str] = []
    exited = threading.Event()

    def stubborn(event: Ping) -> None:
        try:
            try:
                time.sleep(1.5)  # a system call: the interrupt lands when it returns
            except Exception:
                effects.append("swallowed")
            effects.append("after")
        finally:
            exited.set()

    bus = make_bus()
    await bus.registry.register(topic, stubborn, time_limit=0.2, max_retries=0)
    await bus.start()
    with caplog.at_level("WARNING", logger="eventbus.dispatch"):
        await bus.publish(Ping(topic=topic))
        await bus.drain(timeout=5)

    assert exited.is_set()  # the dead letter is written once the handler stopped
    assert effects == []
    [failed] = bus.dlq.peek()
    assert failed.error_type == "HandlerTimeout"
    assert failed.error == f"handler {failed.handler} exceeded its 0.2s time limit"
    assert "time.sleep(1.5)" in failed.traceback  # where the handler was stopped
    assert any("still running" in r.getMessage() for r in caplog.records)


async def test_async_handler_cannot_swallow_its_time_limit(make_bus: MakeBus, topic: str) -> None:
    effects: list[str] = []

    async def stubborn(event: Ping) -> None:
        try:
            await asyncio.sleep(5)
        except Exception:
            effects.append("swallowed")
        effects.append("after")

    bus = make_bus()
    await bus.registry.register(topic, stubborn, time_limit=0.2, max_retries=0)
    await bus.start()
    started = time.monotonic()
    await bus.publish(Ping(topic=topic))
    await bus.drain(timeout=5)

    assert time.monotonic() - started < 2
    assert effects == []
    [failed] = bus.dlq.peek()
    assert failed.error_type == "HandlerTimeout"
    assert "await asyncio.sleep(5)" in failed.traceback


async def test_async_time_limit_fails_the_attempt(make_bus: MakeBus, topic: str) -> None:
    async def slow(event: BaseEvent) -> None:
        await asyncio.sleep(10)

    bus = make_bus()
    await bus.registry.register(topic, slow, time_limit=0.05, max_retries=1)
    await bus.start()
    await bus.publish(Ping(topic=topic))
    await bus.drain(timeout=5)

    [failed] = bus.dlq.peek()
    assert failed.error_type == HandlerTimeout.__name__
    assert failed.attempts == 2
    assert "0.05s time limit" in failed.error


async def test_timed_out_sync_attempt_is_retried_per_policy(make_bus: MakeBus, topic: str) -> None:
    attempts: list[float] = []
    left: list[float] = []
    finished = threading.Event()

    def busy(event: Ping) -> None:
        attempts.append(time.monotonic())
        try:
            spin(5)
            finished.set()
        finally:
            left.append(time.monotonic())  # when the attempt's code stopped running

    bus = make_bus()
    await bus.registry.register(topic, busy, time_limit=0.1, max_retries=1)
    await bus.start()
    started = time.monotonic()
    await bus.publish(Ping(topic=topic))
    await bus.drain(timeout=5)

    assert time.monotonic() - started < 2
    assert len(attempts) == 2  # the first attempt, then one retry
    [failed] = bus.dlq.peek()
    assert (failed.error_type, failed.attempts) == ("HandlerTimeout", 2)
    # Each busy loop was interrupted, not left running: both attempts left the
    # handler long before their 5 s loops could end, without finishing them.
    await wait_for(lambda: len(left) == 2, "both attempts to leave the handler")
    assert not finished.is_set()
    assert all(end - start < 2 for start, end in zip(attempts, left, strict=True))
