"""The Redis fan-out script is all-or-none in fact, against a real Redis server.

A script that fails halfway keeps the writes it made before the error (Redis does
not roll scripts back), so a caller who retries delivers twice.  These tests
corrupt one subscription's keys and check that nothing of a failing call is
written, that one bad topic in a group commit fails only its own callers, that a
large ``publish_many`` goes out in bounded calls and stays all-or-none, that a
timeout after the request was sent says the events may have been published, and
that envelope bytes which are not one JSON object never reach a message.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import pytest
import redis
from dramatiq import Message

import eventbus.keys as keys
from eventbus import BaseEvent, EventBus, PublishError
from eventbus.backends.base import OutgoingEvent
from eventbus.redis.backend import RedisBackend
from eventbus.redis.resp import Command, RespClient, encode_command
from eventbus.redis.scripts import WARM_FIELD, backlog_key, bodies_key, ready_key, topic_key
from eventbus.redis.subscriptions import register
from tests import redis_handlers as h

pytest.register_assert_rewrite("tests.redis_support")  # before it is imported below
from tests.redis_support import queue_name  # noqa: E402

pytest_plugins = ["tests.redis_support"]
pytestmark = pytest.mark.timeout(60)

SERVICE = "tests"
FIRST = queue_name()
SECOND = queue_name(h.OTHER_QUEUE)
RECORD_ACTOR = f"{h.RECORD}:tests.redis_handlers.record"
ASYNC_ACTOR = f"{h.RECORD}:tests.redis_handlers.record_async"
#: Topic of the second subscription set (one handler, its own queue).
SOLO = "redis.test.solo"
SOLO_QUEUE = queue_name("solo")


class Solo(BaseEvent):
    topic: str = SOLO
    n: int


class Padded(BaseEvent):
    """A large event of RECORD's topic."""

    topic: str = h.RECORD
    n: int
    pad: str


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def subscribed(r: redis.Redis, namespace: str) -> None:
    """Two subscriptions of RECORD (two queues) and one of SOLO, as workers write them."""
    register(
        r,
        namespace,
        SERVICE,
        [(h.RECORD, RECORD_ACTOR, FIRST), (h.RECORD, ASYNC_ACTOR, SECOND)],
    )
    register(r, namespace, SERVICE, [(SOLO, RECORD_ACTOR, SOLO_QUEUE)])


@pytest.fixture
async def bus(make_redis_bus: Callable[..., EventBus], subscribed: None) -> AsyncIterator[EventBus]:
    bus = make_redis_bus()
    await bus.start()
    yield bus


def stored(r: redis.Redis, namespace: str, queue: str) -> list[int]:
    """The ``n`` of every message of ``queue``, in queue order."""
    out = []
    for entry in r.lrange(ready_key(namespace, queue), 0, -1):
        body = r.hget(bodies_key(namespace, queue), entry)
        out.append(Message.decode(body).args[0]["event"]["n"])
    return out


def nothing_written(r: redis.Redis, namespace: str) -> bool:
    return not any(
        r.exists(ready_key(namespace, q), bodies_key(namespace, q))
        for q in (FIRST, SECOND, SOLO_QUEUE)
    )


