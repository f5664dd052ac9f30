"""The console's audit trail on Kafka: the records of one topic next to the DLQ topics.

:class:`~eventbus.kafka.dlq.KafkaDeadLetterStore` carries one (``store.audit``,
the :class:`~eventbus.dlq.audit_log.AuditedStore` protocol), on
:data:`DEFAULT_AUDIT_TOPIC`: create that topic with one partition and the
retention you want for an audit trail (e.g. ``retention.ms=-1``).  Another topic::

    store = KafkaDeadLetterStore(config, audit=KafkaAuditLog(config, topic="ops.audit"))
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from eventbus.dlq.audit_log import AuditEntry
from eventbus.dlq.records import refuse_constants

if TYPE_CHECKING:
    from eventbus.kafka.config import KafkaConfig

#: The Kafka topic of the audit trail.
DEFAULT_AUDIT_TOPIC = "eventbus.dlq-audit"
#: Seconds a write or read of the Kafka audit trail may take.
KAFKA_AUDIT_TIMEOUT = 15.0
#: Milliseconds one fetch of the audit topic waits for records.
FETCH_WAIT_MS = 500


class KafkaAuditLog:
    """An audit trail kept as the records of one Kafka topic (partition 0).

    Each call opens its clients and closes them (actions are rare; nothing stays
    connected).  Blocking: call it from a thread.

    Parameters:
      config: Connection settings (the Kafka backend's).
      topic: The audit topic.
      timeout: Seconds a call may take before ``TimeoutError``.
    """

    blocking = True

    def __init__(
        self,
        config: KafkaConfig,
        topic: str = DEFAULT_AUDIT_TOPIC,
        *,
        timeout: float = KAFKA_AUDIT_TIMEOUT,
    ) -> None:
        self.config = config
        self.topic = topic
        self.timeout = timeout

    def append(self, entry: AuditEntry) -> None:
        value = json.dumps(entry.to_dict()).encode()
        asyncio.run(asyncio.wait_for(self._append(value), self.timeout))

    def entries(self, limit: int = 50) -> list[AuditEntry]:
        if limit <= 0:
            return []
        return asyncio.run(asyncio.wait_for(self._entries(limit), self.timeout))

    async def _append(self, value: bytes) -> None:
        producer = self.config.producer(acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(self.topic, value=value, partition=0)
        finally:
            await producer.stop()

    async def _entries(self, limit: int) -> list[AuditEntry]:
        from aiokafka import TopicPartition

        consumer = self.config.consumer(
            group_id=None, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            if self.topic not in await consumer.topics():  # never auto-creates it
                return []
            tp = TopicPartition(self.topic, 0)
            consumer.assign([tp])
            end = (await consumer.end_offsets([tp]))[tp]
            start = (await consumer.beginning_offsets([tp]))[tp]
            consumer.seek(tp, max(start, end - limit))
            rows: list[Any] = []
            while await consumer.position(tp) < end:
                batch = await consumer.getmany(tp, timeout_ms=FETCH_WAIT_MS)
                rows += batch.get(tp, [])
        finally:
            await consumer.stop()
        entries = []
        for row in reversed(rows[-limit:]):
            try:
                data = json.loads(row.value, parse_constant=refuse_constants)
            except (TypeError, ValueError):
                continue
            if isinstance(data, dict):
                entries.append(AuditEntry.from_dict(data))
        return entries
