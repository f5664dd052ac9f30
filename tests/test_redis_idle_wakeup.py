"""An idle Redis worker's path from a publish to its handler (issue 19, item 2): the
consumer blocks in ``BLMOVE`` and the event's body comes back with the wake-up, in
the same round trip, instead of a second request (``HGET``) after it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
import redis
import redis.connection
from dramatiq import Message

import eventbus.redis.scripts as lua
from eventbus.redis.broker import ReliableRedisBroker
from eventbus.redis.consumer import RedisConsumer

pytest_plugins = ["tests.redis_support"]
pytestmark = pytest.mark.timeout(60)

QUEUE = "idle"
ACTOR = "idle_handler"


class Sends:
    """Requests written to Redis by one thread (redis-py's connections)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.thread: int | None = None
        self.count = 0
        send = redis.connection.AbstractConnection.send_packed_command

        def counting(conn: Any, command: Any, check_health: bool = True) -> None:
            if threading.get_ident() == self.thread:
                self.count += 1
            send(conn, command, check_health)

        monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)


@pytest.fixture
def consumer(redis_url: str, namespace: str) -> Iterator[tuple[ReliableRedisBroker, RedisConsumer]]:
    client = redis.Redis.from_url(redis_url)
    broker = ReliableRedisBroker(client, middleware=[], namespace=namespace)
    dramatiq.actor(lambda n: None, broker=broker, queue_name=QUEUE, actor_name=ACTOR)
    consumer = broker.consume(QUEUE, prefetch=8, timeout=5000)
    assert isinstance(consumer, RedisConsumer)
    yield broker, consumer
    consumer.close()
    client.close()


def blocked_clients(client: redis.Redis) -> int:
    return int(client.info("clients")["blocked_clients"])


def take_one(consumer: RedisConsumer, sends: Sends, got: list[Any]) -> None:
    sends.thread = threading.get_ident()
    while not got:
        message = next(consumer)
        if message is not None:
            got.append(message)


def test_an_idle_consumer_gets_the_body_with_its_wake_up(
    consumer: tuple[ReliableRedisBroker, RedisConsumer],
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker, taker = consumer
    sends = Sends(monkeypatch)
    observer = redis.Redis.from_url(redis_url)
    got: list[Any] = []
    thread = threading.Thread(target=take_one, args=(taker, sends, got), daemon=True)
    before = blocked_clients(observer)
    thread.start()
    deadline = time.monotonic() + 10
    while blocked_clients(observer) <= before:  # waiting in BLMOVE, nothing queued
        assert time.monotonic() < deadline, "the consumer never blocked"
        time.sleep(0.01)
    asked = sends.count  # the requests of the idle wait, written before the event
    broker.enqueue(Message(QUEUE, ACTOR, (7,), {}, {}))
    thread.join(10)
    assert got, "the consumer did not wake up"
    [message] = got
    assert message.args == (7,)  # the body, decoded
    # No request after the wake-up: the body came back with it.
    assert sends.count == asked, f"{sends.count - asked} request(s) after the wake-up"
    # The entry is held in this worker's in-flight list until it is acked.
    assert observer.lrange(taker.inflight, 0, -1) == [message.entry]
    taker.ack(message)
    assert observer.llen(taker.inflight) == 0
    assert observer.hlen(lua.bodies_key(broker.namespace, QUEUE)) == 0
    observer.close()


def test_an_entry_without_a_body_at_the_wake_up_is_skipped(
    consumer: tuple[ReliableRedisBroker, RedisConsumer],
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An entry whose body is gone (its subscription was removed while it waited)
    wakes the consumer: it leaves the in-flight list and the consumer waits again
    and takes the next one."""
    broker, taker = consumer
    observer = redis.Redis.from_url(redis_url)
    got: list[Any] = []
    thread = threading.Thread(target=take_one, args=(taker, Sends(monkeypatch), got), daemon=True)
    before = blocked_clients(observer)
    thread.start()
    deadline = time.monotonic() + 10
    while blocked_clients(observer) <= before:
        assert time.monotonic() < deadline, "the consumer never blocked"
        time.sleep(0.01)
    observer.rpush(lua.ready_key(broker.namespace, QUEUE), b"gone-entry")  # no body
    deadline = time.monotonic() + 10
    while observer.llen(lua.ready_key(broker.namespace, QUEUE)):  # taken
        assert time.monotonic() < deadline, "the consumer never took the entry"
        time.sleep(0.01)
    broker.enqueue(Message(QUEUE, ACTOR, (8,), {}, {}))
    thread.join(10)
    assert [m.args for m in got] == [(8,)]
    assert observer.lrange(taker.inflight, 0, -1) == [got[0].entry]
    observer.close()