CORRUPTIONS = {
    # The bodies hash of a queue replaced by a string.
    "bodies key of the wrong type": lambda r, ns, q, actor: r.set(bodies_key(ns, q), "x"),
    # The ready list replaced by a hash.
    "ready key of the wrong type": lambda r, ns, q, actor: r.hset(ready_key(ns, q), "a", "b"),
    # A backlog counter that is not an integer (HINCRBY fails on it).
    "backlog counter not an integer": lambda r, ns, q, actor: r.hset(
        backlog_key(ns, q), actor, "many"
    ),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
@pytest.mark.parametrize("queue", [FIRST, SECOND])
async def test_a_corrupt_key_of_one_subscription_fails_the_call_before_any_write(
    bus: EventBus, r: redis.Redis, namespace: str, corruption: str, queue: str
) -> None:
    """Whichever of the two subscriptions is corrupt (the script visits them in
    order), nothing of the call is written: a retry cannot duplicate."""
    actor = RECORD_ACTOR if queue == FIRST else ASYNC_ACTOR
    CORRUPTIONS[corruption](r, namespace, queue, actor)
    with pytest.raises(PublishError, match="Redis refused"):
        await bus.publish_many([h.Numbered(n=1), h.Numbered(n=2)])
    other = SECOND if queue == FIRST else FIRST
    assert stored(r, namespace, other) == []
    assert r.hget(
        backlog_key(namespace, other), RECORD_ACTOR if other == FIRST else ASYNC_ACTOR
    ) in (
        None,
        b"0",
    )


def left_behind(r: redis.Redis, namespace: str, queue: str, actor: str) -> list[str]:
    """What of a failed call stayed in ``queue``'s keys (those of the right type)."""
    left = []
    for key, kind, size in (
        (ready_key(namespace, queue), b"list", r.llen),
        (bodies_key(namespace, queue), b"hash", r.hlen),
    ):
        if r.type(key) in (kind, b"none") and size(key):
            left.append(key)
    counter = backlog_key(namespace, queue)
    if r.type(counter) in (b"hash", b"none") and r.hget(counter, actor) not in (
        None,
        b"0",
        b"many",
    ):
        left.append(f"{counter} {actor}")
    return left


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
@pytest.mark.parametrize("queue", [FIRST, SECOND])
async def test_one_event_past_the_warm_up_is_all_or_none_too(
    bus: EventBus, r: redis.Redis, namespace: str, corruption: str, queue: str
) -> None:
    """A single event to a routed topic past its warm-up takes the script's short
    path (the steady state of a service publishing one by one): a write that fails
    there undoes the ones before it, in both subscriptions."""
    r.hdel(topic_key(namespace, h.RECORD), WARM_FIELD)
    actor = RECORD_ACTOR if queue == FIRST else ASYNC_ACTOR
    CORRUPTIONS[corruption](r, namespace, queue, actor)
    with pytest.raises(PublishError, match=r"Redis refused.*undone"):
        await bus.publish(h.Numbered(n=1))
    assert left_behind(r, namespace, FIRST, RECORD_ACTOR) == []
    assert left_behind(r, namespace, SECOND, ASYNC_ACTOR) == []


async def test_one_event_past_the_warm_up_reaches_every_subscription(
    bus: EventBus, r: redis.Redis, namespace: str
) -> None:
    r.hdel(topic_key(namespace, h.RECORD), WARM_FIELD)
    await bus.publish(h.Numbered(n=7))
    await bus.publish(h.Numbered(n=8))
    assert stored(r, namespace, FIRST) == [7, 8]
    assert stored(r, namespace, SECOND) == [7, 8]
    assert r.hget(backlog_key(namespace, FIRST), RECORD_ACTOR) == b"2"
    assert r.hget(backlog_key(namespace, SECOND), ASYNC_ACTOR) == b"2"


async def test_a_malformed_subscription_fails_the_call_before_any_write(
    bus: EventBus, r: redis.Redis, namespace: str
) -> None:
    # A third subscription of RECORD whose value is not "<queue>\n<message prefix>":
    # the script used to fail on it after writing the other two.
    r.hset(topic_key(namespace, h.RECORD), f"{SERVICE}|broken", "no newline here")
    with pytest.raises(PublishError, match="Redis refused"):
        await bus.publish(h.Numbered(n=1))
    assert nothing_written(r, namespace)


async def test_one_bad_topic_in_a_group_commit_fails_only_its_own_callers(
    bus: EventBus, r: redis.Redis, namespace: str
) -> None:
    r.set(bodies_key(namespace, SOLO_QUEUE), "corrupt")  # SOLO's only subscription is broken
    good = [h.Numbered(n=i) for i in range(30)]
    bad = [Solo(n=i) for i in range(10)]
    events: list[BaseEvent] = []
    for i, event in enumerate(good):  # interleaved: every group round holds both kinds
        events.append(event)
        if i < len(bad):
            events.append(bad[i])
    outcomes = await asyncio.gather(*(bus.publish(e) for e in events), return_exceptions=True)
    failed_good = [o for e, o in zip(events, outcomes, strict=True) if o and e in good]
    failed_bad = [o for e, o in zip(events, outcomes, strict=True) if e in bad]
    assert failed_good == []  # an unrelated caller never fails for another's topic
    assert all(isinstance(o, PublishError) for o in failed_bad), failed_bad
    assert sorted(stored(r, namespace, FIRST)) == list(range(30))  # each exactly once
    assert sorted(stored(r, namespace, SECOND)) == list(range(30))


#: Bytes above which a test expects a call to have been split (the bound plus
#: room for the command framing).
SPLIT_LIMIT = 9 * 1024 * 1024


@pytest.fixture
def sent_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The bytes of every call the publishing client sends."""
    sizes: list[int] = []
    original = RespClient.execute

    async def spy(self: RespClient, commands: Sequence[Command]) -> list[Any]:
        sizes.append(sum(len(encode_command(c)) for c in commands))
        return await original(self, commands)

    monkeypatch.setattr(RespClient, "execute", spy)
    return sizes


async def test_a_large_publish_many_goes_out_in_bounded_calls(
    bus: EventBus, r: redis.Redis, namespace: str, sent_sizes: list[int]
) -> None:
    """~14 MiB in one publish_many: no call carries it all (the issue: 300 x 1 MiB
    timed out although every event was stored), and every event arrives once."""
    events = [Padded(n=i, pad="x" * (900 * 1024)) for i in range(16)]
    await bus.publish_many(events)
    assert sent_sizes and max(sent_sizes) < SPLIT_LIMIT, sent_sizes
    assert stored(r, namespace, FIRST) == list(range(16))
    assert stored(r, namespace, SECOND) == list(range(16))
    assert not list(r.scan_iter(match=f"{namespace}:stage:*"))  # the commit took them


async def test_a_large_publish_many_is_still_all_or_none(
    bus: EventBus, r: redis.Redis, namespace: str, sent_sizes: list[int]
) -> None:
    r.set(bodies_key(namespace, SECOND), "corrupt")
    events = [Padded(n=i, pad="x" * (900 * 1024)) for i in range(16)]
    with pytest.raises(PublishError, match="nothing was published"):
        await bus.publish_many(events)
    assert max(sent_sizes) < SPLIT_LIMIT
    assert stored(r, namespace, FIRST) == []
    staged = list(r.scan_iter(match=f"{namespace}:stage:*"))
    assert all(r.pttl(key) > 0 for key in staged)  # leftovers expire on their own


class ReplyDroppingProxy:
    """Forwards requests to Redis and throws its replies away: the events are
    stored, the publisher never hears so."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)

        async def pump() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)
                await up_writer.drain()

        async def swallow() -> None:
            while await up_reader.read(65536):
                pass

        try:
            await asyncio.gather(pump(), swallow())
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            up_writer.close()
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1)


