"""Dead letters on the Redis backend, with real worker processes: exact attempts, the
final traceback, replay after a fix, a store that outlives workers, bulk replay,
unknown event classes, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
import redis

from eventbus import EventBus, EventBusSettings, FailedEvent
from eventbus.events import UnknownEvent, decode_event
from eventbus.redis.backend import RedisBackend
from eventbus.redis.dlq import RedisDeadLetterStore
from tests import dlq_handlers as h

pytest.register_assert_rewrite("tests.redis_support")
from tests.redis_support import (  # noqa: E402
    ROOT,
    TEST_REDELIVERY_TIMEOUT,
    Workers,
    wait_settled,
    wait_until,
)

pytest_plugins = ["tests.redis_support"]
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def web(redis_url: str, namespace: str) -> Iterator[Callable[[], EventBus]]:
    """Build web-side buses (not started: dead letters need no running bus)."""

    def make() -> EventBus:
        backend = RedisBackend(
            url=redis_url, namespace=namespace, redelivery_timeout=TEST_REDELIVERY_TIMEOUT
        )
        return EventBus(backend=backend, settings=EventBusSettings(shutdown_timeout=2))

    yield make


@pytest.fixture
def r(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


async def publish(bus: EventBus, *events: h.Poison) -> None:
    await bus.start()
    try:
        await bus.publish_many(list(events))
    finally:
        await bus.stop()


def handled(r: redis.Redis, namespace: str) -> list[dict[str, object]]:
    return [json.loads(x) for x in r.lrange(h.key("handled", namespace), 0, -1)]


async def test_poison_event_dead_letter_replay_and_restart(
    web: Callable[[], EventBus],
    workers: Workers,
    r: redis.Redis,
    namespace: str,
    redis_url: str,
) -> None:
    worker = workers.start(("tests.dlq_handlers",), env={"EVENTBUS_MAX_RETRIES": "2"})
    bus = web()
    event = h.Poison(n=1)
    await publish(bus, event)
    wait_until(lambda: bus.dlq.size() == 1, 20, "the dead letter")

    [record] = bus.dlq.peek()
    assert record.attempts == 3
    assert int(r.get(h.key(f"attempts:{event.event_id}", namespace)) or 0) == 3
    assert int(r.get(h.key(f"sibling:{event.event_id}", namespace)) or 0) == 1
    assert record.handler == "dlq.poison:poison"
    assert record.error_type == "LookupError"
    assert f"ledger has no account for event {event.event_id}" in record.traceback
    assert record.event is not None and record.event.event_id == event.event_id
    assert isinstance(record.event, h.Poison) and record.event.n == 1

    # the store outlives the worker and the web bus
    worker.stop()
    workers.start(("tests.dlq_handlers",), env={"EVENTBUS_MAX_RETRIES": "2"})
    bus = web()
    [again] = bus.dlq.peek()
    assert again.id == record.id

    r.set(h.key("fixed", namespace), 1)
    result = bus.dlq.replay([record.id])
    assert result.replayed == [record.id]
    assert bus.dlq.replay([record.id]).missing == [record.id]
    wait_until(lambda: len(handled(r, namespace)) == 1, 20, "the replayed event")
    wait_settled(redis_url, namespace)  # nothing left that could be delivered twice
    assert [x["id"] for x in handled(r, namespace)] == [event.event_id]
    assert bus.dlq.size() == 0
    assert int(r.get(h.key(f"sibling:{event.event_id}", namespace)) or 0) == 1


async def test_bulk_replay_of_1000_records_loses_none(
    web: Callable[[], EventBus], workers: Workers, r: redis.Redis, namespace: str
) -> None:
    workers.start(("tests.dlq_handlers",), threads=8, env={"EVENTBUS_MAX_RETRIES": "0"})
    bus = web()
    events = [h.Poison(n=i) for i in range(1000)]
    await publish(bus, *events)
    wait_until(lambda: bus.dlq.size() == 1000, 60, "1000 dead letters")

    r.set(h.key("fixed", namespace), 1)
    result = await bus.dlq.areplay(topic=h.POISON)
    assert len(result.replayed) == 1000 and not result.failed

    wait_until(lambda: len(handled(r, namespace)) >= 1000, 60, "1000 replayed events")
    assert sorted(str(x["id"]) for x in handled(r, namespace)) == sorted(e.event_id for e in events)
    assert bus.dlq.size() == 0


async def test_unknown_event_class_lists_and_replays(
    web: Callable[[], EventBus], workers: Workers, r: redis.Redis, namespace: str
) -> None:
    workers.start(("tests.dlq_handlers",), env={"EVENTBUS_MAX_RETRIES": "0"})
    bus = web()
    ghost = decode_event({"type": "billing.v9.Refund", "event": {"topic": h.POISON, "cents": 125}})
    await bus.start()
    await bus.publish(ghost)  # type: ignore[arg-type]
    await bus.stop()
    wait_until(lambda: bus.dlq.size() == 1, 20, "the dead letter")

    [record] = bus.dlq.peek()
    assert isinstance(record.event, UnknownEvent)
    assert record.event.event_type == "billing.v9.Refund"
    r.set(h.key("fixed", namespace), 1)
    assert bus.dlq.replay([record.id]).replayed == [record.id]
    wait_until(lambda: len(handled(r, namespace)) == 1, 20, "the replayed event")
    assert handled(r, namespace)[0]["extra"] == {"cents": 125}


async def test_cli_lists_shows_and_replays_from_redis(
    web: Callable[[], EventBus], workers: Workers, r: redis.Redis, namespace: str, redis_url: str
) -> None:
    workers.start(("tests.dlq_handlers",), env={"EVENTBUS_MAX_RETRIES": "0"})
    bus = web()
    event = h.Poison(n=5)
    await publish(bus, event)
    wait_until(lambda: bus.dlq.size() == 1, 20, "the dead letter")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "EVENTBUS_BACKEND": "redis",
        "EVENTBUS_REDIS_URL": redis_url,
        "EVENTBUS_REDIS_NAMESPACE": namespace,
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "eventbus.cli", "dlq", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)

    listing = cli("list")
    assert listing.returncode == 0, listing.stderr
    assert "dlq.poison:poison" in listing.stdout and "LookupError" in listing.stdout
    [item] = json.loads(cli("list", "--json").stdout)["items"]
    shown = cli("show", item["id"])
    assert "ledger has no account" in shown.stdout

    r.set(h.key("fixed", namespace), 1)
    replay = cli("replay", item["id"], "--json")
    assert json.loads(replay.stdout)["replayed"] == [item["id"]]
    wait_until(lambda: len(handled(r, namespace)) == 1, 20, "the replayed event")
    assert cli("list", "--json").stdout and json.loads(cli("list", "--json").stdout)["size"] == 0


# -- hostile payloads -------------------------------------------------------------------


def _record(record_id: str, envelope: object) -> FailedEvent:
    return FailedEvent(
        id=record_id,
        event=None,
        envelope=envelope,
        topic="t",
        handler="h",
        queue="eventbus",
        attempts=1,
        error="event envelope is too deeply nested",
        error_type="EventDecodeError",
    )


def test_redis_store_writes_and_lists_a_100000_levels_deep_record(
    r: redis.Redis, namespace: str
) -> None:
    deep: object = 0
    for _ in range(100_000):
        deep = [deep]
    store = RedisDeadLetterStore(r, namespace=namespace)

    store.add(_record("deep", {"type": "x", "event": {"topic": "t", "p": deep}}))

    [listed] = store.find(None)
    assert listed.id == "deep" and listed.event is None
    assert listed.error_type == "EventDecodeError"
    assert isinstance(listed.envelope, str) and listed.envelope.count("[") == 100_000
    assert store.get("deep") is not None
    assert store.remove("deep") is not None and store.size() == 0


def test_redis_store_lists_and_purges_a_record_it_cannot_read(
    r: redis.Redis, namespace: str
) -> None:
    store = RedisDeadLetterStore(r, namespace=namespace)
    store.add(_record("good", {"type": "x", "event": {"topic": "t"}}))
    # written by hand into the store's keys: not JSON, and JSON of the wrong shape
    r.hset(f"{namespace}:dlq", mapping={"junk": b"\xff{not json", "shape": b'["a"]'})
    r.zadd(f"{namespace}:dlq:order", {"junk": 100, "shape": 101})

    listed = {record.id: record for record in store.find(None)}

    assert set(listed) == {"good", "junk", "shape"}
    assert listed["junk"].error_type == "UnreadableRecord"
    assert "not valid JSON" in listed["junk"].error
    assert listed["shape"].error_type == "UnreadableRecord"
    assert store.get("junk") is not None
    assert store.remove("junk") is not None and store.remove("shape") is not None
    assert [record.id for record in store.find(None)] == ["good"]
