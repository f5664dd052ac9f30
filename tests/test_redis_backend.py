"""The Redis backend against a real Redis server and real ``dramatiq eventbus.actors``
worker processes: fan-out, crash recovery, restarts, bad input, dead letters, health."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable

import pytest
import redis
from dramatiq import Message

from eventbus import BaseEvent, EventBus, HealthStatus, PublishError
from eventbus.dlq.records import FailedEvent
from eventbus.metrics import InMemoryMetricsCollector
from eventbus.redis.backend import RedisBackend
from eventbus.redis.dlq import RedisDeadLetterStore
from eventbus.redis.scripts import bodies_key, inflight_key, ready_key
from tests import redis_handlers as h

pytest.register_assert_rewrite("tests.redis_support")  # before it is imported below
from tests.redis_support import (  # noqa: E402
    TEST_REDELIVERY_TIMEOUT,
    RedisServer,
    Workers,
    queue_name,
    require_redis_server_binary,
    sync_subscriptions,
    unfinished,
)

# The fixtures: redis_url, namespace, make_redis_bus, workers.
pytest_plugins = ["tests.redis_support"]

pytestmark = pytest.mark.timeout(90)

DEFAULT_QUEUE = queue_name()
OTHER_QUEUE = queue_name(h.OTHER_QUEUE)


def client_for(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


async def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.02
) -> float:
    """Poll ``condition`` until true; returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)
    return time.monotonic() - started


def handled(client: redis.Redis, ns: str, name: str = "handled") -> set[int]:
    return {int(v) for v in client.smembers(h.key(name, ns))}


# -- publishing ---------------------------------------------------------------------


async def test_publish_fans_out_to_every_subscription_inside_redis(
    make_redis_bus: Callable[..., EventBus], namespace: str, redis_url: str
) -> None:
    sync_subscriptions(redis_url, namespace)  # what a worker does when it boots
    bus = make_redis_bus()
    await bus.start()
    await bus.publish(h.Numbered(n=1))
    await bus.publish_many([h.Numbered(n=i) for i in range(2, 102)])

    r = client_for(redis_url)
    default = r.lrange(ready_key(namespace, DEFAULT_QUEUE), 0, -1)
    other = r.lrange(ready_key(namespace, OTHER_QUEUE), 0, -1)
    assert len(default) == len(other) == 101
    bodies = bodies_key(namespace, DEFAULT_QUEUE)
    first = Message.decode(r.hget(bodies, default[0]))
    assert first.actor_name.endswith("tests.redis_handlers.record")
    assert first.queue_name == DEFAULT_QUEUE
    assert first.args[0]["event"]["n"] == 1
    other_first = Message.decode(r.hget(bodies_key(namespace, OTHER_QUEUE), other[0]))
    assert other_first.actor_name.endswith("record_async")
    assert await bus.backend.pending() == 202  # type: ignore[attr-defined]


async def test_large_floats_and_text_cross_the_publish_script_byte_for_byte(
    make_redis_bus: Callable[..., EventBus], namespace: str, redis_url: str
) -> None:
    # The script builds messages from the event's bytes, never through cjson
    # (which keeps 14 significant digits).
    sync_subscriptions(redis_url, namespace)
    bus = make_redis_bus()
    await bus.start()
    event = h.Numbered(n=2**62 + 1, delay=0.1234567890123456789)
    await bus.publish(event)
    r = client_for(redis_url)
    [entry] = r.lrange(ready_key(namespace, DEFAULT_QUEUE), 0, -1)
    message = Message.decode(r.hget(bodies_key(namespace, DEFAULT_QUEUE), entry))
    decoded = h.Numbered.model_validate(message.args[0]["event"])
    assert decoded.n == 2**62 + 1
    assert decoded.delay == 0.1234567890123456789
    assert decoded.event_id == event.event_id


