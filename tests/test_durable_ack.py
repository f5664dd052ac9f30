"""Durable before acknowledged: a failed attempt leaves its queue only once its
retry or its dead letter is written; when neither can be (Redis down, a store
that raises, a retry policy with a bug), the event is handled again later, never
acknowledged away.  On Redis, Kafka and the embedded backend.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from eventbus import BaseEvent, EventBus, EventBusSettings, RetryPolicy
from eventbus.config import MAX_RETRIES_LIMIT
from eventbus.dlq.records import FailedEvent
from eventbus.exceptions import ConfigurationError
from eventbus.kafka.backend import KafkaBackend
from tests.durable_handlers import Broken, Flaky, FlakyError
from tests.kafka_events import Numbered
from tests.kafka_helpers import committed_offsets, create_topic, read_topic, wait_for
from tests.reliability.support import Ledger

pytest.register_assert_rewrite("tests.redis_support")  # before it is imported below
from tests.redis_support import (  # noqa: E402
    RedisServer,
    Workers,
    require_redis_server_binary,
)

pytest_plugins = ["tests.redis_support", "tests.kafka_support"]

MODULES = ("tests.durable_handlers",)
#: Events whose handlers fail while Redis is down.
OUTAGE_EVENTS = 4
#: Seconds to wait for outcomes once Redis is back: dramatiq retries settling a
#: message every 5 s, the consumer reconnects within 2 s, redis-py backs off.
RECOVERY_TIMEOUT = 40.0


class Files:
    """The ledger, failure markers and gate of a run of ``tests.durable_handlers``."""

    def __init__(self, root: Path) -> None:
        self.ledger_dir = root / "ledger"
        self.marks = root / "marks"
        self.gate = root / "gate"
        self.ledger_dir.mkdir()
        self.marks.mkdir()
        self.ledger = Ledger(self.ledger_dir)

    @property
    def env(self) -> dict[str, str]:
        return {
            "DURABLE_LEDGER": str(self.ledger_dir),
            "DURABLE_MARKS": str(self.marks),
            "DURABLE_GATE": str(self.gate),
        }

    def failures(self) -> int:
        return sum(f.read_text().count("f ") for f in self.ledger_dir.glob("*.fail"))


def durable_server(root: Path) -> RedisServer:
    """A Redis of this test only, with the append-only file fsynced on every write."""
    require_redis_server_binary()
    data = root / "redis-data"
    data.mkdir()
    return RedisServer(
        args=("--appendonly", "yes", "--appendfsync", "always", "--dir", str(data))
    ).start()


def dead_lettered(bus: EventBus) -> dict[int, FailedEvent]:
    """The dead letters of ``bus`` by event number."""
    records = bus.dlq.store.find(None)
    return {r.event.n: r for r in records if r.event is not None and hasattr(r.event, "n")}


# -- Redis -----------------------------------------------------------------------------


#: What each worker kind logs when it cannot settle a failed attempt (Redis down).
SETTLE_FAILED_LOG = {
    "loop": "Could not settle event",
    "threads": "Failed to post_process_message",
}


@pytest.mark.parametrize("mode", ["loop", "threads"])
@pytest.mark.parametrize(
    ("max_retries", "fails", "outcome"),
    [(1, 1, "retried"), (0, 2, "dead-lettered")],
)
async def test_a_handler_failure_during_a_redis_outage_is_not_acked_away(
    make_redis_bus: Callable[..., EventBus],
    workers: Workers,
    tmp_path: Path,
    max_retries: int,
    fails: int,
    outcome: str,
    mode: str,
) -> None:
    """Handlers fail while Redis is down: the retry cannot be enqueued and the dead
    letter cannot be written.  Once Redis is back (its append-only file kept every
    write), each event is handled again: retried, or dead-lettered."""
    server = durable_server(tmp_path)
    try:
        files = Files(tmp_path)
        worker = workers.start(
            MODULES,
            threads=OUTAGE_EVENTS,
            env={
                **files.env,
                "EVENTBUS_MAX_RETRIES": str(max_retries),
                "EVENTBUS_REDIS_WORKER": mode,
            },
            redis_url=server.url,
        )
        bus = make_redis_bus(url=server.url)
        await bus.start()
        events = range(OUTAGE_EVENTS)
        await bus.publish_many([Flaky(n=n, fails=fails, gate=True) for n in events])
        await wait_for(
            lambda: len(files.ledger.refresh().started) == OUTAGE_EVENTS,
            20,
            "every handler to start",
        )
        server.kill()
        files.gate.touch()  # the handlers fail now, with Redis down
        await wait_for(
            lambda: worker.output().count(SETTLE_FAILED_LOG[mode]) >= OUTAGE_EVENTS,
            30,
            "the worker to try settling every failed attempt while Redis is down",
        )
        assert files.failures() == OUTAGE_EVENTS
        await asyncio.to_thread(server.start)  # same port, reloads the append-only file

        def settled() -> bool:
            if outcome == "retried":
                return not files.ledger.missing(events)
            return set(dead_lettered(bus)) == set(events)

        await wait_for(settled, RECOVERY_TIMEOUT, f"every event to be {outcome}")
        await bus.drain(timeout=RECOVERY_TIMEOUT)  # nothing left pending
        if outcome == "retried":
            assert dead_lettered(bus) == {}
            assert all(files.ledger.done[n] == 1 for n in events)
        else:
            records = dead_lettered(bus)
            assert all(r.error_type == FlakyError.__name__ for r in records.values())
            assert not any(files.ledger.done[n] for n in events)
        assert worker.process.poll() is None
    finally:
        workers.stop_all()
        server.stop()


async def test_a_retry_policy_that_raises_dead_letters_the_event_on_redis(
    make_redis_bus: Callable[..., EventBus], workers: Workers
) -> None:
    """Before: the exception inside the retry middleware was logged and the message
    acked -- nothing pending, no dead letter."""
    workers.start(MODULES, threads=2)
    bus = make_redis_bus()
    await bus.start()
    await bus.publish(Broken(n=7))
    await wait_for(lambda: 7 in dead_lettered(bus), 20, "the dead letter")
    record = dead_lettered(bus)[7]
    assert record.error_type == FlakyError.__name__
    assert "backoff computation failed" in record.traceback  # why it was not retried
    await bus.drain(timeout=10)


# -- embedded --------------------------------------------------------------------------


class Unprintable(Exception):
    """An exception whose text cannot be rendered (seen in the wild: a bad __str__)."""

    def __str__(self) -> str:
        raise TypeError("__str__ returned non-string (type NoneType)")


async def test_a_retry_policy_that_raises_dead_letters_the_event_embedded(
    make_bus: Callable[..., EventBus],
) -> None:
    bus = make_bus()
    await bus.start()
    await bus.publish(Broken(n=3))
    await bus.drain(timeout=5)
    records = dead_lettered(bus)
    assert list(records) == [3]
    assert records[3].error_type == FlakyError.__name__
    assert "backoff computation failed" in records[3].traceback


async def test_an_error_whose_text_cannot_be_rendered_is_retried_then_dead_lettered(
    make_bus: Callable[..., EventBus], topic: str
) -> None:
    calls = 0

    async def handler(event: BaseEvent) -> None:
        nonlocal calls
        calls += 1
        raise Unprintable()

    bus = make_bus(retry_policy=RetryPolicy(max_retries=2, delay=0.001))
    await bus.registry.register(topic, handler)
    await bus.start()
    await bus.publish(BaseEvent(topic=topic))
    await bus.drain(timeout=5)
    assert calls == 3
    [record] = bus.dlq.peek(limit=10)
    assert record.error_type == "Unprintable"
    assert record.attempts == 3


async def test_a_dead_letter_that_cannot_be_written_is_handled_again_embedded(
    make_bus: Callable[..., EventBus], topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0

    async def handler(event: BaseEvent) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("payment service down")

    bus = make_bus(retry_policy=RetryPolicy(max_retries=0))
    await bus.registry.register(topic, handler)
    store = bus.dlq.store
    add = store.add
    refused: list[str] = []

    def add_once_broken(record: FailedEvent) -> None:
        if not refused:
            refused.append(record.id)
            raise OSError("disk full")
        add(record)

    monkeypatch.setattr(store, "add", add_once_broken)
    await bus.start()
    await bus.publish(BaseEvent(topic=topic))
    await bus.drain(timeout=10)
    assert refused
    [record] = bus.dlq.peek(limit=10)
    assert record.error == "payment service down"
    assert calls == 2  # handled again: the first failure could not be recorded


# -- Kafka -----------------------------------------------------------------------------


async def test_a_kafka_dead_letter_that_fails_to_write_holds_the_commit(
    make_kafka_bus: Callable[..., EventBus], kafka_bootstrap: str, kafka_names: tuple[str, str]
) -> None:
    """The dead letter's write keeps failing (its DLQ topic name is too long): the
    offset is not committed past its record, though a later record succeeded."""
    topic = (kafka_names[0] + ".") + "x" * (249 - len(kafka_names[0]) - 1)
    await create_topic(kafka_bootstrap, topic, 1)
    done: list[int] = []

    async def handler(event: Numbered) -> None:
        if event.n == 0:
            raise RuntimeError("payment service down")
        done.append(event.n)

    bus = make_kafka_bus(publish_timeout=1)
    await bus.registry.register(topic, handler, name="tests.durable.kafka", max_retries=0)
    await bus.start()
    await bus.publish(Numbered(topic=topic, n=0))
    await bus.publish(Numbered(topic=topic, n=1))
    backend = bus.backend
    assert isinstance(backend, KafkaBackend) and backend.bridge is not None
    store = backend.dead_letters
    await wait_for(lambda: done == [1] and bool(store.failing_writes()), 20, "both outcomes")
    # Both records are still held: the second is done, but behind the first.
    assert backend.bridge.in_flight == 2
    assert await committed_offsets(kafka_bootstrap, kafka_names[1], topic) == {0: -1}


async def test_a_kafka_dead_letter_that_cannot_be_recorded_is_not_committed(
    make_kafka_bus: Callable[..., EventBus],
    kafka_bootstrap: str,
    kafka_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: recording the dead letter raised, the hook runner logged it, and the
    record counted as finished: committed with no dead letter anywhere."""
    topic = kafka_names[0]
    await create_topic(kafka_bootstrap, topic, 1)
    calls: list[int] = []

    async def handler(event: Numbered) -> None:
        calls.append(event.n)
        if event.n == 0:
            raise RuntimeError("payment service down")

    bus = make_kafka_bus()
    await bus.registry.register(topic, handler, name="tests.durable.kafka2", max_retries=0)
    store = bus.dlq.store
    add = store.add
    refused: list[str] = []

    def add_once_broken(record: FailedEvent) -> None:
        if not refused:
            refused.append(record.id)
            raise OSError("serializer failed")
        add(record)

    monkeypatch.setattr(store, "add", add_once_broken)
    await bus.start()
    await bus.publish(Numbered(topic=topic, n=0))
    await bus.publish(Numbered(topic=topic, n=1))
    [dead] = await read_topic(kafka_bootstrap, f"{topic}.dlq", 1, timeout=20)
    assert b"payment service down" in dead.value  # type: ignore[attr-defined]
    assert refused and calls.count(0) == 2  # handled again once it could not be recorded

    async def committed() -> dict[int, int]:
        return await committed_offsets(kafka_bootstrap, kafka_names[1], topic)

    for _ in range(100):
        if await committed() == {0: 2}:
            break
        await asyncio.sleep(0.1)
    assert await committed() == {0: 2}


