"""Hostile input: random bytes and random JSON never crash or wedge anything.

Each input ends as a decoded event, a clear EventDecodeError, or a dead letter.
"""

from __future__ import annotations

import json
from typing import Any

from dramatiq import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventbus import (
    BaseEvent,
    EventBus,
    EventBusSettings,
    EventDecodeError,
    HealthStatus,
    RetryPolicy,
    decode_event,
)
from eventbus.middleware import keys

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "type": st.one_of(st.text(), st.sampled_from(["eventbus.BaseEvent", "x.Y"]), json_values),
        "event": st.one_of(
            json_values,
            st.fixed_dictionaries(
                {},
                optional={
                    "topic": json_values,
                    "event_id": json_values,
                    "timestamp": st.one_of(st.text(), st.integers(), json_values),
                    "metadata": st.one_of(st.dictionaries(st.text(), st.text()), json_values),
                },
            ),
        ),
    },
)


class Typed(BaseEvent):
    topic: str = "typed"
    amount: int


def _decodes_or_refuses(payload: Any, expected: type[BaseEvent] | None = None) -> None:
    try:
        event = decode_event(payload, expected)
    except EventDecodeError as exc:
        assert str(exc)
    else:
        assert isinstance(event, expected or BaseEvent)


@given(st.binary(max_size=512))
def test_random_bytes_decode_or_raise_event_decode_error(data: bytes) -> None:
    _decodes_or_refuses(data)


@given(json_values)
def test_random_json_text_decodes_or_raises(value: Any) -> None:
    _decodes_or_refuses(json.dumps(value))


@given(envelopes)
def test_random_envelopes_decode_or_raise(envelope: dict[str, Any]) -> None:
    _decodes_or_refuses(envelope)
    _decodes_or_refuses(envelope, Typed)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(envelopes, json_values), min_size=1, max_size=20))
async def test_embedded_dispatcher_survives_garbage_and_accounts_for_every_message(
    garbage: list[Any],
) -> None:
    handled: list[BaseEvent] = []

    async def handle(event: BaseEvent) -> None:
        handled.append(event)

    bus = EventBus(
        settings=EventBusSettings(shutdown_timeout=1),
        retry_policy=RetryPolicy(max_retries=1, delay=0.001),
    )
    spec = await bus.registry.register("hostile", handle)
    await bus.start()
    try:
        for payload in garbage:
            bus.broker.enqueue(
                Message(
                    queue_name="eventbus",
                    actor_name=spec.name,
                    args=(payload,),
                    kwargs={},
                    options={keys.TOPIC: "hostile"},
                )
            )
        await bus.publish(BaseEvent(topic="hostile"))  # a good one after the garbage
        await bus.drain(timeout=5)

        assert len(handled) + bus.dlq.size() == len(garbage) + 1
        assert handled and handled[-1].topic == "hostile"
        assert all(r.error_type == "EventDecodeError" for r in bus.dlq.peek(100))
        [health] = await bus.health.check()
        assert health.status is HealthStatus.HEALTHY
    finally:
        await bus.stop()
