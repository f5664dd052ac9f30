"""The operations view of a Kafka service: its consumer group, members and lag.

A service's subscriptions on Kafka are its consumer group reading the topics of
its handlers; its workers are the group's members.  One reading
(:func:`read_operations`) opens an admin client and a group-less consumer for a
few requests (the group's description, its committed offsets, the partitions'
end offsets) and closes them.

Kafka keeps no backlog per handler: a record is one entry of its partition for
every handler of the service, so the lag is per partition.  No heartbeat age
either: the group coordinator drops a member that stops heartbeating within
its session timeout, so every member listed is alive.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from eventbus.backends.base import Operations, PartitionLag, SubscriptionState, WorkerState
from eventbus.kafka.config import KafkaConfig

if TYPE_CHECKING:
    from eventbus.registry import HandlerSpec

#: Seconds one reading may take.
OPERATIONS_TIMEOUT = 10.0

#: What the operations view says about code fingerprints on Kafka.
CODE_NOTE = (
    "code fingerprints are recorded by Redis workers only; on Kafka, two codebases "
    "sharing a service share its consumer group (EVENTBUS_KAFKA_GROUP_ID): compare the "
    "members' client ids and hosts below with your deploy"
)


def _assignment(raw: bytes) -> list[tuple[str, int]]:
    """The (topic, partition) pairs of a member's assignment ([] when the broker
    does not return it)."""
    if not raw:
        return []
    from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment

    try:
        decoded: Any = ConsumerProtocolMemberAssignment.decode(raw)
    except (ValueError, TypeError):
        return []
    return [(topic, p) for topic, partitions in decoded.assignment for p in partitions]


async def _members(config: KafkaConfig, admin: Any, group: str) -> list[WorkerState]:
    described = await admin.describe_consumer_groups([group])
    workers = []
    for response in described:
        for entry in response.groups:
            error, group_id, _state, _protocol_type, _protocol, members = entry[:6]
            if error or group_id != group:
                continue
            for member_id, client_id, client_host, _metadata, raw in members:
                host = str(client_host).lstrip("/")
                name = f"{client_id}@{host}" if client_id and host else str(member_id)
                assigned = tuple(f"{t}:{p}" for t, p in sorted(_assignment(raw)))
                workers.append(WorkerState(name, None, assigned, group=group))
    return workers


async def _lag(config: KafkaConfig, admin: Any, group: str, topics: list[str]) -> list[Any]:
    """(topic, partition, committed or None, end) of every partition of ``topics``."""
    from aiokafka import TopicPartition

    consumer = config.consumer(group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        existing = set(await consumer.topics())
        partitions = [
            TopicPartition(topic, p)
            for topic in sorted(topics)
            if topic in existing
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        if not partitions:
            return []
        ends = await consumer.end_offsets(partitions)
        committed = await admin.list_consumer_group_offsets(group, partitions=partitions)
        bases = {tp: meta.offset for tp, meta in committed.items() if meta.offset >= 0}
        never = [tp for tp in partitions if tp not in bases]
        starts = await consumer.beginning_offsets(never) if never else {}
        return [
            (tp.topic, tp.partition, bases.get(tp), ends[tp], starts.get(tp, 0))
            for tp in partitions
        ]
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()


async def read_operations(
    config: KafkaConfig,
    group: str,
    service: str,
    handlers: list[HandlerSpec],
    address: str,
) -> Operations:
    """The consumer group ``group`` of ``service``: its members, their assigned
    partitions and the group's lag per partition of the topics of ``handlers``
    (this process's), which are listed as the service's subscriptions."""
    topics = sorted({spec.topic for spec in handlers})
    admin = config.admin(request_timeout_ms=int(OPERATIONS_TIMEOUT * 1000))
    async with asyncio.timeout(OPERATIONS_TIMEOUT):
        await admin.start()
        try:
            workers = await _members(config, admin, group)
            offsets = await _lag(config, admin, group, topics)
        finally:
            with contextlib.suppress(Exception):
                await admin.close()
    owner = {q: w.name for w in workers for q in w.queues}
    partitions = [
        PartitionLag(
            group,
            topic,
            partition,
            committed,
            end,
            max(0, end - (committed if committed is not None else start)),
            owner.get(f"{topic}:{partition}", ""),
        )
        for topic, partition, committed, end, start in offsets
    ]
    lag_of: dict[str, int] = {}
    for p in partitions:
        lag_of[p.topic] = lag_of.get(p.topic, 0) + p.lag
    rows = [
        SubscriptionState(
            service,
            spec.topic,
            spec.name,
            f"group {group}",
            backlog=None,
            live_workers=len(workers),
        )
        for spec in sorted(handlers, key=lambda s: (s.topic, s.name))
    ]
    notes = [
        f"Kafka keeps no backlog per handler: group {group}'s lag per partition below "
        "counts for every handler of the service "
        f"({', '.join(f'{t}: {n}' for t, n in sorted(lag_of.items())) or 'no partition'})",
        CODE_NOTE,
    ]
    if workers and not any(w.queues for w in workers):
        notes.append("the brokers did not say which partitions each member has")
    return Operations(
        "kafka", address, datetime.now(UTC), rows, workers, partitions=partitions, notes=notes
    )
