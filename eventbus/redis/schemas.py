"""Live schemas on Redis: each typed subscription's event schema, stored with it.

A worker writing its subscriptions (:func:`eventbus.redis.subscriptions.register`)
stores, for each handler typed by an event class, that class's JSON Schema
with its version and upcasters (:func:`eventbus.contracts.live.live_schema`)
once by content hash, and the
hash in the subscription's record::

    {ns}:schemas            HASH  schema hash -> canonical JSON of the schema
    {ns}:subs               HASH  "<service>|<topic>|<actor>" -> {"queue": ..., "schema": hash}

in the same round trip as the subscriptions.  An untyped handler stores no
schema (it accepts any payload); a subscription removed takes its hash with it.
Schemas no subscription names any more stay (a few kB each, content-addressed).

A publisher (:class:`PublishCheck`) reads the hashes of a topic's subscribers
with :data:`TOPIC_SCHEMAS` (one round trip), the schemas it does not hold yet
with one ``HMGET`` (a schema never changes under its hash), and keeps its
verdict per event class and topic for
:data:`~eventbus.contracts.live.CACHE_TTL` seconds: publishes in
between pay a dict lookup per event, whether or not any subscriber stored a
schema.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from eventbus.config import SchemaCheckMode
from eventbus.contracts.live import (
    CACHE_TTL,
    LiveSchemaCheck,
    SubscriberSchema,
    handler_schema,
)
from eventbus.contracts.schemas import canonical_json, schema_hash
from eventbus.events import BaseEvent

logger = logging.getLogger(__name__)

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


class PublishCheck(LiveSchemaCheck):
    """A publisher's check of event classes against live subscriber schemas on Redis.

    ``mode`` is ``EVENTBUS_SCHEMA_CHECK``.  :meth:`check` is called with every
    publish's events before they are sent; it reads Redis only for a (class,
    topic) it has no fresh verdict on (:class:`~eventbus.contracts.live.LiveSchemaCheck`).
    """

    def __init__(self, namespace: str, mode: SchemaCheckMode, ttl: float = CACHE_TTL) -> None:
        super().__init__(mode, ttl, logger)
        self.namespace = namespace
        #: Stored schemas by hash (immutable: content-addressed).
        self._schemas: dict[str, dict[str, Any]] = {}

    async def check(self, events: Iterable[BaseEvent], script: Call, call: Call) -> None:
        """Check ``events``' classes (``script(TOPIC_SCHEMAS, args)`` and
        ``call(*command)`` reach Redis).  Logs and counts mismatches (``warn``) or
        raises :class:`~eventbus.contracts.live.SchemaMismatchError` (``error``)."""

        async def read(topics: list[str]) -> dict[str, list[SubscriberSchema]]:
            return await self._subscribers(topics, script, call)

        await self.check_with(events, read)

    async def _subscribers(
        self, topics: list[str], script: Call, call: Call
    ) -> dict[str, list[SubscriberSchema]]:
        """The stored schemas of ``topics``' subscribers: one script call per topic,
        one ``HMGET`` for the schemas not held yet."""
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
        return {
            topic: [
                SubscriberSchema(service, topic, handler, h, self._schemas[h])
                for service, handler, h in rows
                if h in self._schemas
            ]
            for topic, rows in subscribers.items()
        }


__all__ = [
    "CACHE_TTL",
    "TOPIC_SCHEMAS",
    "PublishCheck",
    "decode_schemas",
    "handler_schema",
    "read_schemas",
    "schemas_key",
    "stored",
]


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
