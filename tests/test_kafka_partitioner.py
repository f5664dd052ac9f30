"""The Kafka producer's partitioner (issue 19, item 5): the Java client's murmur2
placement, computed without aiokafka's per-operation masking.  A key must land on
the partition it always did (the order of a key's events survives an upgrade, and
services on the Java client agree), so the hash is checked against Kafka's own
test vectors and aiokafka's implementation, and placement against a real broker."""

from __future__ import annotations

import os
from collections.abc import Callable

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given
from hypothesis import strategies as st

from eventbus import EventBus
from eventbus.kafka.partitioner import Murmur2Partitioner, murmur2
from tests.kafka_events import Numbered
from tests.kafka_helpers import create_topic, read_topic

pytest_plugins = ["tests.kafka_support"]

#: org.apache.kafka.common.utils.UtilsTest#testMurmur2 (signed 32-bit results).
JAVA_VECTORS = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


def signed(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


def test_murmur2_gives_the_java_clients_hash() -> None:
    assert {key: signed(murmur2(key)) for key in JAVA_VECTORS} == JAVA_VECTORS


@given(st.binary(max_size=300))
def test_murmur2_equals_aiokafkas_for_every_key(key: bytes) -> None:
    assert murmur2(key) == aiokafka_murmur2(key)


def test_every_key_length_and_event_ids_hash_alike() -> None:
    for length in range(70):  # every tail length, many word counts
        for _ in range(20):
            key = os.urandom(length)
            assert murmur2(key) == aiokafka_murmur2(key), key
    for _ in range(500):  # the default partition key: an event id
        key = os.urandom(16).hex().encode()
        assert murmur2(key) == aiokafka_murmur2(key), key


def test_the_partitioner_places_keys_as_aiokafkas_default() -> None:
    ours, default = Murmur2Partitioner(), DefaultPartitioner()
    for count in (1, 3, 12, 50):
        partitions = list(range(count))
        for n in range(300):
            key = f"order-{n}".encode()
            assert ours(key, partitions, partitions) == default(key, partitions, partitions)
    # No key: any available partition, else any partition.
    assert {ours(None, [0, 1, 2], [1]) for _ in range(20)} == {1}
    assert {ours(None, [0, 1, 2], []) for _ in range(200)} == {0, 1, 2}


async def test_published_events_land_on_their_keys_java_partition(
    make_kafka_bus: Callable[..., EventBus], kafka_bootstrap: str, topic: str
) -> None:
    partitions = 6
    await create_topic(kafka_bootstrap, topic, partitions)
    bus = make_kafka_bus(consume=False)
    await bus.start()
    events = [Numbered(topic=topic, n=n, key=f"account-{n % 40}") for n in range(120)]
    await bus.publish_many(events)
    records = await read_topic(kafka_bootstrap, topic, len(events))
    placed = {(record.key, record.partition) for record in records}  # type: ignore[attr-defined]
    expected = {
        (key, (aiokafka_murmur2(key) & 0x7FFFFFFF) % partitions)
        for key in {event.partition_key().encode() for event in events}
    }
    assert placed == expected
    assert len({partition for _, partition in placed}) > 1  # the keys were spread
