"""Live schemas on Redis: each typed subscription's event schema, stored with it.

A worker writing its subscriptions (:func:`eventbus.redis.subscriptions.register`)
stores, for each handler typed by an event class, that class's JSON Schema
(:func:`eventbus.contracts.schemas.event_schema`) once by content hash, and the
hash in the subscription's record::

    {ns}:schemas            HASH  schema hash -> canonical JSON of the schema
    {ns}:subs               HASH  "<service>|<topic>|<actor>" -> {"queue": ..., "schema": hash}

in the same round trip as the subscriptions.  An untyped handler stores no
schema (it accepts any payload); a subscription removed takes its hash with it.
Schemas no subscription names any more stay (a few kB each, content-addressed).

A publisher (:class:`PublishCheck`) reads the hashes of a topic's subscribers
with :data:`TOPIC_SCHEMAS` (one round trip), the schemas it does not hold yet
with one ``HMGET`` (a schema never changes under its hash), and keeps its
verdict per event class and topic for :data:`CACHE_TTL` seconds: publishes in
between pay a dict lookup per event, whether or not any subscriber stored a
schema.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from eventbus.config import SchemaCheckMode
from eventbus.contracts.live import LiveMismatch, SubscriberSchema, live_mismatches, refusal
from eventbus.contracts.schemas import canonical_json, event_schema, schema_hash
from eventbus.events import BaseEvent
from eventbus.metrics import CountsSchemaMismatches, MetricsCollector

logger = logging.getLogger(__name__)

#: Seconds a publisher keeps its verdict on an event class and topic before it
#: reads the topic's subscriber schemas again (a subscriber deployed with another
#: class is noticed within this time).
CACHE_TTL = 30.0

#: The schema hashes of a topic's subscriptions.  ARGV: namespace, topic.
#: Returns {"<service>|<actor>", hash, ...} for each subscription that stored one.
TOPIC_SCHEMAS = """
local ns, topic = ARGV[1], ARGV[2]
local out = {}
if redis.call('TYPE', ns .. ':t:' .. topic).ok ~= 'hash' then return out end
if redis.call('TYPE', ns .. ':subs').ok ~= 'hash' then return out end
for _, field in ipairs(redis.call('HKEYS', ns .. ':t:' .. topic)) do
  local bar = string.find(field, '|', 1, true)
  if bar then
    local record = redis.call('HGET', ns .. ':subs',
      string.sub(field, 1, bar - 1) .. '|' .. topic .. '|' .. string.sub(field, bar + 1))
    if record then
      local ok, data = pcall(cjson.decode, record)
      if ok and type(data) == 'table' and type(data.schema) == 'string' then
        out[#out + 1] = field
        out[#out + 1] = data.schema
      end
    end
  end
end
return out
"""


def schemas_key(namespace: str) -> str:
    """The hash of stored schemas (content hash -> canonical JSON)."""
    return f"{namespace}:schemas"


def handler_schema(event_type: type[BaseEvent] | None) -> dict[str, Any] | None:
    """The schema a handler typed by ``event_type`` stores; None for an untyped
    handler (no class, or ``BaseEvent`` itself: it accepts any payload)."""
    if event_type is None or event_type is BaseEvent:
        return None
    return event_schema(event_type)


def stored(schema: dict[str, Any]) -> tuple[str, str]:
    """``(hash, canonical JSON)`` of ``schema``, as Redis stores it."""
    return schema_hash(schema), canonical_json(schema)


def decode_schemas(hashes: Iterable[str], raw: Iterable[Any]) -> dict[str, dict[str, Any]]:
    """Stored schemas by hash (an ``HMGET`` reply); missing or corrupt ones left out."""
    out: dict[str, dict[str, Any]] = {}
    for h, value in zip(hashes, raw, strict=True):
        if value is None:
            continue
        try:
            schema = json.loads(value)
        except ValueError:
            logger.warning("Stored schema %s is not JSON; ignored.", h)
            continue
        if isinstance(schema, dict):
            out[h] = schema
    return out


def read_schemas(client: Any, namespace: str, hashes: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The stored schemas of ``hashes`` (a synchronous redis-py client; one ``HMGET``)."""
    wanted = sorted(set(hashes))
    if not wanted:
        return {}
    return decode_schemas(wanted, client.hmget(schemas_key(namespace), wanted))


#: What :class:`PublishCheck` calls to run a Redis command: ``(args) -> reply``.
Call = Callable[..., Awaitable[Any]]


class PublishCheck:
    """A publisher's check of event classes against live subscriber schemas.

    ``mode`` is ``EVENTBUS_SCHEMA_CHECK``.  :meth:`check` is called with every
    publish's events before they are sent; it reads Redis only for a (class,
    topic) it has no fresh verdict on.
    """

    def __init__(self, namespace: str, mode: SchemaCheckMode, ttl: float = CACHE_TTL) -> None:
        self.namespace = namespace
        self.mode = mode
        self.ttl = ttl
        self._metrics: MetricsCollector | None = None
        self._counter: CountsSchemaMismatches | None = None
        #: (class, topic) -> (monotonic expiry, mismatches).
        self._verdicts: dict[tuple[type[BaseEvent], str], tuple[float, list[LiveMismatch]]] = {}
        #: Stored schemas by hash (immutable: content-addressed).
        self._schemas: dict[str, dict[str, Any]] = {}
        #: Local class -> (schema, hash).
        self._local: dict[type[BaseEvent], tuple[dict[str, Any], str]] = {}
        #: (class, service, handler, subscriber hash) already logged.
        self._warned: set[tuple[type[BaseEvent], str, str, str]] = set()
        #: Reads under way, by (class, topic): concurrent first publishes share one.
        self._inflight: dict[
            tuple[type[BaseEvent], str],
            asyncio.Future[dict[tuple[type[BaseEvent], str], list[LiveMismatch]]],
        ] = {}

    @property
    def metrics(self) -> MetricsCollector | None:
        """The bus's metrics collector (set by the backend when bound); counted in
        when it implements :class:`~eventbus.metrics.CountsSchemaMismatches`."""
        return self._metrics

    @metrics.setter
    def metrics(self, collector: MetricsCollector | None) -> None:
        self._metrics = collector
        # Resolved once: a runtime protocol check costs ~25 us per call.
        self._counter = collector if isinstance(collector, CountsSchemaMismatches) else None

    async def check(self, events: Iterable[BaseEvent], script: Call, call: Call) -> None:
        """Check ``events``' classes (``script(TOPIC_SCHEMAS, args)`` and
        ``call(*command)`` reach Redis).  Logs and counts mismatches (``warn``) or
        raises :class:`~eventbus.contracts.live.SchemaMismatchError` (``error``)."""
        now = time.monotonic()
        verdicts = self._verdicts
        found: list[tuple[BaseEvent, list[LiveMismatch]]] = []
        stale: list[BaseEvent] = []
        for event in events:
            verdict = verdicts.get((type(event), event.topic))
            if verdict is None or verdict[0] <= now:
                stale.append(event)
            elif verdict[1]:
                found.append((event, verdict[1]))
        if stale:
            fresh = await self._single_flight(stale, script, call)
            for event in stale:
                mismatches = fresh.get((type(event), event.topic), [])
                if mismatches:
                    found.append((event, mismatches))
        if not found:
            return
        if self.mode == "error":
            raise refusal([m for _, ms in found for m in ms])
        counter = self._counter
        for event, mismatches in found:
            subscribers = set()
            for m in mismatches:
                key = (type(event), m.subscriber.service, m.subscriber.handler, m.subscriber.hash)
                if key not in self._warned:
                    self._warned.add(key)
                    logger.warning(
                        "Schema mismatch: %s. Its events will fail validation there and be "
                        "dead-lettered (EVENTBUS_SCHEMA_CHECK=error refuses such publishes).",
                        m,
                    )
                subscribers.add(m.subscriber.subscriber)
            if counter is not None:
                for subscriber in sorted(subscribers):
                    counter.inc_schema_mismatch(event.topic, subscriber)

    async def _single_flight(
        self, events: list[BaseEvent], script: Call, call: Call
    ) -> dict[tuple[type[BaseEvent], str], list[LiveMismatch]]:
        """:meth:`_refresh`, shared: concurrent first publishes of a class and topic
        wait for the one read already under way instead of each asking Redis."""
        keys = {(type(event), event.topic) for event in events}
        pending = [self._inflight[k] for k in keys if k in self._inflight]
        if pending and len(pending) == len(keys) and len(set(map(id, pending))) == 1:
            return await asyncio.shield(pending[0])
        future: asyncio.Future[dict[tuple[type[BaseEvent], str], list[LiveMismatch]]]
        future = asyncio.get_running_loop().create_future()
        for key in keys:
            self._inflight[key] = future
        try:
            fresh = await self._refresh(events, script, call)
        except BaseException as exc:
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: no "never retrieved" warning if unshared
            raise
        else:
            future.set_result(fresh)
            return fresh
        finally:
            for key in keys:
                if self._inflight.get(key) is future:
                    del self._inflight[key]

    async def _refresh(
        self, events: list[BaseEvent], script: Call, call: Call
    ) -> dict[tuple[type[BaseEvent], str], list[LiveMismatch]]:
        """Read the subscriber schemas of ``events``' topics; record and return the
        verdict of each (class, topic)."""
        topics = sorted({event.topic for event in events})
        subscribers: dict[str, list[tuple[str, str, str]]] = {}
        for topic in topics:
            reply = await script(TOPIC_SCHEMAS, [self.namespace, topic])
            rows = []
            for i in range(0, len(reply) - 1, 2):
                field = _text(reply[i])
                service, _, handler = field.partition("|")
                rows.append((service, handler, _text(reply[i + 1])))
            subscribers[topic] = rows
        missing = sorted(
            {h for rows in subscribers.values() for *_, h in rows} - set(self._schemas)
        )
        if missing:
            raw = await call("HMGET", schemas_key(self.namespace), *missing)
            self._schemas.update(decode_schemas(missing, raw))
        expiry = time.monotonic() + self.ttl
        out: dict[tuple[type[BaseEvent], str], list[LiveMismatch]] = {}
        for event in events:
            cls, topic = type(event), event.topic
            if (cls, topic) in out:
                continue
            mismatches: list[LiveMismatch] = []
            rows = subscribers[topic]
            if rows and cls is not BaseEvent:
                writer = self._local.get(cls)
                if writer is None:
                    schema = event_schema(cls)
                    writer = self._local[cls] = (schema, schema_hash(schema))
                readers = [
                    SubscriberSchema(service, topic, handler, h, self._schemas[h])
                    for service, handler, h in rows
                    if h in self._schemas and h != writer[1]  # the same class: compatible
                ]
                mismatches = live_mismatches(cls.__name__, writer[0], readers)
            out[cls, topic] = mismatches
            self._verdicts[cls, topic] = (expiry, mismatches)
        return out


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