async def test_concurrent_publishes_share_script_calls_and_keep_their_own_outcome(
    redis_url: str, namespace: str
) -> None:
    sync_subscriptions(redis_url, namespace)
    metrics = InMemoryMetricsCollector()
    backend = RedisBackend(url=redis_url, namespace=namespace)
    bus = EventBus(backend=backend, metrics=metrics)
    await bus.start()
    calls = 0
    original = backend._script

    async def counting(script: str, args: list[object]) -> object:
        nonlocal calls
        calls += 1
        return await original(script, args)

    backend._script = counting  # type: ignore[method-assign]
    try:
        events = [h.Numbered(n=i) for i in range(64)]
        await asyncio.gather(
            *(bus.publish(e) for e in events), bus.publish(h.Numbered(n=99, topic="nobody.here"))
        )
        assert calls < 10  # grouped: not one round trip per caller
        r = client_for(redis_url)
        assert r.llen(ready_key(namespace, DEFAULT_QUEUE)) == 64
        assert r.llen(ready_key(namespace, OTHER_QUEUE)) == 64
        assert metrics.snapshot()["unrouted"] == {"nobody.here": 1}  # only its own caller
        assert metrics.snapshot()["published"][h.RECORD] == 64
    finally:
        await bus.stop()
        backend.broker.close()  # type: ignore[union-attr]


async def test_unrouted_error_mode_on_redis_writes_nothing_of_the_call(
    redis_url: str, namespace: str
) -> None:
    from eventbus import EventBusSettings
    from eventbus.exceptions import UnroutedError

    sync_subscriptions(redis_url, namespace)
    backend = RedisBackend(url=redis_url, namespace=namespace)
    bus = EventBus(backend=backend, settings=EventBusSettings(unrouted="error"))
    await bus.start()
    try:
        with pytest.raises(UnroutedError, match=r"nobody\.here"):
            await bus.publish_many([h.Numbered(n=1), h.Numbered(n=2, topic="nobody.here")])
        assert await backend.pending() == 0  # all or none
        await bus.publish(h.Numbered(n=3))
        assert await backend.pending() == 2
    finally:
        await bus.stop()
        backend.broker.close()  # type: ignore[union-attr]


async def test_publish_with_redis_down_raises_publish_error_quickly(
    make_redis_bus: Callable[..., EventBus],
) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    bus = make_redis_bus(url=f"redis://127.0.0.1:{closed_port}/0")
    await bus.start()  # starts anyway: the web app must come up while Redis is down
    started = time.monotonic()
    with pytest.raises(PublishError, match="could not publish to Redis"):
        await bus.publish(h.Numbered(n=1))
    assert time.monotonic() - started < 2.0
    results = await bus.health.check()
    assert [r.status for r in results] == [HealthStatus.UNHEALTHY, HealthStatus.UNHEALTHY]


async def test_publish_to_a_silent_server_is_bounded_by_publish_timeout(
    make_redis_bus: Callable[..., EventBus],
) -> None:
    with socket.socket() as server:  # accepts connections, never answers
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        port = server.getsockname()[1]
        bus = make_redis_bus(url=f"redis://127.0.0.1:{port}/0", publish_timeout=0.3)
        await bus.start()
        started = time.monotonic()
        with pytest.raises(PublishError, match=r"within 0\.3s"):
            await bus.publish(h.Numbered(n=1))
        assert time.monotonic() - started < 1.5


# -- workers --------------------------------------------------------------------------


async def test_events_published_with_no_worker_are_delivered_when_one_starts(
    make_redis_bus: Callable[..., EventBus], namespace: str, redis_url: str, workers: Workers
) -> None:
    sync_subscriptions(redis_url, namespace)  # the release step of a deploy
    bus = make_redis_bus()
    await bus.start()
    await bus.publish_many([h.Numbered(n=i) for i in range(30)])
    broker_health, worker_health = await bus.health.check()
    assert broker_health.status is HealthStatus.HEALTHY
    assert worker_health.status is HealthStatus.DEGRADED
    assert "tests.redis_handlers.record" in worker_health.detail

    # The handler module comes from EVENTBUS_HANDLERS this time, not the command line.
    workers.start(modules=(), env={"EVENTBUS_HANDLERS": "tests.redis_handlers"})
    r = client_for(redis_url)
    await wait_for(
        lambda: (
            len(handled(r, namespace)) == 30 and len(handled(r, namespace, "handled_async")) == 30
        ),
        15,
        "30 events handled by both handlers",
    )
    await bus.drain(timeout=5)
    results = await bus.health.check()
    assert [x.status for x in results] == [HealthStatus.HEALTHY, HealthStatus.HEALTHY], results


