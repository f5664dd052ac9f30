"""Subscriptions stored in Redis: write, list and remove them.

A subscription is (service, topic, handler, queue).  Workers write theirs when
they boot (``eventbus subscriptions sync MODULES`` writes them without a worker);
they outlive the worker, so events published while no worker runs wait in the
subscription's queue.  A handler deleted from the code keeps its subscription
(and a growing backlog) until an operator removes it with
:func:`remove_subscription` (``eventbus subscriptions remove``), which
dead-letters whatever was still queued for it, with the reason.

Events published to a topic without a subscription *yet* are kept for a bounded
window (:class:`UnroutedRetention`) and handed to the subscription written next
(a fresh deploy whose web process starts first; a Redis restart without
persistence, after which every worker writes its subscriptions again).

The key layout is in :mod:`eventbus.redis.scripts`.
"""

from __future__ import annotations

from eventbus.extras import requires_extra

with requires_extra("redis", __name__):
    import redis

import contextlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from dataclasses import field as dataclass_field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from dramatiq import Message
from dramatiq.errors import DecodeError
from pydantic_core import to_json

import eventbus.redis.scripts as lua
from eventbus.config import (
    DEFAULT_REDIS_UNROUTED_MAX_BYTES,
    DEFAULT_REDIS_UNROUTED_MAX_EVENTS,
    DEFAULT_REDIS_UNROUTED_RETENTION,
    DEFAULT_REDIS_UNROUTED_WARMUP,
)
from eventbus.exceptions import ConfigurationError, EventBusError
from eventbus.fingerprint import mixed_code
from eventbus.middleware.dead_letters import build_failed_event
from eventbus.redis.schemas import schemas_key
from eventbus.redis.schemas import stored as stored_schema

if TYPE_CHECKING:
    from eventbus.dlq.store import DeadLetterStore

logger = logging.getLogger(__name__)

#: Entry bodies read per round trip while looking for a removed handler's events.
SCAN_CHUNK = 1000


@dataclass(frozen=True)
class UnroutedRetention:
    """How long and how much of a topic's events are kept for subscriptions not
    written yet (``EVENTBUS_REDIS_UNROUTED_*``).

    Attributes:
      seconds: Age after which an event that reached no subscription is dropped
        (counted, logged, shown by health).  0 keeps nothing: such events are
        dropped at once (and counted).
      max_events: Events kept per topic; the oldest go first.
      max_bytes: Bytes kept per topic; the oldest go first.
      warmup: Seconds after a topic's first subscription during which every event
        of the topic is kept, so that the subscriptions of other services written
        moments later (their workers come back one by one after a Redis restart)
        get the same events.  0: no warm-up.
    """

    seconds: float = DEFAULT_REDIS_UNROUTED_RETENTION
    max_events: int = DEFAULT_REDIS_UNROUTED_MAX_EVENTS
    max_bytes: int = DEFAULT_REDIS_UNROUTED_MAX_BYTES
    warmup: float = DEFAULT_REDIS_UNROUTED_WARMUP

    def __post_init__(self) -> None:
        numbers = (self.seconds, self.max_events, self.max_bytes, self.warmup)
        if not all(0 <= n < float("inf") for n in numbers):
            raise ConfigurationError(
                f"unrouted retention must be finite and >= 0, got {self!r}: set "
                "EVENTBUS_REDIS_UNROUTED_RETENTION / _MAX_EVENTS / _MAX_BYTES / _WARMUP"
            )

    def args(self) -> list[int]:
        """The retention (ms), most events, most bytes per topic and warm-up (ms),
        as the scripts take them."""
        return [
            int(self.seconds * 1000),
            int(self.max_events),
            int(self.max_bytes),
            int(self.warmup * 1000),
        ]


