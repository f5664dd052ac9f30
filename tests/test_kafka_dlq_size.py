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

import asyncio
import hashlib
import io
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any, cast

import httpx
import pytest
from fastapi import FastAPI

from eventbus import BaseEvent, EventBus, FailedEvent
from eventbus.cli import run
from eventbus.console.routes import dlq_console
from eventbus.dlq.audit_log import MemoryAuditLog
from eventbus.dlq.queue import DeadLetterQueue
from eventbus.dlq.records import payload_dropped
from eventbus.dlq.store import MemoryDeadLetterStore
from eventbus.exceptions import ConfigurationError
from eventbus.kafka.config import KafkaConfig
from eventbus.kafka.dlq import (
    KafkaDeadLetterStore,
    dead_letter_headers,
    dead_letter_value,
)
from eventbus.kafka.dlq_record import (
    DEFAULT_MAX_RECORD_BYTES,
    DROP_HINT,
    DROP_HINT_LOWERED,
    HEADER_CUT,
    HEADER_PAYLOAD_DROPPED,
    fit_dead_letter,
)
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
    assert re.fullmatch(
        rf"payload dropped: \d+ bytes over the limit of 1048576 \({re.escape(DROP_HINT)}\)",
        dropped["reason"],
    )
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

    # What an operator sees: the CLI's list and show, the console's record page.
    listing, shown = io.StringIO(), io.StringIO()
    assert await asyncio.to_thread(run, ["dlq", "list"], bus, listing) == 0
    assert "RuntimeError: payload dropped: " in listing.getvalue()
    assert await asyncio.to_thread(run, ["dlq", "show", dead.id], bus, shown) == 0
    assert dropped["reason"] in shown.getvalue() and dropped["sha256"] in shown.getvalue()
    app = FastAPI()
    app.include_router(dlq_console(bus, allow_unauthenticated=True, audit=MemoryAuditLog()))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        page = await http.get("/eventbus/console/record", params={"id": dead.id})
    assert page.status_code == 200
    assert dropped["reason"] in page.text and dropped["sha256"] in page.text

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


async def test_a_poison_record_whose_dead_letter_is_too_large_does_not_block_its_partition(
    make_kafka_bus: Callable[..., EventBus], kafka_bootstrap: str, kafka_names: tuple[str, str]
) -> None:
    from aiokafka import AIOKafkaProducer

    topic, group = kafka_names
    await create_topic(kafka_bootstrap, topic, 1)
    handled: list[int] = []

    async def handler(event: Bulky) -> None:
        handled.append(event.n)

    bus = make_kafka_bus()
    await bus.registry.register(topic, handler, name=f"{topic}.h")
    await bus.start()
    # 400 KB of binary: kept as text with escapes (\xff -> "\\xff" in JSON), its
    # dead letter would be five times the record.
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"\xff" * 400_000)
    finally:
        await producer.stop()
    await bus.publish(Bulky(topic=topic, n=1))
    await bus.drain(timeout=20)

    assert handled == [1]
    assert await committed_offsets(kafka_bootstrap, group, topic) == {0: 2}
    [dead] = await bus.dlq.apeek()
    assert dead.offset == 0 and dead.error_type == "EventDecodeError"
    dropped = dead.envelope["payload_dropped"]
    assert dropped["reason"].startswith("payload dropped: ")
    assert dead.error.startswith(dropped["reason"]) and "not UTF-8 JSON" in dead.error


# -- without a broker -------------------------------------------------------------


def failed_event(envelope: Any, *, error: str = "boom", traceback: str = "") -> FailedEvent:
    return FailedEvent(
        id="dl-1",
        event=None,
        envelope=envelope,
        topic="orders",
        handler="orders.h",
        queue="eventbus",
        attempts=2,
        error=error,
        error_type="RuntimeError",
        traceback=traceback,
    )


def bulky_envelope(size: int) -> dict[str, Any]:
    event = Bulky(topic="orders", n=1, blob="p" * size)
    return {"type": event.event_type, "event": event.model_dump(mode="json")}


def test_a_dead_letter_that_fits_is_written_unchanged() -> None:
    record = failed_event(bulky_envelope(1_000), traceback="Traceback ...\n")
    fitted = fit_dead_letter(record, 100_000)
    assert fitted.record is record and fitted.cut == ()
    assert json.loads(fitted.value) == record.to_dict()
    assert HEADER_CUT not in dict(fitted.headers)


def test_a_long_traceback_and_error_are_cut_first_and_the_payload_kept() -> None:
    envelope = bulky_envelope(50_000)
    record = failed_event(
        envelope,
        error="E-HEAD " + "e" * 200_000 + " E-TAIL",
        traceback="Traceback (most recent call last):\n" + "t" * 300_000 + "\nRuntimeError: T-TAIL",
    )
    fitted = fit_dead_letter(record, 100_000)

    assert fitted.cut == ("traceback", "error")
    assert len(fitted.value) <= fitted.size <= 100_000
    value = json.loads(fitted.value)
    assert value["envelope"] == envelope  # the event survives
    assert value["error"].startswith("E-HEAD") and value["error"].endswith("E-TAIL")
    assert value["traceback"].startswith("Traceback (most recent call last):")
    assert value["traceback"].endswith("RuntimeError: T-TAIL")
    assert "characters cut" in value["traceback"] and "characters cut" in value["error"]
    assert dict(fitted.headers)[HEADER_CUT] == b"traceback,error"
    assert dict(fitted.headers)["eventbus-error"].startswith(b"E-HEAD")


