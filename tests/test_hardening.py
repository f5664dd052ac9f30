"""Publishing hostile values on the embedded backend: what reaches the wire is JSON
any consumer can read, and what cannot be written is refused with PublishError."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pytest

from eventbus import BaseEvent, EventBus, EventDecodeError, PublishError, RetryPolicy
from eventbus.asgi import get_correlation_id
from eventbus.context import VALID_CORRELATION_ID
from eventbus.events import MAX_DEPTH, decode_event, encode_envelope

MakeBus = Callable[..., EventBus]


class Reading(BaseEvent):
    topic: str = "readings"
    value: float = 0.0
    labels: dict[str, Any] = {}
    note: str = ""


class Anything(BaseEvent):
    topic: str = "anything"
    payload: Any = None


async def started(make_bus: MakeBus, topic: str, seen: list[BaseEvent]) -> EventBus:
    async def handle(event: BaseEvent) -> None:
        seen.append(event)

    bus = make_bus(retry_policy=RetryPolicy(max_retries=0))
    await bus.registry.register(topic, handle)
    await bus.start()
    return bus


@pytest.mark.parametrize(
    ("event", "field", "constant"),
    [
        (Reading(value=float("nan")), "value", "NaN"),
        (Reading(value=float("inf")), "value", "Infinity"),
        (Reading(labels={"a": [1.0, float("-inf")]}), "labels.a[1]", "-Infinity"),
        (Anything(payload={"deep": {"x": float("nan")}}), "payload.deep.x", "NaN"),
    ],
)
async def test_nan_and_infinity_are_refused_at_publish_naming_the_field(
    make_bus: MakeBus, topic: str, event: BaseEvent, field: str, constant: str
) -> None:
    seen: list[BaseEvent] = []
    bus = await started(make_bus, topic, seen)

    with pytest.raises(PublishError) as refused:
        await bus.publish(event.model_copy(update={"topic": topic}))
    await bus.drain(timeout=5)

    message = str(refused.value)
    assert f"field {field!r} is {constant}" in message
    assert event.event_id in message and type(event).__name__ in message
    assert seen == []


async def test_text_that_looks_like_nan_and_nulls_are_published_unchanged(
    make_bus: MakeBus, topic: str
) -> None:
    seen: list[BaseEvent] = []
    bus = await started(make_bus, topic, seen)
    event = Reading(topic=topic, note="NaN Infinity -Infinity", labels={"n": None, "NaN": 1.5})

    await bus.publish(event)
    await bus.drain(timeout=5)

    [got] = seen
    assert got.model_dump(exclude={"metadata"}) == event.model_dump(exclude={"metadata"})


def test_the_wire_never_carries_bare_nan() -> None:
    """Whatever encode_envelope writes, a strict JSON parser reads."""

    def strict(name: str) -> None:
        raise AssertionError(f"bare {name} on the wire")

    for value in (0.0, -0.0, 1e308, 5e-324):
        wire = encode_envelope(Reading(value=value, labels={"x": value}))
        assert json.loads(wire, parse_constant=strict)["event"]["value"] == value
    with pytest.raises(ValueError, match="NaN"):
        encode_envelope(Reading(value=float("nan")))


@pytest.mark.parametrize(
    "payload",
    [
        "lone surrogate \ud800",
        {"key": "\udfff"},
        object(),
        {"set": {1, 2}, "obj": object()},
    ],
)
async def test_unwritable_values_raise_publish_error_naming_the_event(
    make_bus: MakeBus, topic: str, payload: object
) -> None:
    seen: list[BaseEvent] = []
    bus = await started(make_bus, topic, seen)
    event = Anything(topic=topic, payload=payload)

    with pytest.raises(PublishError, match=f"event {event.event_id} \\(Anything\\)"):
        await bus.publish(event)
    await bus.drain(timeout=5)
    assert seen == []


async def test_an_event_nested_past_the_decoder_limit_is_refused_at_publish(
    make_bus: MakeBus, topic: str
) -> None:
    seen: list[BaseEvent] = []
    bus = await started(make_bus, topic, seen)
    deep: object = 0
    for _ in range(MAX_DEPTH):
        deep = [deep]
    event = Anything(topic=topic, payload=deep)
    with pytest.raises(EventDecodeError):  # what a consumer would say
        decode_event(event.to_dict())

    with pytest.raises(PublishError, match="too deeply nested"):
        await bus.publish(event)
    await bus.drain(timeout=5)
    assert seen == []


async def test_a_correlation_id_with_a_newline_in_event_metadata_never_reaches_logs(
    make_bus: MakeBus, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    forged = "req-1\n2026-01-01 00:00:00 CRITICAL admin logged in"
    log = logging.getLogger("tests.hardening")
    seen: list[tuple[str, str]] = []

    async def handle(event: BaseEvent) -> None:
        cid = get_correlation_id()
        seen.append((cid, event.metadata["correlation_id"]))
        log.warning("handling %s (correlation id %s)", event.event_id, cid)
        raise RuntimeError(f"failed for {cid}")

    bus = make_bus(retry_policy=RetryPolicy(max_retries=0))
    await bus.registry.register(topic, handle)
    await bus.start()
    caplog.set_level(logging.DEBUG)

    await bus.publish(BaseEvent(topic=topic, metadata={"correlation_id": forged}))
    await bus.drain(timeout=5)

    [(cid, in_metadata)] = seen
    assert VALID_CORRELATION_ID.fullmatch(cid) and cid == in_metadata
    [record] = bus.dlq.peek()
    assert record.correlation_id == cid
    assert "admin logged in" not in caplog.text
    assert all("\n" not in r.getMessage() for r in caplog.records if r.name == log.name)


def test_the_correlation_id_on_the_wire_leaves_the_event_itself_unchanged() -> None:
    """The publish path writes the correlation id into the envelope's metadata
    without copying the event: the caller's instance keeps its own metadata, also
    when the event cannot be written and when threads encode it at once."""
    import threading

    event = Reading(value=1.5, metadata={"tenant": "a"})
    wire = json.loads(encode_envelope(event, {"correlation_id": "req-1", "tenant": "b"}))
    assert wire["event"]["metadata"] == {"correlation_id": "req-1", "tenant": "a"}
    assert event.metadata == {"tenant": "a"}

    broken = Anything(payload=object(), metadata={"tenant": "a"})
    with pytest.raises(Exception, match="object"):
        encode_envelope(broken, {"correlation_id": "req-2"})
    assert broken.metadata == {"tenant": "a"}

    seen: dict[str, set[str]] = {}
    start = threading.Barrier(8)

    def encode(cid: str) -> None:
        start.wait()
        got = set()
        for _ in range(2000):
            got.add(
                json.loads(encode_envelope(event, {"correlation_id": cid}))["event"]["metadata"][
                    "correlation_id"
                ]
            )
        seen[cid] = got

    threads = [threading.Thread(target=encode, args=(f"c{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {f"c{i}": {f"c{i}"} for i in range(8)}
    assert event.metadata == {"tenant": "a"}
