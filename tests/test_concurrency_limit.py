"""Per-handler concurrency limits (``@on_event(..., concurrency=N)``).

Redis: at most N runs at once across every worker process of the service, with
real ``dramatiq eventbus.actors`` processes; an event that finds no free slot
waits without using a retry.  Embedded: at most N at once in the process.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest
import redis

from eventbus import BaseEvent, ConfigurationError, EventBus, on_event
from eventbus.metrics import InMemoryMetricsCollector
from eventbus.registry import make_spec
from tests.delay_handlers import LIMIT, Limited
from tests.kafka_helpers import create_topic
from tests.redis_keys import key

pytest.register_assert_rewrite("tests.redis_support")  # before it is imported below
from tests.redis_support import Workers, wait_settled  # noqa: E402

pytest_plugins = ["tests.redis_support", "tests.kafka_support"]

HANDLERS = ("tests.delay_handlers",)
#: Seconds the limited events may take to drain (2 at a time, 50 ms each).
SETTLE_TIMEOUT = 60.0


def read(redis_url: str, namespace: str) -> tuple[int, int, set[int]]:
    """The most runs seen at once, the runs, and the events done."""
    client = redis.Redis.from_url(redis_url)
    try:
        most = int(client.get(key("most", namespace)) or 0)
        runs = int(client.get(key("runs", namespace)) or 0)
        done = {int(n) for n in client.smembers(key("done", namespace))}
    finally:
        client.close()
    return most, runs, done


@pytest.mark.parametrize("mode", ["threads", "loop"])
async def test_redis_limit_holds_across_worker_processes(
    make_redis_bus: Callable[..., EventBus],
    redis_url: str,
    namespace: str,
    workers: Workers,
    mode: str,
) -> None:
    # Two processes of four threads each: eight events could run at once.  A loop
    # worker takes its slots off the loop (waiting there stalled the slots' holders).
    workers.start(HANDLERS, processes=2, threads=4, env={"EVENTBUS_REDIS_WORKER": mode})
    bus = make_redis_bus()
    bus.metrics = InMemoryMetricsCollector()
    await bus.start()
    count = 40
    await bus.publish_many([Limited(n=n) for n in range(count)])
    await asyncio.to_thread(wait_settled, redis_url, namespace, SETTLE_TIMEOUT)
    most, runs, done = read(redis_url, namespace)
    assert done == set(range(count))
    assert runs == count  # each ran once: a wait for a slot is not an attempt
    assert 1 <= most <= LIMIT
    assert await bus.dlq.asize() == 0  # nothing dead-lettered for the limit
    # Every slot was given back.
    client = redis.Redis.from_url(redis_url)
    try:
        slots = list(client.scan_iter(match=f"{namespace}:*:c:*"))
        assert all(client.zcard(s) == 0 for s in slots)
    finally:
        client.close()


async def test_redis_slots_of_a_killed_worker_are_freed(
    make_redis_bus: Callable[..., EventBus], redis_url: str, namespace: str, workers: Workers
) -> None:
    doomed = workers.start(HANDLERS, threads=4)
    bus = make_redis_bus()
    await bus.start()
    # Two long runs take both slots; the worker dies holding them.
    await bus.publish_many([Limited(n=n, seconds=30) for n in range(LIMIT)])
    client = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while int(client.get(key("running", namespace)) or 0) < LIMIT:
            assert time.monotonic() < deadline, "the long runs did not start"
            await asyncio.sleep(0.05)
        doomed.kill()
        # Its runs, redelivered to the next worker, end at once.  Without the
        # dead worker's slots freed, no run could start again.
        client.set(key("release", namespace), 1)
    finally:
        client.close()
    workers.start(HANDLERS, threads=4)
    await bus.publish_many([Limited(n=100 + n, seconds=0.01) for n in range(4)])

    def short_ones_done() -> bool:
        return set(range(100, 104)) <= read(redis_url, namespace)[2]

    deadline = time.monotonic() + SETTLE_TIMEOUT
    while not await asyncio.to_thread(short_ones_done):
        assert time.monotonic() < deadline, "the dead worker's slots were never freed"
        await asyncio.sleep(0.1)


async def test_embedded_limit_holds_for_async_and_sync_handlers(
    make_bus: Callable[..., EventBus], topic: str
) -> None:
    bus = make_bus()
    seen = {"async": 0, "async_most": 0, "sync": 0, "sync_most": 0}
    lock = threading.Lock()

    async def slow_async(event: BaseEvent) -> None:
        seen["async"] += 1
        seen["async_most"] = max(seen["async_most"], seen["async"])
        await asyncio.sleep(0.02)
        seen["async"] -= 1

    def slow_sync(event: BaseEvent) -> None:
        with lock:
            seen["sync"] += 1
            seen["sync_most"] = max(seen["sync_most"], seen["sync"])
        time.sleep(0.02)
        with lock:
            seen["sync"] -= 1

    await bus.registry.register(topic, slow_async, concurrency=2)
    await bus.registry.register(topic, slow_sync, concurrency=3)
    await bus.start()
    await bus.publish_many([BaseEvent(topic=topic) for _ in range(20)])
    await bus.drain(30)
    assert seen["async_most"] == 2  # reached, never passed
    assert seen["sync_most"] == 3
    assert bus.dlq.size() == 0


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_a_limit_that_cannot_work_is_refused(bad: object) -> None:
    async def handler(event: BaseEvent) -> None: ...

    with pytest.raises(ConfigurationError, match="concurrency must be a whole number >= 1"):
        make_spec("t.limits", handler, concurrency=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="concurrency"):
        on_event("t.limits", concurrency=bad)(handler)  # type: ignore[arg-type]


async def test_kafka_limit_holds_in_each_process(
    make_kafka_bus: Callable[..., EventBus], kafka_bootstrap: str, kafka_names: tuple[str, str]
) -> None:
    topic, _group = kafka_names
    await create_topic(kafka_bootstrap, topic, 3)
    seen = {"running": 0, "most": 0}

    async def call_partner(event: BaseEvent) -> None:
        seen["running"] += 1
        seen["most"] = max(seen["most"], seen["running"])
        await asyncio.sleep(0.02)
        seen["running"] -= 1

    bus = make_kafka_bus()
    await bus.registry.register(topic, call_partner, concurrency=2)
    await bus.start()
    # Keyed by event id: three partitions in flight at once, several records each.
    await bus.publish_many([BaseEvent(topic=topic) for _ in range(12)])
    await bus.drain(timeout=30)
    assert seen["most"] == 2  # reached, never passed
    assert bus.dlq.size() == 0