@pytest.mark.parametrize("mode", ["threads", "loop"])
async def test_sigkilled_worker_loses_no_event(
    make_redis_bus: Callable[..., EventBus],
    namespace: str,
    redis_url: str,
    workers: Workers,
    mode: str,
) -> None:
    # The loop worker's acks wait for a group: a kill meanwhile only redelivers.
    total = 300
    bus = make_redis_bus()
    await bus.start()
    kind = {"EVENTBUS_REDIS_WORKER": mode}
    first = workers.start(threads=4, env=kind)
    await bus.publish_many([h.Numbered(n=i, delay=0.01) for i in range(total)])
    r = client_for(redis_url)
    await wait_for(lambda: len(handled(r, namespace)) >= 40, 15, "the stream to be under way")

    first.kill()  # SIGKILL, master and worker processes at once
    first.process.wait(5)
    killed_at = time.monotonic()
    held = sum(r.llen(k) for k in r.scan_iter(match=f"{namespace}:{{*}}:a:*"))
    assert held > 0, "the killed worker held no in-flight event: the test proves nothing"

    workers.start(threads=4, env=kind)
    await wait_for(
        lambda: (
            len(handled(r, namespace)) == total
            and len(handled(r, namespace, "handled_async")) == total
        ),
        TEST_REDELIVERY_TIMEOUT + 20,
        "every event handled at least once",
    )
    assert time.monotonic() - killed_at < TEST_REDELIVERY_TIMEOUT + 10
    assert int(r.get(h.key("runs", namespace)) or 0) >= total
    await bus.drain(timeout=5)
    assert not [k for k in r.scan_iter(match=f"{namespace}:{{*}}:a:*") if r.llen(k)]


async def test_long_handler_on_a_live_worker_is_not_redelivered(
    make_redis_bus: Callable[..., EventBus], namespace: str, redis_url: str, workers: Workers
) -> None:
    bus = make_redis_bus()
    await bus.start()
    workers.start(threads=2)
    workers.start(threads=2)  # a second worker that would pick up a redelivery
    event = h.Slow(seconds=TEST_REDELIVERY_TIMEOUT * 1.7)
    await bus.publish(event)
    r = client_for(redis_url)
    done = h.key(f"done:{event.event_id}", namespace)
    await wait_for(lambda: r.exists(done) == 1, TEST_REDELIVERY_TIMEOUT * 4, "the slow handler")
    await asyncio.sleep(TEST_REDELIVERY_TIMEOUT / 5)  # one more recovery pass
    assert int(r.get(h.key(f"starts:{event.event_id}", namespace)) or 0) == 1
    await bus.drain(timeout=5)


@pytest.mark.parametrize("mode", ["threads", "loop"])
async def test_worker_survives_a_redis_restart(
    make_redis_bus: Callable[..., EventBus], namespace: str, workers: Workers, mode: str
) -> None:
    require_redis_server_binary()
    server = RedisServer().start()
    try:
        bus = make_redis_bus(url=server.url)
        await bus.start()
        worker = workers.start(redis_url=server.url, env={"EVENTBUS_REDIS_WORKER": mode})
        r = client_for(server.url)
        await bus.publish(h.Numbered(n=1))
        await wait_for(lambda: handled(r, namespace) == {1}, 10, "the first event")

        server.stop()
        with pytest.raises(PublishError):
            await bus.publish(h.Numbered(n=2))
        server.start()  # same port, empty (no persistence): the subscriptions are gone too
        await wait_for(
            lambda: sum(b"|" in f for f in r.hkeys(f"{namespace}:t:{h.RECORD}")) == 2,
            10,
            "the worker to subscribe again",
        )

        await bus.publish(h.Numbered(n=3))
        await wait_for(lambda: handled(r, namespace) == {3}, 15, "an event after the restart")
        assert worker.process.poll() is None
        assert "Redis is back" in worker.output()
        assert "writing its subscriptions again" in worker.output()
    finally:
        await bus.stop()
        workers.stop_all()
        server.stop()


