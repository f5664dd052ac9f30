"""Grouped acks of the Redis worker (issue 19, item 2): worker threads that ack at
the same time share one ACK script call, and an entry is deleted from Redis (and
let go of by the consumer) only once that call succeeded."""

from __future__ import annotations

import threading
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq import Message

import eventbus.redis.scripts as lua
from eventbus.redis.broker import ReliableRedisBroker
from eventbus.redis.consumer import RedisConsumer

pytest_plugins = ["tests.redis_support"]
pytestmark = pytest.mark.timeout(60)

QUEUE = "grouped"
ACTOR = "grouped_handler"


def setup(url: str, namespace: str, count: int) -> tuple[redis.Redis, RedisConsumer, list[Any]]:
    client = redis.Redis.from_url(url)
    broker = ReliableRedisBroker(client, middleware=[], namespace=namespace)
    dramatiq.actor(lambda: None, broker=broker, queue_name=QUEUE, actor_name=ACTOR)
    for _ in range(count):
        broker.enqueue(Message(QUEUE, ACTOR, (), {}, {}))
    consumer = broker.consume(QUEUE, prefetch=count)
    assert isinstance(consumer, RedisConsumer)
    taken: list[Any] = []
    while len(taken) < count:
        message = next(consumer)
        if message is not None:
            taken.append(message)
    return client, consumer, taken


def backlog(client: redis.Redis, namespace: str) -> int:
    return int(client.hget(lua.backlog_key(namespace, QUEUE), ACTOR) or 0)


def test_concurrent_acks_are_grouped_and_delete_every_entry_once(
    redis_url: str, namespace: str
) -> None:
    client, consumer, taken = setup(redis_url, namespace, 64)
    calls: list[int] = []
    script = consumer._ack_script

    def counting(*, keys: list[Any], args: list[Any]) -> Any:
        calls.append(len(args) // 2)
        return script(keys=keys, args=args)

    consumer._ack_script = counting  # type: ignore[assignment]
    assert backlog(client, namespace) == 64
    start = threading.Barrier(8)

    def ack_some(part: list[Any]) -> None:
        start.wait()
        for message in part:
            consumer.ack(message)

    threads = [threading.Thread(target=ack_some, args=(taken[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(calls) == 64  # each entry deleted once
    print(f"64 acks from 8 threads in {len(calls)} ACK calls")
    assert client.llen(consumer.inflight) == 0
    assert client.hlen(consumer.bodies) == 0
    assert backlog(client, namespace) == 0
    assert not consumer.held and not consumer.to_ack and consumer.outstanding == 0


def test_a_failed_flush_keeps_the_entries_until_it_is_retried(
    redis_url: str, namespace: str
) -> None:
    client, consumer, taken = setup(redis_url, namespace, 3)
    script = consumer._ack_script
    failures = [redis.ConnectionError("connection lost")]

    def flaky(*, keys: list[Any], args: list[Any]) -> Any:
        if failures:
            raise failures.pop()
        return script(keys=keys, args=args)

    consumer._ack_script = flaky  # type: ignore[assignment]
    with pytest.raises(dramatiq.errors.ConnectionClosed):
        consumer.ack(taken[0])
    # Not deleted, still held: a crash now redelivers it; _reclaim leaves it alone.
    assert client.llen(consumer.inflight) == 3
    assert taken[0].entry in consumer.held
    consumer.ack(taken[0])  # dramatiq acks again: deleted once
    consumer.ack(taken[1])
    consumer.ack(taken[2])
    assert client.llen(consumer.inflight) == 0
    assert backlog(client, namespace) == 0
    consumer.close()
