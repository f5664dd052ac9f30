"""A dead letter too large for a Kafka record never blocks its partition: the
traceback and error are cut (head and tail kept), then, if still too large, the
payload is dropped with its size, sha256 and the reason; replay refuses such a
record and keeps it.

The broker tests run against the real Tansu broker the suite starts.  Tansu does
not enforce ``message.max.bytes`` (nor a topic's ``max.message.bytes``): the limit
they hit is the producer's ``max_request_size`` (aiokafka's default, 1 MiB, which
raises ``MessageSizeTooLargeError`` before sending).  A broker's own refusal is
the same error class coming back from the broker; the tests without a broker
cover it with a producer that refuses like one.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from typing import Any

from eventbus import BaseEvent, EventBus
from tests.kafka_helpers import committed_offsets, create_topic, read_topic, wait_for

pytest_plugins = ["tests.kafka_support"]

#: aiokafka's default max_request_size: the limit the broker tests hit.
PRODUCER_LIMIT = 1_048_576


class Bulky(BaseEvent):
    """An event whose size the test chooses."""

    __event_type__ = "tests.kafka.Bulky"
    __partition_key__ = "key"

    n: int = 0
    key: str = "k"
    blob: str = ""


def huge_error(n: int) -> RuntimeError:
    # Head and tail are distinct so the test sees both were kept.
    return RuntimeError(f"HEAD-{n} " + "e" * 700_000 + f" TAIL-{n}")


async def test_a_dead_letter_over_the_limit_drops_its_payload_and_the_partition_flows(
    make_kafka_bus: Callable[..., EventBus], kafka_bootstrap: str, kafka_names: tuple[str, str]
) -> None:
    topic, group = kafka_names
    await create_topic(kafka_bootstrap, topic, 1)
    handled: list[int] = []

    async def handler(event: Bulky) -> None:
        if event.n == 0:
            raise huge_error(event.n)
        handled.append(event.n)

    bus = make_kafka_bus()
    await bus.registry.register(topic, handler, name=f"{topic}.h")
    await bus.start()
    # Near the 1 MiB limit on its own: with any traceback around it, its dead
    # letter cannot fit, whatever is cut from the texts.
    big = Bulky(topic=topic, n=0, blob="p" * 1_040_000)
    await bus.publish(big)
    for n in (1, 2, 3):  # same key: the same partition, behind the failing record
        await bus.publish(Bulky(topic=topic, n=n))
    await bus.drain(timeout=20)

    assert handled == [1, 2, 3]
    assert await committed_offsets(kafka_bootstrap, group, topic) == {0: 4}

    original: Any = (await read_topic(kafka_bootstrap, topic, 1))[0]  # offset 0: the big one
    value: bytes = original.value
    [dead] = await bus.dlq.apeek()
    assert dead.event is None and dead.topic == topic
    dropped = dead.envelope["payload_dropped"]
    assert re.fullmatch(r"payload dropped: \d+ bytes over the limit of 1048576", dropped["reason"])
    assert dropped["bytes"] == len(value)
    assert dropped["sha256"] == hashlib.sha256(value).hexdigest()  # finds the original
    assert dropped["event_id"] == big.event_id and dropped["event_type"] == "tests.kafka.Bulky"
    assert dead.error.startswith(dropped["reason"])  # `dlq list` shows it in the error column
    assert "HEAD-0" in dead.error and dead.error.endswith("TAIL-0")
    assert "Traceback (most recent call last)" in dead.traceback
    assert dead.traceback.rstrip().endswith("TAIL-0") and len(dead.traceback) < 20_000
    assert dead.error_type == "RuntimeError" and dead.attempts == 2

    written: list[Any] = await read_topic(kafka_bootstrap, f"{topic}.dlq", 1)
    [raw] = written
    assert len(raw.value) < PRODUCER_LIMIT
    headers = dict(raw.headers)
    assert headers["eventbus-payload-dropped"].decode() == dropped["reason"]
    assert headers["eventbus-cut"] == b"traceback,error,payload"

    result = await bus.dlq.areplay([dead.id])
    assert result.replayed == [] and "payload dropped" in result.failed[dead.id]
    kept = await bus.dlq.aget(dead.id)
    assert kept is not None and kept.envelope == dead.envelope


async def test_a_dead_letter_with_a_huge_error_keeps_its_event_and_replays(
    make_kafka_bus: Callable[..., EventBus], kafka_bootstrap: str, kafka_names: tuple[str, str]
) -> None:
    topic, group = kafka_names
    await create_topic(kafka_bootstrap, topic, 1)
    handled: list[int] = []
    failing = {0}

    async def handler(event: Bulky) -> None:
        if event.n in failing:
            raise huge_error(event.n)
        handled.append(event.n)

    bus = make_kafka_bus()
    await bus.registry.register(topic, handler, name=f"{topic}.h")
    await bus.start()
    event = Bulky(topic=topic, n=0, blob="p" * 300_000)
    await bus.publish(event)
    await bus.publish(Bulky(topic=topic, n=1))
    await bus.drain(timeout=20)

    assert handled == [1]
    assert await committed_offsets(kafka_bootstrap, group, topic) == {0: 2}
    [dead] = await bus.dlq.apeek()
    assert isinstance(dead.event, Bulky) and dead.event.blob == event.blob  # the event is kept
    assert dead.error.startswith("HEAD-0") and dead.error.endswith("TAIL-0")
    assert "characters cut" in dead.error and len(dead.error) < 5_000
    assert dead.traceback.rstrip().endswith("TAIL-0") and "characters cut" in dead.traceback
    written: list[Any] = await read_topic(kafka_bootstrap, f"{topic}.dlq", 1)
    [raw] = written
    headers = dict(raw.headers)
    assert headers["eventbus-cut"] == b"traceback,error"
    assert "eventbus-payload-dropped" not in headers
    assert json.loads(raw.value)["envelope"]["event"]["blob"] == event.blob

    failing.clear()
    result = await bus.dlq.areplay([dead.id])
    assert result.replayed == [dead.id]
    await wait_for(lambda: handled == [1, 0], 20, "the replayed event")