@pytest.mark.parametrize("mode", ["threads", "loop"])
async def test_malformed_messages_are_dead_lettered_and_the_worker_goes_on(
    make_redis_bus: Callable[..., EventBus],
    namespace: str,
    redis_url: str,
    workers: Workers,
    mode: str,
) -> None:
    # Rows nobody wrote through the API; the loop worker dead-letters them in a
    # thread (a blocking call), off the loop that runs the valid event's handler.
    bus = make_redis_bus()
    await bus.start()
    workers.start(env={"EVENTBUS_REDIS_WORKER": mode})
    r = client_for(redis_url)
    queue = ready_key(namespace, DEFAULT_QUEUE)
    record_actor = f"{h.RECORD}:tests.redis_handlers.record"

    def message(actor: str, args: list[object]) -> bytes:
        return json.dumps(
            {
                "queue_name": DEFAULT_QUEUE,
                "actor_name": actor,
                "args": args,
                "kwargs": {},
                "options": {},
                "message_id": f"bad-{actor[-6:]}-{len(args)}",
                "message_timestamp": 0,
            }
        ).encode()

    bad = [
        b"\x80\x04 not json at all",
        b'{"hello": "world"}',
        message("no.such.actor", [{}]),
        message(record_actor, [{"type": "tests.redis_handlers.Numbered", "event": {"n": "x"}}]),
        message(record_actor, []),
    ]
    for i, body in enumerate(bad):
        r.hset(bodies_key(namespace, DEFAULT_QUEUE), f"bad{i}", body)
        r.rpush(queue, f"bad{i}")
    await bus.publish(h.Numbered(n=7))
    await wait_for(lambda: 7 in handled(r, namespace), 10, "the valid event")
    await wait_for(lambda: bus.dlq.size() == 5, 10, "five dead letters")

    records = {f.error_type: f for f in bus.dlq.peek(10)}
    assert set(records) == {"InvalidMessage", "ActorNotFound", "EventDecodeError"}
    reasons = " | ".join(f.error for f in bus.dlq.peek(10))
    assert "not a dramatiq message" in reasons
    assert "no.such.actor" in reasons
    assert "invalid fields for event type" in reasons
    assert "exactly one argument" in reasons
    await bus.drain(timeout=5)
    assert unfinished(r, namespace) == 0  # none left in flight or in the queue


@pytest.mark.parametrize("mode", ["threads", "loop"])
async def test_a_failed_attempt_is_retried_after_its_delay(
    make_redis_bus: Callable[..., EventBus],
    namespace: str,
    redis_url: str,
    workers: Workers,
    mode: str,
) -> None:
    bus = make_redis_bus()
    await bus.start()
    workers.start(env={"EVENTBUS_REDIS_WORKER": mode})
    event = h.Flaky()
    await bus.publish(event)
    r = client_for(redis_url)
    ok = h.key(f"ok:{event.event_id}", namespace)
    await wait_for(lambda: r.exists(ok) == 1, 10, "the retry")
    assert int(r.get(ok) or 0) == 2
    assert bus.dlq.size() == 0


class Doom(BaseEvent):
    """The event of tests.dying_handlers, declared here (see the test below)."""

    topic: str = "redis.test.doom"


async def test_a_worker_whose_thread_died_exits_and_its_event_is_handled_elsewhere(
    make_redis_bus: Callable[..., EventBus], namespace: str, redis_url: str, workers: Workers
) -> None:
    # Not imported here: tests.dying_handlers adds a logging filter to dramatiq's
    # WorkerThread logger, which in this process would kill the in-process workers'
    # threads of every later test at their first failed attempt.
    modules = ("tests.dying_handlers",)
    threads = {"EVENTBUS_REDIS_WORKER": "threads"}  # dramatiq's worker threads
    doomed = workers.start(modules, threads=1, env=threads)
    bus = make_redis_bus()
    await bus.start()
    event = Doom()
    await bus.publish(event)
    r = client_for(redis_url)
    await wait_for(lambda: r.exists(h.key("thread-killed", namespace)) == 1, 10, "the kill")
    # Without its only thread the worker would hold the event while its heartbeat
    # says it is alive; it exits instead, putting the event back.
    await wait_for(lambda: doomed.process.poll() is not None, 20, "the worker to exit")
    assert "worker thread(s) died" in doomed.output()
    workers.start(modules, threads=1, env=threads)
    ok = h.key(f"doomed-ok:{event.event_id}", namespace)
    await wait_for(lambda: r.exists(ok) == 1, 20, "the event, handled by another worker")
    assert int(r.get(ok) or 0) == 2


