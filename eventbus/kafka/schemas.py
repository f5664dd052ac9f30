"""Live schemas on Kafka: each typed handler's event schema, a record of one topic.

Kafka has no subscription store (a consumer group is the subscription), so the
schemas live in a topic of their own, :data:`DEFAULT_SCHEMA_TOPIC`, created with
one partition and ``cleanup.policy=compact`` (plain when the brokers refuse that
setting: reading does not rely on compaction)::

    key    "<service>|<handler>"
    value  {"service": ..., "handler": ..., "topic": ..., "hash": ..., "schema": {...}}
           or none (a tombstone: the handler is gone, or untyped now)

A worker (``consume=True``) writes, when it starts, a record for each of its
typed handlers whose stored one differs, and a tombstone for each handler of its
service stored before that it no longer has, or no longer types (a service's
workers all run the same handlers: each is a member of the service's consumer
group).  An untyped handler stores nothing: it accepts any payload.

Readers fold the topic from its start: the last record of a key wins, a
tombstone removes the key (:func:`fold`).  A publisher keeps one consumer on
the topic (:class:`SchemaTopicView`) and catches up to its end whenever the
check (:class:`~eventbus.contracts.live.LiveSchemaCheck`) has no fresh verdict
on a class and topic: at the first publish of each, then every
:data:`~eventbus.contracts.live.CACHE_TTL` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Any

from eventbus.contracts.live import SubscriberSchema, handler_schema
from eventbus.contracts.schemas import schema_hash

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from eventbus.kafka.config import KafkaConfig
    from eventbus.registry import HandlerSpec

logger = logging.getLogger(__name__)

#: The topic of the live subscriber schemas (next to ``eventbus.dlq-audit``).
DEFAULT_SCHEMA_TOPIC = "eventbus.schemas"
#: Seconds a read of the schema topic may take: past it, a publish in ``warn``
#: mode goes on unchecked and one in ``error`` mode is refused.
READ_TIMEOUT = 5.0
#: Milliseconds one fetch of the schema topic waits for records.
FETCH_WAIT_MS = 200
#: Kafka's error code of a topic that exists already (CreateTopics).
TOPIC_ALREADY_EXISTS = 36


def record_key(service: str, handler: str) -> str:
    """The key of a handler's record: ``<service>|<handler>``."""
    return f"{service}|{handler}"


