"""The fan-out script's grouped writes, against a real Redis server.

The publish script writes a call's events grouped by key (one HSET of the bodies
per queue, one RPUSH of the entry ids per list, the backlog counters of several
handlers of one queue in one HSET, the unrouted window's counters read in one
command).  These tests pin what that must keep: every queue gets its events once
and in publish order, the backlog counters are exact, the unrouted window's
byte count matches what it holds, and a call that fails on one corrupt key
writes nothing at all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis
from dramatiq import Message

from eventbus import BaseEvent, EventBus, PublishError
from eventbus.redis.scripts import WARM_FIELD, backlog_key, bodies_key, ready_key, topic_key
from eventbus.redis.subscriptions import register

pytest.register_assert_rewrite("tests.redis_support")  # before it is imported below
from tests.redis_support import queue_name  # noqa: E402

pytest_plugins = ["tests.redis_support"]
pytestmark = pytest.mark.timeout(60)

SERVICE = "tests"
SHARED = queue_name("shared")  # both handlers of topic A
B1, B2, C1, C2 = (queue_name(q) for q in ("b1", "b2", "c1", "c2"))
QUEUES = (SHARED, B1, B2, C1, C2)
A_ACTORS = ("batch.a:one", "batch.a:two")
HANDLERS = [
    ("batch.a", A_ACTORS[0], SHARED),
    ("batch.a", A_ACTORS[1], SHARED),
    ("batch.b", "batch.b:one", B1),
    ("batch.b", "batch.b:two", B2),
    ("batch.c", "batch.c:one", C1),
    ("batch.c", "batch.c:two", C2),
]
#: Which (queue, actor) gets the events of each topic.
ROUTES = {
    "batch.a": [(SHARED, A_ACTORS[0]), (SHARED, A_ACTORS[1])],
    "batch.b": [(B1, "batch.b:one"), (B2, "batch.b:two")],
    "batch.c": [(C1, "batch.c:one"), (C2, "batch.c:two")],
}


class A(BaseEvent):
    topic: str = "batch.a"
    n: int


class B(BaseEvent):
    topic: str = "batch.b"
    n: int


class C(BaseEvent):
    topic: str = "batch.c"
    n: int


class Nobody(BaseEvent):
    topic: str = "batch.nobody"
    n: int


def mixed(count: int, start: int = 0) -> list[BaseEvent]:
    """``count`` events spread over the three topics, numbered in publish order."""
    kinds: list[type[BaseEvent]] = [A, B, C]
    return [kinds[i % 3](n=i) for i in range(start, start + count)]  # type: ignore[call-arg]


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def subscribed(r: redis.Redis, namespace: str) -> None:
    register(r, namespace, SERVICE, HANDLERS)


@pytest.fixture
async def bus(make_redis_bus: Callable[..., EventBus], subscribed: None) -> AsyncIterator[EventBus]:
    bus = make_redis_bus()
    await bus.start()
    yield bus


def delivered(r: redis.Redis, namespace: str, queue: str) -> dict[str, list[int]]:
    """Per handler, the ``n`` of its messages in ``queue``, in queue order (the
    handlers of one topic take their turns in the order Redis lists them)."""
    out: dict[str, list[int]] = {}
    for entry in r.lrange(ready_key(namespace, queue), 0, -1):
        message = Message.decode(r.hget(bodies_key(namespace, queue), entry))
        out.setdefault(message.actor_name, []).append(message.args[0]["event"]["n"])
    return out


def expected(events: list[BaseEvent], queue: str) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for event in events:
        for q, actor in ROUTES[event.topic]:
            if q == queue:
                out.setdefault(actor, []).append(event.n)  # type: ignore[attr-defined]
    return out


def snapshot(r: redis.Redis, namespace: str) -> dict[bytes, object]:
    """Every key of the namespace and its content (but the publisher's note of the
    topics it publishes to, written apart from the script)."""
    out: dict[bytes, object] = {}
    for key in r.scan_iter(match=f"{namespace}:*"):
        if key == f"{namespace}:ptopics".encode():
            continue
        kind = r.type(key)
        if kind == b"list":
            out[key] = r.lrange(key, 0, -1)
        elif kind == b"hash":
            out[key] = r.hgetall(key)
        elif kind == b"set":
            out[key] = r.smembers(key)
        elif kind == b"zset":
            out[key] = r.zrange(key, 0, -1, withscores=True)
        else:
            out[key] = r.get(key)
    return out


def backlog(r: redis.Redis, namespace: str, queue: str, actor: str) -> int:
    return int(r.hget(backlog_key(namespace, queue), actor) or 0)


def kept_bytes_match(r: redis.Redis, namespace: str, topic: str) -> None:
    held = r.lrange(f"{namespace}:u:{topic}", 0, -1)
    recorded = int(r.hget(f"{namespace}:unrouted", f"b:{topic}") or 0)
    assert recorded == sum(len(entry) for entry in held)


@pytest.mark.parametrize("warming", [True, False], ids=["warming-up", "steady"])
async def test_many_events_to_three_topics_reach_every_queue_in_order_with_exact_counters(
    bus: EventBus, r: redis.Redis, namespace: str, warming: bool
) -> None:
    if not warming:
        for topic in ROUTES:
            r.hdel(topic_key(namespace, topic), WARM_FIELD)
    first, second = mixed(100), mixed(50, start=100)
    await bus.publish_many([*first, *[Nobody(n=i) for i in range(5)]])
    await bus.publish_many(second)
    for queue in QUEUES:
        assert delivered(r, namespace, queue) == expected(first + second, queue)
    for topic, routes in ROUTES.items():
        sent = sum(1 for e in first + second if e.topic == topic)
        for queue, actor in routes:
            assert backlog(r, namespace, queue, actor) == sent
    # The topic nobody subscribes keeps its events; a warming topic keeps all of its.
    assert r.llen(f"{namespace}:u:batch.nobody") == 5
    kept_bytes_match(r, namespace, "batch.nobody")
    for topic in ROUTES:
        held = r.llen(f"{namespace}:u:{topic}")
        assert held == (sum(1 for e in first + second if e.topic == topic) if warming else 0)
        kept_bytes_match(r, namespace, topic)


@pytest.mark.parametrize("warming", [True, False], ids=["warming-up", "steady"])
@pytest.mark.parametrize(
    "corruption",
    ["backlog of a shared queue", "bodies of the last topic", "ready list of the last topic"],
)
async def test_one_corrupt_key_fails_a_three_topic_call_with_nothing_written(
    bus: EventBus, r: redis.Redis, namespace: str, warming: bool, corruption: str
) -> None:
    if not warming:
        for topic in ROUTES:
            r.hdel(topic_key(namespace, topic), WARM_FIELD)
    await bus.publish_many(mixed(30))  # something there already, kept and queued
    if corruption == "backlog of a shared queue":  # the counters written in one HSET
        r.hset(backlog_key(namespace, SHARED), A_ACTORS[1], "many")
    elif corruption == "bodies of the last topic":
        r.delete(bodies_key(namespace, C2))
        r.set(bodies_key(namespace, C2), "x")
    else:
        r.delete(ready_key(namespace, C2))
        r.hset(ready_key(namespace, C2), "a", "b")
    before = snapshot(r, namespace)
    with pytest.raises(PublishError, match="Redis refused"):
        await bus.publish_many([*mixed(100, start=30), *[Nobody(n=i) for i in range(3)]])
    after = snapshot(r, namespace)
    assert after == before  # nothing of the call stays


async def test_delayed_events_of_a_shared_queue_wait_in_its_delayed_set_once_each(
    bus: EventBus, r: redis.Redis, namespace: str
) -> None:
    await bus.publish_many([A(n=i) for i in range(10)], delay=60)
    delayed = r.zrange(f"{namespace}:{{{SHARED}}}:d", 0, -1)
    assert len(delayed) == 20  # two handlers x ten events
    tokens = r.lrange(ready_key(namespace, SHARED), 0, -1)
    assert tokens and set(tokens) == {b""}  # wake-up tokens only, no entry ready yet
    assert r.hlen(bodies_key(namespace, SHARED)) == 20
    assert backlog(r, namespace, SHARED, A_ACTORS[0]) == 10
    assert backlog(r, namespace, SHARED, A_ACTORS[1]) == 10


async def test_one_call_keeping_events_of_thousands_of_topics_keeps_each(
    bus: EventBus, r: redis.Redis, namespace: str
) -> None:
    """The window's counters of every topic of a call are read and written in
    bounded commands: 3,000 topics nobody subscribes, one call."""

    class Many(BaseEvent):
        topic: str = "batch.many"
        n: int

    events = [Many(n=i, topic=f"batch.many.{i}") for i in range(3000)]
    await bus.publish_many(events)
    assert r.scard(f"{namespace}:utopics") == 3000
    for i in (0, 1499, 2999):
        assert r.llen(f"{namespace}:u:batch.many.{i}") == 1
        kept_bytes_match(r, namespace, f"batch.many.{i}")
    assert int(r.hget(f"{namespace}:unrouted", "seq") or 0) == 3000