class Halt(BaseEvent):
    """The loop-stopping event of tests.dying_handlers."""

    topic: str = "redis.test.halt"


async def test_a_loop_worker_whose_event_loop_stopped_exits_and_its_event_is_handled_elsewhere(
    make_redis_bus: Callable[..., EventBus], namespace: str, redis_url: str, workers: Workers
) -> None:
    # A loop worker runs handlers on one event loop: if that loop ends (a bug in a
    # handler), nothing would run while the heartbeat says the worker lives.
    modules = ("tests.dying_handlers",)
    loop = {"EVENTBUS_REDIS_WORKER": "loop"}
    halted = workers.start(modules, threads=1, env=loop)
    bus = make_redis_bus()
    await bus.start()
    event = Halt()
    await bus.publish(event)
    r = client_for(redis_url)
    await wait_for(lambda: r.exists(h.key("loop-stopped", namespace)) == 1, 10, "the stop")
    await wait_for(lambda: halted.process.poll() is not None, 20, "the worker to exit")
    assert "eventbus-redis-loop" in halted.output()
    workers.start(modules, threads=1, env=loop)
    ok = h.key(f"halted-ok:{event.event_id}", namespace)
    await wait_for(lambda: r.exists(ok) == 1, 20, "the event, handled by another worker")
    assert int(r.get(ok) or 0) == 2


