"""The loop Redis worker (``EVENTBUS_REDIS_WORKER=loop``, eventbus.redis.worker):
handlers on one event loop fed by the consumer, in real ``dramatiq eventbus.actors``
processes.  Delivery, recovery and retries are covered by the other Redis tests
(the default ``threads`` worker) and, for the seams the loop changes (a failure while
Redis is down), in both kinds by tests/test_durable_ack.py; here what the loop
changes: where handlers run, time limits, ``--queues``, shutdown, concurrency
limits and lost events under SIGKILL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
import redis

from eventbus import EventBus
from tests import loop_handlers as lh
from tests.redis_keys import key

pytest.register_assert_rewrite("tests.redis_support")  # before it is imported below
from tests.redis_support import Workers, queue_name, unfinished  # noqa: E402

# The fixtures: redis_url, namespace, make_redis_bus, workers.
pytest_plugins = ["tests.redis_support"]

pytestmark = pytest.mark.timeout(90)

MODULES = ("tests.loop_handlers",)
LOOP = {"EVENTBUS_REDIS_WORKER": "loop"}


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("mode", ["loop", "threads"])
async def test_where_handlers_run_in_each_worker_kind(
    make_redis_bus: Callable[..., EventBus],
    namespace: str,
    redis_url: str,
    workers: Workers,
    mode: str,
) -> None:
    workers.start(MODULES, env={"EVENTBUS_REDIS_WORKER": mode})
    bus = make_redis_bus()
    await bus.start()
    event = lh.Where()
    await bus.publish(event)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    async_key = key(f"async-thread:{event.event_id}", namespace)
    sync_key = key(f"sync-thread:{event.event_id}", namespace)
    await wait_for(lambda: r.exists(async_key, sync_key) == 2, 10, "both handlers")
    async_thread, sync_thread = r.get(async_key), r.get(sync_key)
    if mode == "loop":
        # Async handlers on the loop the consumer feeds; sync ones in its pool.
        assert async_thread == "eventbus-redis-loop"
        assert sync_thread is not None and sync_thread.startswith("eventbus-handler")
    else:
        # dramatiq's worker threads (async ones through its AsyncIO event-loop thread).
        assert async_thread != "eventbus-redis-loop"
        assert sync_thread is not None and not sync_thread.startswith("eventbus-handler")


async def test_a_time_limit_on_the_loop_worker_dead_letters_and_the_loop_goes_on(
    make_redis_bus: Callable[..., EventBus], namespace: str, redis_url: str, workers: Workers
) -> None:
    workers.start(MODULES, env=LOOP)
    bus = make_redis_bus()
    await bus.start()
    slow = lh.TooSlow()
    await bus.publish(slow)
    await wait_for(lambda: bus.dlq.size() == 1, 10, "the timed-out attempt's dead letter")
    [record] = bus.dlq.peek(topic=lh.TooSlow().topic)
    assert record.error_type == "HandlerTimeout", record
    assert "0.3s time limit" in record.error
    # The loop was not blocked or killed by the interrupt: the next event runs.
    event = lh.Where()
    await bus.publish(event)
    r = redis.Redis.from_url(redis_url)
    await wait_for(
        lambda: r.exists(key(f"async-thread:{event.event_id}", namespace)) == 1,
        10,
        "the next event",
    )


async def test_the_queues_option_limits_what_the_loop_worker_consumes(
    make_redis_bus: Callable[..., EventBus], namespace: str, redis_url: str, workers: Workers
) -> None:
    other = queue_name(lh.OTHER_QUEUE)
    workers.start(MODULES, env=LOOP, args=("--queues", other))
    bus = make_redis_bus()
    await bus.start()
    event = lh.Elsewhere()
    await bus.publish(event)
    r = redis.Redis.from_url(redis_url)
    await wait_for(
        lambda: r.exists(key(f"elsewhere:{event.event_id}", namespace)) == 1,
        10,
        "the handler of the named queue",
    )
    await asyncio.sleep(0.5)
    assert r.exists(key(f"default:{event.event_id}", namespace)) == 0
    assert unfinished(r, namespace) == 1  # the default queue's copy waits for its worker
    workers.start(MODULES, env=LOOP)
    await wait_for(
        lambda: r.exists(key(f"default:{event.event_id}", namespace)) == 1,
        10,
        "the default queue's handler, on a worker consuming it",
    )


async def test_sigterm_lets_in_flight_handlers_finish_and_acknowledges_them(
    make_redis_bus: Callable[..., EventBus], namespace: str, redis_url: str, workers: Workers
) -> None:
    worker = workers.start(MODULES, env=LOOP)
    bus = make_redis_bus()
    await bus.start()
    event = lh.Lingering(seconds=1.0)
    await bus.publish(event)
    r = redis.Redis.from_url(redis_url)
    started = key(f"lingering-started:{event.event_id}", namespace)
    await wait_for(lambda: r.exists(started) == 1, 10, "the handler to start")
    assert worker.stop() == 0  # SIGTERM: graceful
    assert int(r.get(key(f"lingering-done:{event.event_id}", namespace)) or 0) == 1
    # Finished and acknowledged before the process left: nothing waits, and a new
    # worker does not run it again.
    assert unfinished(r, namespace) == 0
    workers.start(MODULES, env=LOOP)
    await asyncio.sleep(1.0)
    assert int(r.get(started) or 0) == 1
