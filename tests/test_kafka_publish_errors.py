"""A record Kafka refuses in a publish_many, against a real Kafka-protocol broker (Tansu)."""

from __future__ import annotations

import json

import pytest

from eventbus import BaseEvent, EventBus, EventBusSettings, PublishError
from eventbus.kafka.backend import KafkaBackend
from tests.kafka_helpers import read_topic

pytest_plugins = ["tests.kafka_support"]

#: Over the producer's largest request (aiokafka's max_request_size, 1 MiB).
TOO_BIG = 2 * 2**20


class Blob(BaseEvent):
    __event_type__ = "tests.kafka.Blob"
    data: str = ""


async def test_publish_many_names_the_event_kafka_refused(
    kafka_bootstrap: str, kafka_names: tuple[str, str]
) -> None:
    topic, group = kafka_names
    backend = KafkaBackend(kafka_bootstrap, group, idempotence=False)
    # The bus's own size limit raised above the producer's, so Kafka is the one refusing.
    settings = EventBusSettings(shutdown_timeout=3, max_event_bytes=2 * TOO_BIG)
    bus = EventBus(backend=backend, settings=settings)
    await bus.start()
    try:
        first = Blob(topic=topic, data="first")
        big = Blob(topic=topic, data="x" * TOO_BIG)
        with pytest.raises(PublishError) as caught:
            await bus.publish_many([first, big, Blob(topic=topic, data="last")])
        message = str(caught.value)
        assert f"refused event {big.event_id} (tests.kafka.Blob, topic {topic!r})" in message
        assert "MessageSizeTooLargeError" in message
        assert "1 other event(s) of this publish were sent" in message
        # The event sent before the refused one still arrives: the error says so.
        [record] = await read_topic(kafka_bootstrap, topic, 1)
        assert json.loads(record.value)["event"]["event_id"] == first.event_id  # type: ignore[attr-defined]
    finally:
        await bus.stop()