async def test_a_heartbeat_that_fails_with_a_bug_stops_the_worker_and_fails_liveness(
    make_redis_bus: Callable[..., EventBus], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Redis error is retried; anything else is a bug that would fail every beat
    # while this worker still takes events: other workers would redeliver them.
    bus = make_redis_bus()
    await bus.start(consume=True)
    broker = bus.backend.broker  # type: ignore[attr-defined]
    [alive] = bus.health.liveness()
    assert alive.status is HealthStatus.HEALTHY, alive  # otherwise the test proves nothing
    stopped: list[str] = []
    broker.on_failure = stopped.append

    def buggy_beat() -> int:
        raise TypeError("a bug in the heartbeat")

    monkeypatch.setattr(broker, "beat", buggy_beat)
    await wait_for(
        lambda: bool(stopped), broker.heartbeat_interval * 10, "the worker to be stopped"
    )
    [dead] = bus.health.liveness()
    assert dead.status is HealthStatus.UNHEALTHY
    assert "heartbeat" in dead.detail and "TypeError: a bug in the heartbeat" in dead.detail
    assert stopped == [broker.failed]


async def test_backlog_gauge_counts_waiting_events_per_queue(
    redis_url: str, namespace: str
) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from eventbus.prometheus import PrometheusMetricsCollector

    sync_subscriptions(redis_url, namespace)
    registry = CollectorRegistry()
    backend = RedisBackend(url=redis_url, namespace=namespace)
    bus = EventBus(backend=backend, metrics=PrometheusMetricsCollector(registry=registry))
    await bus.start()
    try:
        await bus.publish_many([h.Numbered(n=i) for i in range(3)])
        await bus.publish(h.Flaky())
        text = (await asyncio.to_thread(generate_latest, registry)).decode()
        assert f'eventbus_backlog{{queue="{DEFAULT_QUEUE}"}} 4.0' in text
        assert f'eventbus_backlog{{queue="{OTHER_QUEUE}"}} 3.0' in text
    finally:
        await bus.stop()
        backend.broker.close()  # type: ignore[union-attr]


# -- recovery and dead letters, in process ---------------------------------------------


async def test_recovery_pass_puts_back_a_dead_workers_messages(
    make_redis_bus: Callable[..., EventBus], namespace: str, redis_url: str
) -> None:
    bus = make_redis_bus()
    broker = bus.broker
    r = client_for(redis_url)
    dead, alive = "host.1.dead", "host.2.alive"
    now_ms = int(r.time()[0]) * 1000
    r.zadd(f"{namespace}:heartbeats", {dead: now_ms - 60_000, alive: now_ms})
    r.hset(f"{namespace}:workers", mapping={dead: DEFAULT_QUEUE, alive: DEFAULT_QUEUE})
    r.rpush(inflight_key(namespace, dead, DEFAULT_QUEUE), b"m1", b"m2")
    r.rpush(inflight_key(namespace, alive, DEFAULT_QUEUE), b"m3")
    r.rpush(ready_key(namespace, DEFAULT_QUEUE), b"m4")

    assert broker.beat() == 2  # type: ignore[attr-defined]
    assert r.lrange(ready_key(namespace, DEFAULT_QUEUE), 0, -1) == [b"m1", b"m2", b"m4"]
    assert r.llen(inflight_key(namespace, alive, DEFAULT_QUEUE)) == 1
    assert r.hexists(f"{namespace}:workers", dead) == 0
    assert r.hexists(f"{namespace}:workers", alive) == 1


def _failed(record_id: str, topic: str = "t", error_type: str = "ValueError") -> FailedEvent:
    return FailedEvent(
        id=record_id,
        event=None,
        envelope={"type": "x", "event": {"topic": topic}},
        topic=topic,
        handler="t:h",
        queue=DEFAULT_QUEUE,
        attempts=2,
        error="boom",
        error_type=error_type,
    )


def test_redis_dead_letter_store(redis_url: str, namespace: str) -> None:
    r = client_for(redis_url)
    store = RedisDeadLetterStore(r, namespace=namespace, max_size=3)
    for i in range(4):
        store.add(_failed(f"r{i}", topic="a" if i % 2 else "b"))
    assert store.size() == 3 and store.evicted == 1
    assert [f.id for f in store.find(None)] == ["r1", "r2", "r3"]
    assert [f.id for f in store.find(10, topic="a")] == ["r1", "r3"]
    assert [f.id for f in store.peek(2)] == ["r2", "r3"]

    other_process = RedisDeadLetterStore(client_for(redis_url), namespace=namespace)
    got = other_process.get("r2")
    assert got is not None and got.error == "boom" and got.attempts == 2

    claimed = store.claim("r2")
    assert claimed is not None and store.get("r2") is None and store.claim("r2") is None
    store.release(claimed)
    assert store.get("r2") is not None
    assert store.claim("r2") is not None
    store.complete("r2")
    assert store.get("r2") is None and store.size() == 2

    stale = RedisDeadLetterStore(r, namespace=namespace, claim_timeout=0.0)
    assert stale.claim("r1") is not None
    time.sleep(0.01)
    assert "r1" in [f.id for f in stale.find(None)]  # a dead claimer's record comes back

    removed = store.remove("r3")
    assert removed is not None and removed.id == "r3" and store.remove("r3") is None
    store.clear()
    assert store.size() == 0


async def test_backend_from_settings() -> None:
    from eventbus import EventBusSettings
    from eventbus.bus import create_backend

    backend = create_backend(
        EventBusSettings(backend="redis", redis_namespace="custom", redis_redelivery_timeout=12)
    )
    assert isinstance(backend, RedisBackend)
    assert backend.namespace == "custom"
    assert backend.heartbeat_timeout == pytest.approx(8.0)
    assert backend.heartbeat_timeout + backend.heartbeat_interval <= 12


async def test_worker_exits_when_its_whole_process_group_is_signalled_twice(
    workers: Workers,
) -> None:
    """systemd and container runtimes SIGTERM every process of the group, so each
    dramatiq worker process gets the signal twice (also from its master) and exits
    without stopping its Worker: it must still exit, not hang on a live thread."""
    import os
    import signal as signals

    worker = workers.start(("tests.redis_handlers",), processes=2)
    os.killpg(worker.process.pid, signals.SIGTERM)
    await asyncio.sleep(0.2)
    os.killpg(worker.process.pid, signals.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.killpg(worker.process.pid, 0)
        except ProcessLookupError:
            break  # every process of the group is gone
        worker.process.poll()
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(f"worker processes still alive:\n{worker.output()}")