# -- the policy ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"delay": math.inf}, "delay"),
        ({"delay": math.nan}, "delay"),
        ({"max_delay": math.inf}, "max_delay"),
        ({"backoff_factor": math.inf}, "backoff_factor"),
        ({"backoff_factor": math.nan}, "backoff_factor"),
        ({"jitter": math.nan}, "jitter"),
        ({"delay": 8 * 24 * 3600.0}, "delay"),
        ({"backoff_factor": 1000.0}, "backoff_factor"),
        ({"max_retries": MAX_RETRIES_LIMIT + 1}, "max_retries"),
        ({"max_retries": 1.5}, "max_retries"),
    ],
)
def test_a_retry_policy_that_cannot_work_is_refused(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigurationError, match=rf"\b{named}\b"):
        RetryPolicy(**options)


def test_settings_that_cannot_make_a_policy_are_named() -> None:
    # Settings built without validation (model_construct): the policy still refuses
    # them, naming the environment variable.
    settings = EventBusSettings.model_construct(
        max_retries=3, retry_delay=math.inf, retry_backoff_factor=2.0, retry_max_delay=60.0
    )
    with pytest.raises(ConfigurationError, match="EVENTBUS_RETRY_DELAY"):
        RetryPolicy.from_settings(settings)


def test_the_backoff_never_overflows() -> None:
    policy = RetryPolicy(max_retries=MAX_RETRIES_LIMIT, delay=1.0, backoff_factor=2.0)
    assert policy.get_delay(MAX_RETRIES_LIMIT - 1) == policy.max_delay
    assert policy.get_delay(10_000_000) == policy.max_delay
    jittered = RetryPolicy(max_retries=MAX_RETRIES_LIMIT, backoff_factor=10.0, jitter=0.5)
    assert jittered.get_delay(5_000) <= jittered.max_delay * 1.5
