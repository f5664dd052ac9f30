"""Subscriptions stored in Redis: write, list and remove them.

A subscription is (service, topic, handler, queue).  Workers write theirs when
they boot (``eventbus subscriptions sync MODULES`` writes them without a worker);
they outlive the worker, so events published while no worker runs wait in the
subscription's queue.  A handler deleted from the code keeps its subscription
(and a growing backlog) until an operator removes it with
:func:`remove_subscription` (``eventbus subscriptions remove``), which
dead-letters whatever was still queued for it, with the reason.

The key layout is in :mod:`eventbus.backends.redis_scripts`.
"""

from __future__ import annotations

from ..extras import requires_extra

with requires_extra("redis", __name__):
    import redis

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from dramatiq import Message
from dramatiq.errors import DecodeError
from pydantic_core import to_json

from ..exceptions import EventBusError
from ..middleware.dead_letters import build_failed_event
from . import redis_scripts as lua

if TYPE_CHECKING:
    from ..dlq import DeadLetterStore

#: Entry bodies read per round trip while looking for a removed handler's events.
SCAN_CHUNK = 1000


class SubscriptionRemoved(EventBusError):
    """The dead-letter reason of events still queued when their subscription was removed."""


@dataclass(frozen=True)
class Subscription:
    """One subscription and its state.

    Attributes:
      service: The service whose workers run the handler.
      topic: The topic it receives.
      handler: The handler's actor name.
      queue: The Redis queue (``<service>.<queue>``).
      backlog: Its events not finished yet (ready, delayed, parked or being handled).
      parked: Those parked by workers that do not have the handler.
      waiting: Events ready or delayed in its queue (for every handler of the queue).
      live_workers: Live worker processes that have the handler.
      last_seen: The last heartbeat of a worker that had the handler.
    """

    service: str
    topic: str
    handler: str
    queue: str
    backlog: int = 0
    parked: int = 0
    waiting: int = 0
    live_workers: int = 0
    last_seen: datetime | None = None

    @property
    def field(self) -> str:
        """Its name in Redis."""
        return lua.subscription_field(self.service, self.topic, self.handler)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict."""
        data = asdict(self)
        data["last_seen"] = self.last_seen.isoformat() if self.last_seen else None
        return data


def message_prefix(queue: str, actor: str) -> bytes:
    """The start of every message of ``actor`` on ``queue`` (the publish script
    appends the rest), JSON-escaped once here."""
    return to_json({"queue_name": queue, "actor_name": actor})[:-1]


def register(
    client: redis.Redis, namespace: str, service: str, handlers: Iterable[tuple[str, str, str]]
) -> list[str]:
    """Write the subscriptions of ``handlers`` ((topic, actor, queue) each) for
    ``service``; returns their names.  Idempotent; a handler that moved to another
    queue is re-pointed."""
    r: Any = client
    now = int(time.time() * 1000)
    fields = []
    with r.pipeline(transaction=True) as pipe:
        for topic, actor, queue in handlers:
            field = lua.subscription_field(service, topic, actor)
            fields.append(field)
            value = queue.encode() + b"\n" + message_prefix(queue, actor)
            pipe.hset(lua.topic_key(namespace, topic), f"{service}|{actor}", value)
            pipe.hset(f"{namespace}:subs", field, json.dumps({"queue": queue}))
            pipe.sadd(f"{namespace}:queues", queue)
            pipe.zadd(f"{namespace}:seen", {field: now})
        pipe.execute()
    return fields


def _parse_field(field: str) -> tuple[str, str, str]:
    service, topic, actor = field.split("|", 2)
    return service, topic, actor


def live_workers(client: redis.Redis, namespace: str, timeout: float) -> dict[str, set[str]]:
    """The subscriptions of every live worker (heartbeat at most ``timeout`` s old),
    by worker id."""
    script = client.register_script(lua.LIVE_WORKERS)
    reply = script(args=[namespace, int(timeout * 1000)])
    out: dict[str, set[str]] = {}
    for i in range(0, len(reply), 3):
        out[reply[i].decode()] = {line for line in reply[i + 2].decode().split("\n") if line}
    return out


def list_subscriptions(
    client: redis.Redis, namespace: str, heartbeat_timeout: float
) -> list[Subscription]:
    """Every subscription in ``namespace`` with its backlog, live workers and last
    heartbeat, sorted by service, topic and handler."""
    r: Any = client
    subs: dict[bytes, bytes] = r.hgetall(f"{namespace}:subs")
    if not subs:
        return []
    seen = dict(r.zrange(f"{namespace}:seen", 0, -1, withscores=True))
    workers = live_workers(client, namespace, heartbeat_timeout)
    rows = []
    for raw_field, raw_value in subs.items():
        field = raw_field.decode()
        try:
            queue = str(json.loads(raw_value)["queue"])
            service, topic, actor = _parse_field(field)
        except (ValueError, KeyError, TypeError):
            continue
        rows.append((field, service, topic, actor, queue))
    queues = sorted({row[4] for row in rows})
    with r.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.llen(lua.ready_key(namespace, queue))
            pipe.zcard(lua.delayed_key(namespace, queue))
        for _, _, _, actor, queue in rows:
            pipe.llen(lua.parked_key(namespace, queue, actor))
            pipe.hget(lua.backlog_key(namespace, queue), actor)
        lengths = pipe.execute()
    waiting = {
        queue: int(lengths[2 * i]) + int(lengths[2 * i + 1]) for i, queue in enumerate(queues)
    }
    per_row = lengths[2 * len(queues) :]
    out = []
    for i, (field, service, topic, actor, queue) in enumerate(rows):
        held, pending = per_row[2 * i], per_row[2 * i + 1]
        live = sum(1 for fields in workers.values() if field in fields)
        backlog = max(0, int(pending or 0))
        score = seen.get(field.encode())
        last = datetime.fromtimestamp(score / 1000, UTC) if score is not None else None
        out.append(
            Subscription(
                service, topic, actor, queue, backlog, int(held), waiting[queue], live, last
            )
        )
    out.sort(key=lambda s: (s.service, s.topic, s.handler))
    return out


def remove_subscription(
    client: redis.Redis,
    namespace: str,
    service: str,
    topic: str,
    handler: str,
    store: DeadLetterStore | None,
) -> int | None:
    """Remove a subscription; dead-letter what waits for it (ready, delayed or
    parked; events being handled right now finish).  Returns how many events were
    dead-lettered, or None when no such subscription exists."""
    r: Any = client
    field = lua.subscription_field(service, topic, handler)
    raw = r.hget(f"{namespace}:subs", field)
    if raw is None:
        return None
    queue = str(json.loads(raw)["queue"])
    with r.pipeline(transaction=True) as pipe:
        pipe.hdel(lua.topic_key(namespace, topic), f"{service}|{handler}")
        pipe.hdel(f"{namespace}:subs", field)
        pipe.zrem(f"{namespace}:seen", field)
        pipe.execute()
    ready_k = lua.ready_key(namespace, queue)
    delayed_k = lua.delayed_key(namespace, queue)
    bodies_k = lua.bodies_key(namespace, queue)
    parked_k = lua.parked_key(namespace, queue, handler)
    candidates: list[bytes] = list(r.lrange(parked_k, 0, -1))
    prefix = message_prefix(queue, handler)
    waiting = [e for e in r.lrange(ready_k, 0, -1) if e]
    waiting += r.zrange(delayed_k, 0, -1)
    for i in range(0, len(waiting), SCAN_CHUNK):
        chunk = waiting[i : i + SCAN_CHUNK]
        bodies = r.hmget(bodies_k, chunk)
        candidates += [e for e, b in zip(chunk, bodies, strict=True) if b and b.startswith(prefix)]
    take = r.register_script(lua.TAKE)
    reason = SubscriptionRemoved(
        f"subscription of handler {handler} to topic {topic} (service {service}) was removed "
        "before this event was handled"
    )
    count = 0
    for entry in candidates:
        body = take(keys=[ready_k, delayed_k, parked_k, bodies_k], args=[entry])
        if not body:
            continue  # taken by a worker meanwhile
        try:
            message: Message[Any] = Message.decode(body)
        except DecodeError:
            message = Message(
                queue_name=queue,
                actor_name=handler,
                args=(body.decode("utf-8", errors="replace"),),
                kwargs={},
                options={},
                message_id=entry.decode(),
            )
        if store is not None:
            try:
                store.add(build_failed_event(message, reason))
            except Exception:
                # Keep the event rather than lose it: back where it waited.
                r.hset(bodies_k, entry, body)
                r.rpush(parked_k, entry)
                raise
        count += 1
    r.hdel(lua.backlog_key(namespace, queue), handler)
    return count