def test_a_payload_too_large_on_its_own_is_dropped_with_its_size_hash_and_reason() -> None:
    envelope = bulky_envelope(300_000)
    payload = json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode()
    record = failed_event(envelope, traceback="Traceback ...\nRuntimeError: boom")
    fitted = fit_dead_letter(record, 100_000)

    assert fitted.cut == ("payload",)
    assert fitted.size <= 100_000
    kept = json.loads(fitted.value)["envelope"]["payload_dropped"]
    match = re.fullmatch(
        rf"payload dropped: (\d+) bytes over the limit of 100000 \({re.escape(DROP_HINT)}\)",
        kept["reason"],
    )
    assert match is not None
    over = int(match[1])
    assert len(payload) - 100_000 < over < len(payload)  # the whole record counts
    assert kept["bytes"] == len(payload)
    assert kept["sha256"] == hashlib.sha256(payload).hexdigest()
    assert (
        kept["event_type"] == "tests.kafka.Bulky"
        and kept["event_id"] == envelope["event"]["event_id"]
    )
    assert fitted.record.error == f"{kept['reason']}; boom"
    assert fitted.record.event is None and payload_dropped(fitted.record) == kept
    assert dict(fitted.headers)[HEADER_PAYLOAD_DROPPED] == kept["reason"].encode()
    assert FailedEvent.from_dict(json.loads(fitted.value)).event is None


def test_replay_refuses_a_dead_letter_without_its_payload_and_keeps_it() -> None:
    fitted = fit_dead_letter(failed_event(bulky_envelope(300_000)), 100_000)
    store = MemoryDeadLetterStore()
    store.add(fitted.record)
    replayed: list[str] = []
    dlq = DeadLetterQueue(store, replayer=lambda record: replayed.append(record.id))

    result = dlq.replay(["dl-1"])

    assert replayed == [] and result.replayed == []
    assert "payload dropped: " in result.failed["dl-1"]
    assert store.get("dl-1") is not None  # kept, visible again


def test_an_error_with_lone_surrogates_still_makes_a_record() -> None:
    # str(OSError) of a file name decoded with surrogateescape: a strict encode
    # failed the write on every attempt, and the partition never committed again.
    record = failed_event(bulky_envelope(10), error="no such file: '/tmp/\udcff'")
    headers = dict(dead_letter_headers(record))
    assert headers["eventbus-error"] == b"no such file: '/tmp/\\udcff'"
    assert FailedEvent.from_dict(json.loads(dead_letter_value(record))).error == record.error


class RefusingProducer:
    """Stands in for a producer in front of a broker whose ``message.max.bytes`` is
    ``limit`` (Tansu enforces none), or of a broker that is away for ``outage``
    attempts."""

    def __init__(self, limit: int = 10**9, outage: int = 0) -> None:
        self.limit = limit
        self.outage = outage
        self.sent: list[tuple[str, bytes, dict[str, bytes]]] = []
        self.attempts = 0

    async def send_and_wait(
        self, topic: str, *, value: bytes, key: bytes, headers: list[tuple[str, bytes]]
    ) -> None:
        from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError

        self.attempts += 1
        if self.outage:
            self.outage -= 1
            raise KafkaConnectionError("Connection to the broker lost")
        if len(value) > self.limit:
            raise MessageSizeTooLargeError()  # what the broker answers (error 10)
        self.sent.append((topic, value, dict(headers)))


@pytest.fixture
async def attached() -> AsyncIterator[Callable[[RefusingProducer], KafkaDeadLetterStore]]:
    stores: list[KafkaDeadLetterStore] = []

    def attach(producer: RefusingProducer) -> KafkaDeadLetterStore:
        # Nothing listens on port 1: the store only writes through ``producer``.
        store = KafkaDeadLetterStore(KafkaConfig("127.0.0.1:1"), idempotence=False)
        store.attach(cast(Any, producer), asyncio.get_running_loop())
        stores.append(store)
        return store

    yield attach
    for store in stores:
        await store.detach(0)
        store.close()


async def test_a_broker_refusing_a_record_as_too_large_gets_it_cut_further(
    attached: Callable[[RefusingProducer], KafkaDeadLetterStore],
) -> None:
    producer = RefusingProducer(limit=300_000)
    store = attached(producer)
    await store.write(failed_event(bulky_envelope(700_000)))

    [(topic, value, headers)] = producer.sent
    assert topic == "orders.dlq" and len(value) <= 300_000
    dropped = json.loads(value)["envelope"]["payload_dropped"]
    assert dropped["bytes"] > 700_000
    assert dropped["reason"].endswith(f" ({DROP_HINT_LOWERED})")  # says why the limit is lower
    assert headers[HEADER_CUT] == b"payload"
    assert store.limit("orders.dlq") < DEFAULT_MAX_RECORD_BYTES and store.failing_writes() == []
    attempts = producer.attempts
    # The limit is remembered: the next large dead letter goes through at once.
    await store.write(replace(failed_event(bulky_envelope(700_000)), id="dl-2"))
    assert producer.attempts == attempts + 1 and len(producer.sent) == 2


async def test_a_broker_outage_is_retried_with_the_dead_letter_unchanged(
    attached: Callable[[RefusingProducer], KafkaDeadLetterStore],
) -> None:
    producer = RefusingProducer(outage=2)
    store = attached(producer)
    record = failed_event(bulky_envelope(500_000))
    await store.write(record)  # retried with backoff until the broker is back

    [(_, value, headers)] = producer.sent
    assert producer.attempts == 3
    assert json.loads(value) == record.to_dict() and HEADER_CUT not in headers
    assert store.limit("orders.dlq") == DEFAULT_MAX_RECORD_BYTES


def test_a_record_limit_too_small_for_any_dead_letter_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="at least 65536 bytes"):
        KafkaDeadLetterStore(KafkaConfig("127.0.0.1:1"), max_record_bytes=1_000)