async def test_a_timeout_after_the_request_was_sent_says_the_events_may_have_been_published(
    make_redis_bus: Callable[..., EventBus],
    subscribed: None,
    r: redis.Redis,
    namespace: str,
    redis_url: str,
) -> None:
    port = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs["port"]
    proxy = ReplyDroppingProxy(int(port))
    proxy_port = await proxy.start()
    try:
        bus = make_redis_bus(url=f"redis://127.0.0.1:{proxy_port}/0", publish_timeout=0.3)
        await bus.start()
        with pytest.raises(PublishError) as raised:
            await bus.publish(h.Numbered(n=7))
        message = str(raised.value)
        assert "may have been published" in message, message
        assert "nothing" not in message
        # And indeed it was: the message says the truth.
        await asyncio.sleep(0)
        assert stored(r, namespace, FIRST) == [7]
    finally:
        await proxy.stop()


async def test_a_publish_that_never_reached_redis_says_nothing_was_published(
    make_redis_bus: Callable[..., EventBus],
) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    bus = make_redis_bus(url=f"redis://127.0.0.1:{closed}/0")
    await bus.start()
    with pytest.raises(PublishError, match="nothing was published"):
        await bus.publish(h.Numbered(n=1))


INJECTIONS = [
    # Closes the args array and sets another actor: json.loads keeps the last key.
    b'{"event":{}}],"actor_name":"tests.redis_handlers.slow","x":[',
    b'{"a":1} ',  # fine: whitespace around one object
    b"[1,2]",  # not an object
    b'{"a":1}{"b":2}',  # two documents
    b'{"a":NaN}',  # not JSON
    b'{"a":"\xff"}',  # not UTF-8
    b"",
]


@pytest.mark.parametrize("envelope", INJECTIONS)
async def test_envelope_bytes_must_be_one_json_object_before_they_reach_a_message(
    bus: EventBus, r: redis.Redis, namespace: str, envelope: bytes
) -> None:
    """The outbox relay hands the backend envelope bytes read from a table; a
    crafted row must not be able to add message fields."""
    event = h.Numbered(n=1)
    outgoing = OutgoingEvent(
        event=event, envelope=envelope, options={keys.TOPIC: h.RECORD}, correlation_id="c"
    )
    backend = bus.backend
    assert isinstance(backend, RedisBackend)
    if envelope.strip() == b'{"a":1}':
        await backend.publish([outgoing])
        [body] = r.hvals(bodies_key(namespace, FIRST))
        message = Message.decode(body)
        assert message.actor_name == RECORD_ACTOR and message.args == ({"a": 1},)
        return
    with pytest.raises(PublishError, match="not one JSON object"):
        await backend.publish(
            [
                outgoing,
                OutgoingEvent(
                    event=event,
                    envelope=b'{"fine":1}',
                    options={keys.TOPIC: h.RECORD},
                    correlation_id="c",
                ),
            ]
        )
    assert nothing_written(r, namespace)