def record_value(service: str, handler: str, topic: str, schema: dict[str, Any]) -> bytes:
    """The value of a handler's record (JSON)."""
    body = {
        "service": service,
        "handler": handler,
        "topic": topic,
        "hash": schema_hash(schema),
        "schema": schema,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def parse_value(value: bytes) -> SubscriberSchema | None:
    """The subscriber schema a record's value holds; None when it is not one."""
    try:
        data = json.loads(value)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    fields = [data.get(name) for name in ("service", "topic", "handler", "hash")]
    schema = data.get("schema")
    if not all(isinstance(f, str) for f in fields) or not isinstance(schema, dict):
        return None
    service, topic, handler, hash_ = (str(f) for f in fields)
    return SubscriberSchema(service, topic, handler, hash_, schema)


def fold(
    records: Iterable[tuple[bytes | None, bytes | None]],
    into: dict[str, SubscriberSchema],
    raw: dict[str, bytes] | None = None,
) -> None:
    """Apply the ``(key, value)`` records of the schema topic, in order, to ``into``
    (by key): the last record of a key wins, a tombstone (no value) removes it.  A
    record that is not a subscriber schema removes its key too (logged).  ``raw``,
    when given, keeps each key's value bytes alongside."""
    for key, value in records:
        if key is None:
            continue
        name = key.decode(errors="replace")
        schema = parse_value(value) if value is not None else None
        if schema is None:
            if value is not None:
                logger.warning("Schema topic record %r is not a subscriber schema; ignored.", name)
            into.pop(name, None)
            if raw is not None:
                raw.pop(name, None)
        else:
            into[name] = schema
            if raw is not None and value is not None:
                raw[name] = value


def by_topic(
    subscribers: Iterable[SubscriberSchema], topics: Collection[str]
) -> dict[str, list[SubscriberSchema]]:
    """``subscribers`` of ``topics``, by topic."""
    out: dict[str, list[SubscriberSchema]] = {}
    for sub in subscribers:
        if sub.topic in topics:
            out.setdefault(sub.topic, []).append(sub)
    return out


class SchemaTopicView:
    """The schema topic, folded (:func:`fold`), as one process sees it.

    One consumer (no group) reads the topic from its start; :meth:`catch_up`
    reads on to the end offsets of the moment.  For one event loop; close it with
    :meth:`close`.

    Parameters:
      config: Connection settings (the Kafka backend's).
      topic: The schema topic.
    """

    def __init__(self, config: KafkaConfig, topic: str = DEFAULT_SCHEMA_TOPIC) -> None:
        self.config = config
        self.topic = topic
        #: Subscriber schemas by record key.
        self.schemas: dict[str, SubscriberSchema] = {}
        #: Each key's record value, as stored.
        self.values: dict[str, bytes] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._partitions: list[TopicPartition] = []
        self._lock = asyncio.Lock()

    async def catch_up(self) -> dict[str, SubscriberSchema]:
        """Read the records written since the last call (all of them the first
        time) and return the schemas by key.  A topic that does not exist yet holds
        none.  Raises what the client raises (connection errors); callers bound
        the time it takes."""
        async with self._lock:
            consumer = self._consumer
            if consumer is None:
                consumer = self.config.consumer(
                    group_id=None, enable_auto_commit=False, auto_offset_reset="earliest"
                )
                try:
                    await consumer.start()
                except BaseException:
                    with contextlib.suppress(Exception):
                        await consumer.stop()
                    raise
                self._consumer = consumer
            if not self._partitions:
                await self._assign(consumer)
            if self._partitions:
                await self._read_to_end(consumer)
            return self.schemas

    async def _assign(self, consumer: AIOKafkaConsumer) -> None:
        from aiokafka import TopicPartition

        partitions = consumer.partitions_for_topic(self.topic)
        if not partitions:
            await consumer.topics()  # fresh metadata: the topic may be new
            partitions = consumer.partitions_for_topic(self.topic)
        if not partitions:
            return
        self._partitions = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        consumer.assign(self._partitions)
        await consumer.seek_to_beginning(*self._partitions)

    async def _read_to_end(self, consumer: AIOKafkaConsumer) -> None:
        ends = await consumer.end_offsets(self._partitions)
        while True:
            behind = [tp for tp in self._partitions if await consumer.position(tp) < ends[tp]]
            if not behind:
                return
            batches = await consumer.getmany(*behind, timeout_ms=FETCH_WAIT_MS)
            for tp in behind:
                fold(((r.key, r.value) for r in batches.get(tp, [])), self.schemas, self.values)

    async def close(self) -> None:
        """Stop the consumer (a later :meth:`catch_up` starts another, reading from
        the start again)."""
        consumer, self._consumer = self._consumer, None
        self._partitions = []
        self.schemas = {}
        self.values = {}
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()


async def read_schemas(config: KafkaConfig, topic: str = DEFAULT_SCHEMA_TOPIC) -> SchemaTopicView:
    """The schema topic read to its end once (a closed view: its ``schemas`` and
    ``values`` stay)."""
    view = SchemaTopicView(config, topic)
    try:
        await view.catch_up()
    finally:
        consumer, view._consumer = view._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()
    return view


async def ensure_topic(config: KafkaConfig, topic: str, timeout: float) -> None:
    """Create the schema topic (one partition, compacted; plain when the brokers
    refuse the setting) unless it exists."""
    from aiokafka.admin import NewTopic

    admin = config.admin(request_timeout_ms=int(timeout * 1000))
    await admin.start()
    try:
        for configs in ({"cleanup.policy": "compact"}, {}):
            response = await admin.create_topics([NewTopic(topic, 1, 1, topic_configs=configs)])
            code = response.topic_errors[0][1]
            if code in (0, TOPIC_ALREADY_EXISTS):
                return
            logger.info(
                "Kafka refused to create %s with %s (error %d)%s",
                topic,
                configs or "defaults",
                code,
                "; creating it without" if configs else "",
            )
    finally:
        await admin.close()


async def store_schemas(
    config: KafkaConfig,
    producer: AIOKafkaProducer,
    topic: str,
    service: str,
    handlers: Iterable[HandlerSpec],
    timeout: float,
) -> tuple[int, int]:
    """Bring ``service``'s records of the schema ``topic`` in line with
    ``handlers`` (a worker's, at start): a record for each typed handler whose
    stored one differs, a tombstone for each stored handler of ``service`` that is
    not a typed handler of ``handlers``.  Returns (records, tombstones) written."""
    view = await read_schemas(config, topic)
    wanted: dict[str, bytes] = {}
    for spec in handlers:
        schema = handler_schema(spec.event_type)
        if schema is not None:
            wanted[record_key(service, spec.name)] = record_value(
                service, spec.name, spec.topic, schema
            )
    writes: list[tuple[str, bytes | None]] = [
        (key, value) for key, value in sorted(wanted.items()) if view.values.get(key) != value
    ]
    gone = sorted(
        key for key, sub in view.schemas.items() if sub.service == service and key not in wanted
    )
    writes += [(key, None) for key in gone]
    if not writes:
        return 0, 0
    await ensure_topic(config, topic, timeout)
    futures = [await producer.send(topic, key=key.encode(), value=value) for key, value in writes]
    await asyncio.gather(*futures)
    return len(writes) - len(gone), len(gone)
