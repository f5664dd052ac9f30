"""Where the console keeps its audit trail: with the dead letters, in every store.

- In memory and Redis, the store itself keeps it (``store.audit``: a bounded
  list next to the records; :class:`~eventbus.dlq.store.AuditedStore`).
- On Kafka, it is a topic of its own next to the DLQ topics,
  :data:`DEFAULT_AUDIT_TOPIC` (one partition; create it with the retention you
  want for an audit trail, e.g. ``retention.ms=-1``).
- Any other store: in this process's memory, with a warning.

Every bound trail (memory, Redis) keeps its newest entries by count; actions on
nothing are not recorded (:mod:`eventbus.console.actions`), so only real actions
take its room.  :func:`audit_rows` pairs each action's "started" entry with its
completion for the audit page.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from eventbus.dlq.store import (
    STARTED,
    AuditedStore,
    AuditEntry,
    AuditLog,
    DeadLetterStore,
    MemoryAuditLog,
    refuse_constants,
)

if TYPE_CHECKING:
    from eventbus.kafka.config import KafkaConfig

logger = logging.getLogger(__name__)

#: The Kafka topic of the audit trail.
DEFAULT_AUDIT_TOPIC = "eventbus.dlq.store-audit"
#: Seconds a write or read of the Kafka audit trail may take.
KAFKA_AUDIT_TIMEOUT = 15.0


@dataclass(frozen=True)
class AuditRow:
    """One action on the audit page: its started entry and its completion merged.

    Attributes:
      at: When it started (or ended, when its start is older than the page).
      ended_at: When it ended; None when not completed or not known.
      status: ``started`` (not completed), ``done`` or ``failed``.
      selected: Records selected, when its start is known.
      count: Records done (for a row that never completed: selected).
    """

    at: datetime
    ended_at: datetime | None
    who: str
    action: str
    status: str
    selected: int | None
    count: int
    failed: int
    detail: str
    ids: tuple[str, ...]


def audit_rows(entries: list[AuditEntry]) -> list[AuditRow]:
    """One row per action of ``entries`` (newest first), newest first."""
    starts = {e.action_id: e for e in entries if e.action_id and e.status == STARTED}
    completed = {e.action_id for e in entries if e.action_id and e.status != STARTED}
    rows = []
    for entry in entries:
        if entry.status == STARTED:
            if entry.action_id not in completed:  # else its completion makes its row
                rows.append(_row(entry, selected=entry.count))
            continue
        start = starts.get(entry.action_id) if entry.action_id else None
        if start is None:
            rows.append(_row(entry, selected=None))
        else:
            rows.append(replace(_row(entry, selected=start.count), at=start.at, ended_at=entry.at))
    return rows


def _row(entry: AuditEntry, *, selected: int | None) -> AuditRow:
    return AuditRow(
        at=entry.at,
        ended_at=None,
        who=entry.who,
        action=entry.action,
        status=entry.status,
        selected=selected,
        count=entry.count,
        failed=entry.failed,
        detail=entry.detail,
        ids=entry.ids,
    )


def audit_log_for(store: DeadLetterStore) -> AuditLog:
    """The audit trail that goes with ``store``."""
    if isinstance(store, AuditedStore):
        return store.audit
    config = _kafka_config(store)
    if config is not None:
        return KafkaAuditLog(config)
    logger.warning(
        "The dead-letter store %s keeps no audit trail: the console keeps it in this "
        "process's memory (pass dlq_console(audit=...) to keep it elsewhere).",
        type(store).__name__,
    )
    return MemoryAuditLog()


def _kafka_config(store: DeadLetterStore) -> KafkaConfig | None:
    try:
        from eventbus.kafka.dlq import KafkaDeadLetterStore
    except ImportError:  # no aiokafka: not a Kafka store
        return None
    return store.config if isinstance(store, KafkaDeadLetterStore) else None


class KafkaAuditLog:
    """An audit trail kept as the records of one Kafka topic.

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
                batch = await consumer.getmany(tp, timeout_ms=500)
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