def log_dropped(pairs: list[Any], retention: UnroutedRetention) -> int:
    """Log the events a script dropped from the unrouted window ({topic, count, ...}
    as the scripts return them); returns how many."""
    total = 0
    for i in range(0, len(pairs) - 1, 2):
        topic = pairs[i].decode(errors="replace") if isinstance(pairs[i], bytes) else str(pairs[i])
        count = int(pairs[i + 1])
        total += count
        logger.warning(
            "%d unrouted event(s) of topic %s dropped: no subscription was written within "
            "the window (%gs, %d events, %d bytes per topic: EVENTBUS_REDIS_UNROUTED_RETENTION, "
            "_MAX_EVENTS, _MAX_BYTES). Subscribe their handlers (start a worker, or "
            "`eventbus subscriptions sync MODULES`) before publishing.",
            count,
            topic,
            retention.seconds,
            retention.max_events,
            retention.max_bytes,
        )
    return total


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
      code: The code fingerprints its live workers reported, each with those
        workers (``host:pid``): more than one is :attr:`mixed_code`.
      schema: The content hash of the event schema its handler validates into
        (:mod:`eventbus.redis.schemas`), or None for an untyped handler.
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
    code: dict[str, list[str]] = dataclass_field(default_factory=dict)
    schema: str | None = None

    @property
    def mixed_code(self) -> str | None:
        """Why its live workers look like different code (a rolling deploy, or two
        codebases under one service name), or None."""
        return mixed_code(self.code)

    @property
    def field(self) -> str:
        """Its name in Redis."""
        return lua.subscription_field(self.service, self.topic, self.handler)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict."""
        data = asdict(self)
        data["last_seen"] = self.last_seen.isoformat() if self.last_seen else None
        data["code_versions"] = len(self.code)
        data["mixed_code"] = self.mixed_code
        return data


def message_prefix(queue: str, actor: str) -> bytes:
    """The start of every message of ``actor`` on ``queue`` (the publish script
    appends the rest), JSON-escaped once here."""
    return to_json({"queue_name": queue, "actor_name": actor})[:-1]


def register(
    client: redis.Redis,
    namespace: str,
    service: str,
    handlers: Iterable[tuple[str, str, str]],
    *,
    retention: UnroutedRetention | None = None,
    again: bool = False,
    schemas: Mapping[str, dict[str, Any]] | None = None,
) -> list[str]:
    """Write the subscriptions of ``handlers`` ((topic, actor, queue) each) for
    ``service``; returns their names.  Idempotent; a handler that moved to another
    queue is re-pointed.

    A subscription that did not exist gets the events kept for its topic in the
    unrouted window (``retention``, default :class:`UnroutedRetention`), without a
    gap: a topic's first subscription gets those that reached no subscription;
    one written ``again`` because Redis forgot it (a restart without persistence)
    gets every event kept since, including those routed meanwhile to the
    subscriptions written again before it; any other (a handler deployed) starts
    from now.  Rewriting a subscription that exists hands it nothing.

    ``schemas`` (actor -> the JSON Schema its handler validates into; untyped
    handlers absent) are stored once by hash, and each subscription's record names
    its hash, in the same round trip (:mod:`eventbus.redis.schemas`).
    """
    retention = retention or UnroutedRetention()
    args: list[Any] = [namespace, service, *retention.args(), "1" if again else "0"]
    fields = []
    bodies: dict[str, str] = {}
    for topic, actor, queue in handlers:
        fields.append(lua.subscription_field(service, topic, actor))
        record: dict[str, str] = {"queue": queue}
        schema = schemas.get(actor) if schemas else None
        if schema is not None:
            record["schema"], bodies[record["schema"]] = stored_schema(schema)
        args += [topic, actor, queue, message_prefix(queue, actor), json.dumps(record)]
    if not fields:
        return fields
    subscribe = client.register_script(lua.SUBSCRIBE)
    if bodies:  # the schemas first, in the same round trip
        with client.pipeline(transaction=False) as pipe:
            client.register_script(lua.HSET_WHEN_FULL)(  # runs on a full Redis
                keys=[schemas_key(namespace)],
                args=[item for pair in bodies.items() for item in pair],
                client=pipe,
            )
            subscribe(args=args, client=pipe)
            _, (handed, dropped) = pipe.execute()
    else:
        handed, dropped = subscribe(args=args)
    log_dropped(dropped, retention)
    if handed:
        logger.info(
            "Handed %d event(s) published before their subscription existed to the new "
            "subscription(s) of service %s.",
            handed,
            service,
        )
    return fields


def sweep_unrouted(client: redis.Redis, namespace: str, retention: UnroutedRetention) -> int:
    """Drop the events of the unrouted window that no subscription can be handed
    any more (expired, beyond the bounds, or of a topic whose warm-up ended);
    returns how many of them reached no subscription (logged as dropped)."""
    script = client.register_script(lua.SWEEP)
    pairs = script(args=[namespace, *retention.args()[:3]])
    return log_dropped(pairs, retention)


@dataclass(frozen=True)
class UnroutedStats:
    """The unrouted window of a namespace.

    Attributes:
      waiting: Events kept for topics that have no subscription, by topic.
      dropped: Events that left the window without reaching a subscription, by topic.
      last_drop: When the last of them was dropped (None: never).
    """

    waiting: dict[str, int]
    dropped: dict[str, int]
    last_drop: datetime | None


def unrouted_stats(client: redis.Redis, namespace: str) -> UnroutedStats:
    """What the unrouted window of ``namespace`` holds and has dropped."""
    r: Any = client
    topics = sorted(t.decode() for t in r.smembers(f"{namespace}:utopics"))
    meta: dict[bytes, bytes] = r.hgetall(f"{namespace}:unrouted")
    waiting: dict[str, int] = {}
    if topics:
        with r.pipeline(transaction=False) as pipe:
            for topic in topics:
                pipe.hlen(lua.topic_key(namespace, topic))
                pipe.hexists(lua.topic_key(namespace, topic), lua.WARM_FIELD)
                pipe.llen(f"{namespace}:u:{topic}")
            replies = pipe.execute()
        for i, topic in enumerate(topics):
            subscribed = int(replies[3 * i]) - int(replies[3 * i + 1])
            if not subscribed and replies[3 * i + 2]:
                waiting[topic] = int(replies[3 * i + 2])
    dropped = {}
    for field, value in meta.items():
        if field.startswith(b"d:"):
            try:
                count = int(value)
            except ValueError:
                continue
            if count > 0:
                dropped[field[2:].decode(errors="replace")] = count
    last = None
    with contextlib.suppress(KeyError, ValueError, OverflowError, OSError):
        last = datetime.fromtimestamp(int(meta[b"dropped_at"]) / 1000, UTC)
    return UnroutedStats(waiting, dropped, last)


def _parse_field(field: str) -> tuple[str, str, str]:
    service, topic, actor = field.split("|", 2)
    return service, topic, actor


@dataclass(frozen=True)
class LiveWorker:
    """A worker process whose last heartbeat is recent enough.

    Attributes:
      id: Its worker id (``<host>.<pid>.<random>``).
      host, pid: Where it runs (from what it wrote; "" and 0 for a worker of an
        older version).
      queues: The queues it consumes.
      subscriptions: The subscriptions it serves.
      code: The code fingerprint of each subscription (:mod:`eventbus.fingerprint`).
      version: Its eventbus version.
      beat_age: Seconds since its last heartbeat (the Redis clock).
    """

    id: str
    host: str
    pid: int
    queues: tuple[str, ...]
    subscriptions: frozenset[str]
    code: dict[str, str]
    version: str
    beat_age: float

    @property
    def label(self) -> str:
        """``host:pid``, or its id when it did not say."""
        return f"{self.host}:{self.pid}" if self.host else self.id


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def worker_states(client: redis.Redis, namespace: str, timeout: float) -> list[LiveWorker]:
    """Every live worker (heartbeat at most ``timeout`` s old), sorted by host and pid."""
    script = client.register_script(lua.LIVE_WORKERS)
    reply = script(args=[namespace, int(timeout * 1000)])
    out = []
    for i in range(0, len(reply), 5):
        try:
            described = json.loads(_text(reply[i + 3]) or "{}")
        except ValueError:
            described = {}
        if not isinstance(described, dict):
            described = {}
        code = described.get("code")
        pid = described.get("pid")
        out.append(
            LiveWorker(
                id=_text(reply[i]),
                host=str(described.get("host") or ""),
                pid=pid if isinstance(pid, int) else 0,
                queues=tuple(q for q in _text(reply[i + 1]).split(",") if q),
                subscriptions=frozenset(line for line in _text(reply[i + 2]).split("\n") if line),
                code={str(k): str(v) for k, v in code.items()} if isinstance(code, dict) else {},
                version=str(described.get("version") or ""),
                beat_age=int(reply[i + 4]) / 1000,
            )
        )
    out.sort(key=lambda w: (w.host, w.pid, w.id))
    return out


def live_workers(client: redis.Redis, namespace: str, timeout: float) -> dict[str, set[str]]:
    """The subscriptions of every live worker (heartbeat at most ``timeout`` s old),
    by worker id."""
    return {w.id: set(w.subscriptions) for w in worker_states(client, namespace, timeout)}


def list_subscriptions(
    client: redis.Redis,
    namespace: str,
    heartbeat_timeout: float,
    workers: list[LiveWorker] | None = None,
) -> list[Subscription]:
    """Every subscription in ``namespace`` with its backlog, live workers (``workers``,
    default: read now), their code fingerprints and last heartbeat, sorted by
    service, topic and handler."""
    r: Any = client
    subs: dict[bytes, bytes] = r.hgetall(f"{namespace}:subs")
    if not subs:
        return []
    seen = dict(r.zrange(f"{namespace}:seen", 0, -1, withscores=True))
    if workers is None:
        workers = worker_states(client, namespace, heartbeat_timeout)
    rows = []
    schema_of: dict[str, str] = {}
    for raw_field, raw_value in subs.items():
        field = raw_field.decode()
        try:
            record = json.loads(raw_value)
            queue = str(record["queue"])
            service, topic, actor = _parse_field(field)
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(record.get("schema"), str):
            schema_of[field] = record["schema"]
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
        serving = [w for w in workers if field in w.subscriptions]
        live = len(serving)
        code: dict[str, list[str]] = {}
        for w in serving:
            code.setdefault(w.code.get(field, "unknown"), []).append(w.label)
        backlog = max(0, int(pending or 0))
        score = seen.get(field.encode())
        last = datetime.fromtimestamp(score / 1000, UTC) if score is not None else None
        out.append(
            Subscription(
                service,
                topic,
                actor,
                queue,
                backlog,
                int(held),
                waiting[queue],
                live,
                last,
                code,
                schema_of.get(field),
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
    client.register_script(lua.UNSUBSCRIBE)(args=[namespace, service, topic, handler])
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
    try:
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
    finally:
        # Off the backlog: what was dead-lettered (never below zero).  Events a
        # worker holds right now stay counted until it finishes them.
        if count:
            uncount = client.register_script(lua.UNCOUNT)
            uncount(keys=[lua.backlog_key(namespace, queue)], args=[handler, count])
    return count
