"""Hostile input: random bytes and random JSON never crash or wedge anything.

Each input ends as a decoded event, a clear EventDecodeError, or a dead letter.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import string
import threading
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis
from dramatiq import Message
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import eventbus.keys as keys
from eventbus import (
    BaseEvent,
    ConfigurationError,
    EventBus,
    EventBusSettings,
    EventDecodeError,
    EventTooLargeError,
    HealthStatus,
    PublishError,
    RetryPolicy,
)
from eventbus.events import (
    MAX_DEPTH,
    UnknownEvent,
    decode_event,
    encode_envelope,
    encode_event,
)
from eventbus.kafka.backend import KafkaBackend
from eventbus.kafka.config import (
    HEADER_CORRELATION_ID,
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_REPLAY_OF,
    HEADER_TRACEPARENT,
)
from eventbus.redis.backend import RedisBackend
from eventbus.redis.messages import MAX_ETA_AHEAD
from eventbus.redis.scripts import bodies_key, ready_key
from eventbus.registry import make_spec
from tests.kafka_events import Numbered
from tests.kafka_helpers import Worker, committed_offsets, create_topic, read_topic
from tests.reliability.handlers import Tracked
from tests.reliability.support import PROFILE, Ledger

if TYPE_CHECKING:
    from tests.redis_support import Workers

pytest_plugins = ["tests.redis_support", "tests.kafka_support"]

QUEUE = "tests.eventbus"  # the default queue of service "tests" (the handlers' package)

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


#: Numbers outside every usual range: NaN, infinities, subnormals, past 64 bits.
wild_numbers = st.one_of(
    st.floats(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.sampled_from([2**63, -(2**63) - 1, 2**64, 1e308, -1e308, 5e-324]),
)
#: Leaves of every JSON type, out of range or large (up to 64 KiB of text).
wild_leaves = st.one_of(
    st.none(),
    st.booleans(),
    wild_numbers,
    st.text(max_size=64),
    st.text(min_size=1024, max_size=65_536),
)
wild_values = st.recursive(
    wild_leaves,
    lambda children: st.lists(children, max_size=64) | st.dictionaries(st.text(), children),
    max_leaves=200,
)
#: Envelopes of a known type whose fields hold wild values (a timestamp of 1e308,
#: an amount past 64 bits, a topic that is a list...).
wild_envelopes = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            ["typed:Typed", "tests.reliability.test_hostile_input.Typed", "x.Y"]
        ),
        "event": st.fixed_dictionaries(
            {},
            optional={
                "topic": st.one_of(st.text(), wild_values),
                "event_id": st.one_of(st.text(), wild_values),
                "timestamp": st.one_of(wild_numbers, st.text(), wild_values),
                "amount": st.one_of(wild_numbers, wild_values),
                "metadata": st.one_of(st.dictionaries(st.text(), st.text()), wild_values),
                "p": wild_values,
            },
        ),
    }
)
#: Nesting depths from one level to far past the interpreter's recursion limit,
#: with the decoder's own limit and its neighbours always among them.
depths = st.one_of(
    st.integers(1, 100_000),
    st.integers(MAX_DEPTH - 4, MAX_DEPTH + 2),
    st.sampled_from([990, 1_000, 5_000]),
)


def deep_text(depth: int, opener: str, wrapped: bool) -> str:
    """JSON nesting ``depth`` arrays or objects, bare or as the field ``p`` of an envelope."""
    closer = "]" if opener == "[" else "}"
    value = opener * depth + "0" + closer * depth
    return '{"type":"x.Deep","event":{"topic":"t","p":' + value + "}}" if wrapped else value


def deep_object(depth: int, in_dicts: bool) -> Any:
    """``depth`` nested lists or dicts, built without recursion."""
    value: Any = 0
    for _ in range(depth):
        value = {"a": value} if in_dicts else [value]
    return value


def envelope_depth(depth: int, wrapped: bool) -> int:
    """Levels of objects and arrays of a :func:`deep_text` payload."""
    return depth + 2 if wrapped else depth


class Typed(BaseEvent):
    topic: str = "typed"
    amount: int


# -- what decoding must do, written from the envelope contract -----------------------
#
# decode_event's contract (its docstring, the module docstring of eventbus.events):
# an envelope is a JSON object with a non-empty "type" string and an "event" object
# nesting at most MAX_DEPTH levels; its fields are validated into the class asked
# for, else the registered class named by "type", else an UnknownEvent keeping every
# field; anything else is an EventDecodeError saying what is wrong.  The oracle below
# is that contract spelled out on plain JSON values, not a call into the decoder.

#: Typed's name: ``<topic>:<ClassName>``; the ``module.QualName`` of earlier versions
#: still decodes to it.
_TYPED = "typed:Typed"
_TYPED_BEFORE = "tests.reliability.test_hostile_input.Typed"

#: The event classes the payloads of this module name, by type name.
KNOWN_TYPES: dict[str, type[BaseEvent]] = {
    "eventbus.BaseEvent": BaseEvent,
    _TYPED: Typed,
    _TYPED_BEFORE: Typed,
}
#: What a refusal says, per problem.
REFUSAL_WORDING = {
    "json": "event envelope is not valid JSON",
    "object": "event envelope must be a JSON object",
    "type": "event envelope has no 'type' string",
    "event": "has no 'event' object",
    "deep": "event envelope is too deeply nested",
    "fields": "invalid fields for event type",
}


@dataclass(frozen=True)
class Outcome:
    """What decoding a payload must do: ``decode`` it, ``refuse`` it (for one of
    ``reasons``, naming ``fields`` when they are the problem), or ``either`` (a
    value whose conversion the contract leaves to pydantic's lax rules)."""

    verdict: str
    reasons: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()


DECODE = Outcome("decode")
EITHER = Outcome("either")


def depth_of(value: Any) -> int:
    """Levels of nested dicts and lists; ``value`` itself is level 1 (iterative)."""
    depth, level = 0, [value]
    while level := [v for v in level if isinstance(v, dict | list)]:
        depth += 1
        level = [c for v in level for c in (v.values() if isinstance(v, dict) else v)]
    return depth


def expected_outcome(payload: Any, expected: type[BaseEvent] | None = None) -> Outcome:
    """What :func:`decode_event` must do with ``payload`` (see the contract above)."""
    document = payload
    if isinstance(payload, bytes | str):
        try:
            document = json.loads(payload)
        except RecursionError:  # nesting past the interpreter's limit, far past ours
            return Outcome("refuse", ("deep", "json"))
        except ValueError:  # UnicodeDecodeError included
            return Outcome("refuse", ("json", "deep"))  # the nesting may be checked first
    too_deep = depth_of(document) > MAX_DEPTH
    if not isinstance(document, dict):
        return Outcome("refuse", ("object", "deep") if too_deep else ("object",))
    if too_deep:
        return Outcome("refuse", ("deep",))
    type_name, fields = document.get("type"), document.get("event")
    if not isinstance(type_name, str) or not type_name:
        return Outcome("refuse", ("type",))
    if not isinstance(fields, dict):
        return Outcome("refuse", ("event",))
    cls = expected or KNOWN_TYPES.get(type_name)  # None: an UnknownEvent
    wrong = [name for name in ("topic", "event_id") if name in fields]
    wrong = [name for name in wrong if not isinstance(fields[name], str)]
    metadata = fields.get("metadata", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        wrong.append("metadata")
    lax = "timestamp" in fields  # datetimes from numbers and text: pydantic's rules
    if cls is not None and issubclass(cls, Typed):
        amount = fields.get("amount")
        if amount is None or isinstance(amount, dict | list):
            wrong.append("amount")  # missing, null or not a number
        lax = lax or not isinstance(amount, int)  # "12", 12.0: lax; bool is an int
    if wrong:
        return Outcome("refuse", ("fields",), tuple(wrong))
    return EITHER if lax else DECODE


def _decodes_or_refuses(payload: Any, expected: type[BaseEvent] | None = None) -> None:
    """Decode ``payload``: a valid envelope must decode to its fields, an invalid one
    must be refused with an EventDecodeError saying what is wrong."""
    outcome = expected_outcome(payload, expected)
    try:
        event = decode_event(payload, expected)
    except EventDecodeError as exc:
        message = str(exc)
        assert outcome.verdict != "decode", f"a valid envelope was refused: {message}"
        if outcome.verdict == "refuse":
            assert any(REFUSAL_WORDING[r] in message for r in outcome.reasons), (outcome, message)
            if outcome.fields:  # at least one of them (the message lists five at most)
                assert any(name in message for name in outcome.fields), (outcome, message)
        else:
            assert REFUSAL_WORDING["fields"] in message, message
        return
    assert outcome.verdict != "refuse", f"decoded, but must be refused {outcome}: {event!r}"
    if outcome.verdict == "decode":
        document = json.loads(payload) if isinstance(payload, bytes | str) else payload
        fields = document["event"]
        cls = expected or KNOWN_TYPES.get(document["type"])
        if cls is None:
            assert type(event) is UnknownEvent and event.event_type == document["type"]
            extra = {k: v for k, v in fields.items() if k not in BASE_FIELDS}
            assert same(event.model_extra, extra), (event.model_extra, extra)
        else:
            assert type(event) is cls
        for name in ("topic", "event_id", "metadata", "amount"):
            if name in fields:
                assert getattr(event, name) == fields[name], (name, event)
    assert isinstance(event, expected or BaseEvent)


#: The fields every event has (an UnknownEvent keeps the others as extras).
BASE_FIELDS = frozenset({"event_id", "topic", "timestamp", "metadata"})


def same(a: Any, b: Any) -> bool:
    """``a == b`` for JSON values, NaN equal to itself."""
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and bool(a == b)


_UNKNOWN = "x.Unknown"


@pytest.mark.parametrize(
    ("payload", "expected", "outcome"),
    [
        (b"", None, Outcome("refuse", ("json", "deep"))),
        (b"\xff\xfe{", None, Outcome("refuse", ("json", "deep"))),
        ("not json", None, Outcome("refuse", ("json", "deep"))),
        ("[]", None, Outcome("refuse", ("object",))),
        ([1, 2], None, Outcome("refuse", ("object",))),
        ("null", None, Outcome("refuse", ("object",))),
        ({"event": {}}, None, Outcome("refuse", ("type",))),
        ({"type": "", "event": {}}, None, Outcome("refuse", ("type",))),
        ({"type": 3, "event": {}}, None, Outcome("refuse", ("type",))),
        ({"type": _UNKNOWN}, None, Outcome("refuse", ("event",))),
        ({"type": _UNKNOWN, "event": []}, None, Outcome("refuse", ("event",))),
        (
            {"type": _UNKNOWN, "event": {"topic": 5}},
            None,
            Outcome("refuse", ("fields",), ("topic",)),
        ),
        (
            {"type": _UNKNOWN, "event": {"metadata": {"k": 1}}},
            None,
            Outcome("refuse", ("fields",), ("metadata",)),
        ),
        (
            {"type": _UNKNOWN, "event": {"topic": "t"}},
            Typed,
            Outcome("refuse", ("fields",), ("amount",)),
        ),
        ({"type": _UNKNOWN, "event": {}}, None, DECODE),
        ({"type": _UNKNOWN, "event": {"topic": "t", "p": [1, {"q": None}]}}, None, DECODE),
        ('{"type":"eventbus.BaseEvent","event":{"topic":"t","event_id":"e1"}}', None, DECODE),
        (b'{"type":"x.Y","event":{"amount":7,"metadata":{"k":"v"}}}', Typed, DECODE),
        ({"type": _UNKNOWN, "event": {"amount": 2**70}}, Typed, DECODE),
        ({"type": _TYPED, "event": {"amount": 3}}, None, DECODE),
        ({"type": _TYPED_BEFORE, "event": {"amount": 3}}, None, DECODE),
        ({"type": _TYPED, "event": {}}, None, Outcome("refuse", ("fields",), ("amount",))),
        ({"type": _UNKNOWN, "event": {"amount": "7"}}, Typed, EITHER),
        ({"type": _UNKNOWN, "event": {"timestamp": 1e308}}, None, EITHER),
    ],
)
def test_decoding_follows_the_envelope_contract(
    payload: Any, expected: type[BaseEvent] | None, outcome: Outcome
) -> None:
    """Hand-written answers: they check the oracle the random tests below rely on."""
    assert expected_outcome(payload, expected) == outcome
    _decodes_or_refuses(payload, expected)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.builds(
        Typed,
        amount=st.integers(-(10**30), 10**30),
        topic=st.text(min_size=1, max_size=64),
        event_id=st.text(max_size=40),
        timestamp=st.datetimes(timezones=st.none() | st.just(UTC)),
        metadata=st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=5),
    ),
    st.sampled_from(["dict", "text", "bytes"]),
    st.booleans(),
)
def test_valid_events_round_trip_whatever_their_field_values(
    event: Typed, form: str, by_hand: bool
) -> None:
    """A valid event always decodes back to itself, from an envelope written here by
    hand (JSON of its fields) or by the bus's own encoder."""
    fields = {
        "event_id": event.event_id,
        "topic": event.topic,
        "timestamp": event.timestamp.isoformat(),
        "metadata": event.metadata,
        "amount": event.amount,
    }
    envelope = {"type": _TYPED, "event": fields} if by_hand else encode_event(event)
    text = json.dumps(envelope) if by_hand else encode_envelope(event).decode()
    payload = {"dict": envelope, "text": text, "bytes": text.encode()}[form]
    assert decode_event(payload) == event
    assert decode_event(payload, Typed) == event
    _decodes_or_refuses(payload)


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


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(depths, st.sampled_from(["[", '{"a":']), st.booleans(), st.booleans())
@example(100_000, "[", True, False)  # once a RecursionError
@example(100_000, '{"a":', True, True)
def test_deep_json_text_raises_event_decode_error_past_the_limit(
    depth: int, opener: str, wrapped: bool, as_bytes: bool
) -> None:
    text = deep_text(depth, opener, wrapped)
    payload: str | bytes = text.encode() if as_bytes else text
    if envelope_depth(depth, wrapped) > MAX_DEPTH:
        with pytest.raises(EventDecodeError, match="too deeply nested"):
            decode_event(payload)
    else:
        _decodes_or_refuses(payload)
        _decodes_or_refuses(payload, Typed)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(depths, st.booleans())
@example(100_000, False)
def test_deep_objects_raise_event_decode_error_past_the_limit(depth: int, in_dicts: bool) -> None:
    envelope = {"type": "x.Deep", "event": {"topic": "t", "p": deep_object(depth, in_dicts)}}
    if depth + 2 > MAX_DEPTH:
        with pytest.raises(EventDecodeError, match="too deeply nested"):
            decode_event(envelope)
        with pytest.raises(EventDecodeError, match="too deeply nested"):
            decode_event(envelope, Typed)
    else:
        _decodes_or_refuses(envelope)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wild_envelopes)
def test_out_of_range_values_decode_or_raise(envelope: dict[str, Any]) -> None:
    _decodes_or_refuses(envelope)
    _decodes_or_refuses(envelope, Typed)
    try:
        text = json.dumps(envelope)
    except ValueError:  # an integer past Python's int-to-text limit
        return
    _decodes_or_refuses(text)
    _decodes_or_refuses(text.encode(), Typed)


@pytest.mark.parametrize("digits", [4_300, 4_301, 100_000])
def test_integers_past_the_parsers_digit_limit_raise_event_decode_error(digits: int) -> None:
    text = '{"type":"x.Typed","event":{"topic":"typed","amount":' + "9" * digits + "}}"
    if digits <= 4_300:
        assert decode_event(text, Typed).amount == int("9" * digits)  # type: ignore[attr-defined]
    else:
        with pytest.raises(EventDecodeError, match="not valid JSON"):
            decode_event(text, Typed)


#: What can be enqueued on the embedded broker (it encodes messages with json.dumps,
#: which gives up near 1,000 levels): deep values up to 600 levels, wild values.
_dispatcher_garbage = st.one_of(
    envelopes,
    json_values,
    wild_envelopes,
    st.builds(
        lambda depth, in_dicts: {"type": "x.Deep", "event": {"p": deep_object(depth, in_dicts)}},
        st.integers(MAX_DEPTH - 4, 600),
        st.booleans(),
    ),
)


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value)
    except ValueError:  # an integer past Python's int-to-text limit: cannot be enqueued
        return False
    return True


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_dispatcher_garbage.filter(_json_safe), min_size=1, max_size=20))
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


# -- names --------------------------------------------------------------------------

names = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=string.ascii_letters + string.digits + "._:/@+-", min_size=1, max_size=260),
    st.text(min_size=200, max_size=600),
)


def _handler(event: BaseEvent) -> None:
    pass


def _accepts_or_refuses(valid: bool, build: Callable[[], object], value: str) -> None:
    try:
        build()
    except ConfigurationError as exc:
        assert not valid, f"{value!r} is valid but was refused: {exc}"
        assert repr(value)[:40] in str(exc)  # the error names the offending value
    else:
        assert valid, f"{value!r} was accepted"


# The naming rules as the documentation and the error messages state them, written
# out here (not the implementation's patterns): topics are 1-249 ASCII letters,
# digits or . _ : / @ + - (Kafka's limit); queues are dramatiq's names, a letter or _
# then letters, digits, . _ -; handler names are 1-512 printable characters.
TOPIC_CHARACTERS = frozenset(string.ascii_letters + string.digits + "._:/@+-")
QUEUE_FIRST = frozenset(string.ascii_letters + "_")
QUEUE_REST = frozenset(string.ascii_letters + string.digits + "._-")
#: Unicode categories that are not printable: controls, format characters,
#: surrogates, private use, unassigned, and separators other than the space.
NOT_PRINTABLE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"})


def valid_topic(name: str) -> bool:
    return 1 <= len(name) <= 249 and set(name) <= TOPIC_CHARACTERS


def valid_queue(name: str) -> bool:
    return name[:1] in QUEUE_FIRST and set(name[1:]) <= QUEUE_REST


def valid_handler_name(name: str) -> bool:
    printable = all(c == " " or unicodedata.category(c) not in NOT_PRINTABLE for c in name)
    return 1 <= len(name) <= 512 and printable


TOPIC_EXAMPLES = [
    ("orders.created", True),
    ("a", True),
    ("svc:orders/v1@eu+1_a-b", True),
    ("x" * 249, True),
    ("x" * 250, False),
    ("", False),
    ("has space", False),
    ("tab\there", False),
    ("orders\n", False),
    ("ordérs", False),
    ("orders.\u0661", False),  # an Arabic-Indic digit: a digit, not an ASCII one
    ("\uff21", False),  # a fullwidth A
    ("a*b", False),
    ("a,b", False),
]
QUEUE_EXAMPLES = [
    ("default", True),
    ("_private", True),
    ("tests.eventbus", True),
    ("a-b_c.d9", True),
    ("q" * 300, True),
    ("", False),
    ("9lives", False),
    (".hidden", False),
    ("-dash", False),
    ("has space", False),
    ("a/b", False),
    ("a:b", False),
    ("ünïcode", False),
    ("q\n", False),
]
HANDLER_EXAMPLES = [
    ("orders.email", True),
    ("with a space", True),
    ("naïve:handler", True),
    ("x" * 512, True),
    ("x" * 513, False),
    ("", False),
    ("a\nb", False),
    ("nul\x00", False),
    ("tab\t", False),
    ("zero\u200bwidth", False),  # a format character
    ("no\u00a0break", False),  # a separator other than the space
    ("line\u2028separator", False),
]


@pytest.mark.parametrize(
    ("rule", "name", "valid"),
    [("topic", name, valid) for name, valid in TOPIC_EXAMPLES]
    + [("queue", name, valid) for name, valid in QUEUE_EXAMPLES]
    + [("handler", name, valid) for name, valid in HANDLER_EXAMPLES],
)
def test_names_are_checked_by_the_documented_rules(rule: str, name: str, valid: bool) -> None:
    """Hand-written answers: they check the predicates the random tests below rely on."""
    predicate = {"topic": valid_topic, "queue": valid_queue, "handler": valid_handler_name}
    assert predicate[rule](name) is valid
    build = {
        "topic": lambda: make_spec(name, _handler),
        "queue": lambda: make_spec("t", _handler, queue=name),
        "handler": lambda: make_spec("t", _handler, name=name),
    }[rule]
    _accepts_or_refuses(valid, build, name)


@given(names)
def test_topic_names_are_validated_with_a_clear_error(name: str) -> None:
    # make_spec is what @on_event and bus.registry.register validate with (calling
    # on_event here would register every random topic for the rest of the session).
    _accepts_or_refuses(valid_topic(name), lambda: make_spec(name, _handler), name)


@given(names)
def test_queue_names_are_validated_with_a_clear_error(name: str) -> None:
    _accepts_or_refuses(valid_queue(name), lambda: make_spec("t", _handler, queue=name), name)


@given(names)
def test_handler_names_are_validated_with_a_clear_error(name: str) -> None:
    valid = valid_handler_name(name)
    _accepts_or_refuses(valid, lambda: make_spec("t", _handler, name=name), name)


@settings(max_examples=50, deadline=None)
@given(names | st.sampled_from([name for name, _ in TOPIC_EXAMPLES]))
async def test_publishing_to_a_random_topic_is_delivered_or_refused_clearly(name: str) -> None:
    bus = EventBus(settings=EventBusSettings(shutdown_timeout=1))
    await bus.start()
    try:
        try:
            await bus.publish(BaseEvent(topic=name))
        except PublishError as exc:
            assert not valid_topic(name), f"{name!r} is valid but was refused: {exc}"
            assert repr(name)[:40] in str(exc)
        else:
            assert valid_topic(name), f"{name!r} was published"
    finally:
        await bus.stop()


# -- a Redis worker's queue ---------------------------------------------------------

#: Good events carry n >= GOOD; anything handled below it came from the garbage.
GOOD = 1_000_000
RESERVED_OPTIONS = [
    "eta",
    "retries",
    "max_retries",
    "min_backoff",
    "max_backoff",
    "time_limit",
    "traceback",
    "throws",
    "pipe_target",
    "pipe_ignore",
    keys.TOPIC,
    keys.CORRELATION_ID,
    keys.TRACE_ID,
    keys.PARENT_SPAN_ID,
    keys.TRACE_CONTEXT,
    keys.ATTEMPTS,
    keys.FIRST_FAILED_AT,
    keys.REPLAY_OF,
]


def _message_shaped(actor: str) -> st.SearchStrategy[dict[str, Any]]:
    """JSON objects that look like dramatiq messages, with random parts."""
    options = st.dictionaries(st.sampled_from(RESERVED_OPTIONS) | st.text(max_size=8), json_values)
    return st.fixed_dictionaries(
        {},
        optional={
            "queue_name": st.sampled_from([QUEUE, "other"]) | json_values,
            "actor_name": st.sampled_from([actor, "no.such.actor", ""]) | json_values,
            "args": st.lists(envelopes | json_values, max_size=2) | json_values,
            "kwargs": st.just({}) | json_values,
            "options": options | json_values,
            "message_id": st.uuids().map(str) | json_values,
            "message_timestamp": st.integers() | json_values,
        },
    )


def _delayed_on_purpose(item: bytes | dict[str, Any]) -> bool:
    """A message asking for a future ``eta``: dramatiq delays it, as asked."""
    document: Any = item
    if isinstance(item, bytes):
        try:
            document = json.loads(item)
        except (ValueError, RecursionError):
            return False
    options = document.get("options") if isinstance(document, dict) else None
    eta = options.get("eta") if isinstance(options, dict) else None
    if not isinstance(eta, int | float) or isinstance(eta, bool):
        return False
    now = time.time() * 1000
    # A far eta is dead-lettered (MAX_ETA_AHEAD); a near one is waited for, as asked.
    return now < eta <= now + MAX_ETA_AHEAD * 1000 + 1000


def _deep_message(actor: str, depth: int) -> bytes:
    """A well-formed message whose envelope nests ``depth`` levels (as bytes: hypothesis
    cannot print objects that deep)."""
    envelope = b'{"type":"tests.reliability.handlers.Tracked","event":{"n":'
    envelope += b"[" * depth + b"1" + b"]" * depth + b"}}"
    # A unique message id: dead letters are keyed by it (see _encode).
    unique = f"{next(_unique)}:deep"
    shape = json.dumps(
        {**_VALID_SHAPE, "actor_name": actor, "args": ["@"], "message_id": unique}
    ).encode()
    return shape.replace(b'["@"]', b"[" + envelope + b"]")


def _deep_and_out_of_range(actor: str) -> st.SearchStrategy[bytes | dict[str, Any]]:
    """Message-shaped objects nested far too deep, and option values far out of range."""
    deep = st.integers(min_value=60, max_value=100_000).map(lambda d: _deep_message(actor, d))
    deep_text = st.integers(min_value=60, max_value=100_000).map(
        lambda d: b'{"type":"x","event":{"p":' + b"[" * d + b"]" * d + b"}}"
    )
    out_of_range = st.builds(
        lambda key, value: {**_VALID_SHAPE, "actor_name": actor, "options": {key: value}},
        st.sampled_from(["eta", "time_limit", keys.ATTEMPTS, keys.FIRST_FAILED_AT]),
        st.sampled_from([1e16, -1e16, 2**63, -(2**63), 1e308, 10**30]),
    )
    return st.one_of(deep, deep_text, out_of_range)


def _queue_garbage(actor: str) -> st.SearchStrategy[bytes | dict[str, Any]]:
    """Bytes for a queue, or message-shaped objects (encoded by the test)."""
    encoded = st.one_of(json_values, envelopes).map(lambda value: json.dumps(value).encode())
    # b"" is excluded: an empty string in a ready list is a wake-up token by design.
    return st.one_of(
        st.binary(min_size=1, max_size=256),
        encoded,
        _message_shaped(actor),
        _deep_and_out_of_range(actor),
    ).filter(lambda item: not _delayed_on_purpose(item))


_unique = itertools.count()
#: A well-formed message whose envelope is not an event (its handler fails on it).
_VALID_SHAPE: dict[str, Any] = {
    "queue_name": QUEUE,
    "actor_name": "",
    "args": [{"not": "an envelope"}],
    "kwargs": {},
    "options": {},
    "message_id": "m",
    "message_timestamp": 0,
}


def _encode(item: bytes | dict[str, Any]) -> bytes:
    """``item`` as queue bytes; string message ids made unique (hypothesis repeats
    values across examples, and dead letters are keyed by message id)."""
    if isinstance(item, bytes):
        return item
    if isinstance(item.get("message_id"), str):
        item = {**item, "message_id": f"{next(_unique)}:{item['message_id']}"}
    return json.dumps(item).encode()


async def test_redis_worker_dead_letters_garbage_in_its_queue_and_goes_on(
    make_redis_bus: Callable[..., EventBus],
    workers: Workers,
    namespace: str,
    redis_url: str,
    tmp_path: Path,
) -> None:
    """Random bytes, random JSON and random message-shaped JSON pushed straight
    into the queue of a running ``dramatiq eventbus.actors`` worker: each item is
    dead-lettered (or handled, if it happens to be a valid message), nothing stays
    pending, the worker process lives on and the good event after it is handled."""
    ledger_dir = tmp_path / "ledger"
    ledger_dir.mkdir()
    ledger = Ledger(ledger_dir)
    worker = workers.start(
        ("tests.reliability.handlers",), threads=2, env={"RELIABILITY_LEDGER": str(ledger_dir)}
    )
    bus = make_redis_bus()
    await bus.start()
    loop = asyncio.get_running_loop()
    client = redis.Redis.from_url(redis_url)
    queue = ready_key(namespace, QUEUE)
    bodies = bodies_key(namespace, QUEUE)
    actor = "reliability.record"
    assert client.hexists(f"{namespace}:t:{Tracked.default_topic()}", f"tests|{actor}")
    good = itertools.count(GOOD)

    abandoned = threading.Event()  # the test ended (timeout): stop generating

    def on_loop(coroutine: Any) -> Any:
        if abandoned.is_set():
            coroutine.close()
            raise RuntimeError("the test was abandoned")
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(15)

    @settings(
        max_examples=PROFILE.fuzz_examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        # No shrinking: each example runs against live processes, and a failure
        # already names its (at most 5) inputs.
        phases=[Phase.explicit, Phase.generate],
    )
    @given(st.lists(_queue_garbage(actor), min_size=1, max_size=5))
    # Each of these once killed a worker thread, wedged a message or lost its dead letter.
    @example([{**_VALID_SHAPE, "actor_name": actor, "queue_name": "elsewhere"}])
    @example([{**_VALID_SHAPE, "actor_name": actor, "options": {"throws": "x"}}])
    @example([{**_VALID_SHAPE, "actor_name": ["a"]}, {**_VALID_SHAPE, "message_id": True}])
    @example([{**_VALID_SHAPE, "actor_name": actor, "options": {keys.ATTEMPTS: "2"}}])
    # Issue 12: an envelope ~1,000 deep killed worker threads; a far eta starved the worker.
    @example([_deep_message(actor, 1000)] * 2)
    @example([{**_VALID_SHAPE, "actor_name": actor, "options": {"eta": 1e16}}] * 40)
    def garbage_then_a_good_event(items: list[bytes | dict[str, Any]]) -> None:
        garbage = [_encode(item) for item in items]
        dead_before = bus.dlq.size()
        handled_before = sum(ledger.refresh().done.values())
        entries = [f"garbage-{next(_unique)}" for _ in garbage]
        client.hset(bodies, mapping=dict(zip(entries, garbage, strict=True)))
        client.rpush(queue, *entries)
        n = next(good)
        on_loop(bus.publish(Tracked(n=n)))
        deadline = time.monotonic() + 15
        while ledger.missing([n]) or on_loop(bus.backend.pending()):  # type: ignore[attr-defined]
            assert worker.process.poll() is None, f"the worker died:\n{worker.output()}"
            assert time.monotonic() < deadline, (
                f"wedged: {on_loop(bus.backend.pending())} pending "  # type: ignore[attr-defined]
                f"after {garbage!r}\n{worker.output()[-3000:]}"
            )
            time.sleep(0.02)
        handled = sum(ledger.refresh().done.values()) - handled_before - 1
        dead = bus.dlq.size() - dead_before
        assert dead + handled == len(garbage), (dead, handled, garbage)

    try:
        await asyncio.to_thread(garbage_then_a_good_event)
    finally:
        abandoned.set()
        client.close()
    assert worker.process.poll() is None
    errors = {record.error_type for record in bus.dlq.peek(1000)}
    assert errors <= {"InvalidMessage", "ActorNotFound", "EventDecodeError"}, errors


async def test_redis_oversized_event_is_refused_with_nothing_enqueued(
    redis_url: str, namespace: str
) -> None:
    backend = RedisBackend(url=redis_url, namespace=namespace)
    bus = EventBus(backend=backend, settings=EventBusSettings(max_event_bytes=4096))
    await bus.start()
    try:
        with pytest.raises(EventTooLargeError, match="EVENTBUS_MAX_EVENT_BYTES=4096"):
            await bus.publish_many([Tracked(n=1), Tracked(n=2, metadata={"blob": "x" * 5000})])
        assert await backend.pending() == 0
    finally:
        await bus.stop()
        if backend.broker is not None:
            backend.broker.close()


# -- the Kafka bridge ---------------------------------------------------------------

_HEADER_NAMES = [
    HEADER_EVENT_TYPE,
    HEADER_EVENT_ID,
    HEADER_CORRELATION_ID,
    HEADER_TRACEPARENT,
    HEADER_REPLAY_OF,
    "tracestate",
    "baggage",
]


def nested_text(depth: int, opener: str, leaf: str = "0") -> bytes:
    """JSON text nesting ``depth`` arrays (``[``) or objects (``{"a":``) around ``leaf``."""
    closer = "]" if opener == "[" else "}"
    return (opener * depth + leaf + closer * depth).encode()


#: Values nested from a few levels to far past any parser's recursion limit, bare or
#: as the field of an envelope of a known type.
deep_values = st.builds(
    lambda depth, opener, wrapped: (
        b'{"type":"tests.kafka.Numbered","event":{"n":1,"p":' + nested_text(depth, opener) + b"}}"
        if wrapped
        else nested_text(depth, opener)
    ),
    st.integers(1, 100_000),
    st.sampled_from(["[", '{"a":']),
    st.booleans(),
)
kafka_records = st.fixed_dictionaries(
    {
        "value": st.one_of(
            st.none(),
            st.binary(max_size=256),
            st.one_of(json_values, envelopes).map(lambda v: json.dumps(v).encode()),
            deep_values,
        ),
        "key": st.none() | st.binary(max_size=16),
        "headers": st.lists(
            st.tuples(st.sampled_from(_HEADER_NAMES) | st.text(max_size=8), st.binary(max_size=64)),
            max_size=4,
        ),
    }
).filter(lambda record: record["value"] is not None or record["key"] is not None)  # aiokafka


async def test_kafka_bridge_dead_letters_garbage_records_and_goes_on(
    kafka_workers: Callable[..., Worker],
    kafka_bootstrap: str,
    kafka_names: tuple[str, str],
    tmp_path: Path,
) -> None:
    """Random records (no value, random bytes, random JSON, random envelopes, values
    nested up to 100,000 levels; random keys and headers) on a topic a worker
    process consumes: each one is dead-lettered to ``<topic>.dlq`` (or handled, if
    it happens to be a valid event), its offset committed, the worker lives on
    (its consumer never restarts) and the good event after it is handled."""
    from aiokafka import AIOKafkaProducer

    topic, group = kafka_names
    await create_topic(kafka_bootstrap, topic, 1)
    out = tmp_path / "handled.txt"
    ledger = Ledger(out, single=True)
    worker = kafka_workers(kafka_bootstrap, group, topic, out)
    publisher = EventBus(
        backend=KafkaBackend(kafka_bootstrap, group, idempotence=False),
        settings=EventBusSettings(shutdown_timeout=2),
    )
    await publisher.start()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=False)
    await producer.start()
    loop = asyncio.get_running_loop()
    good = itertools.count(GOOD)
    produced = 0
    garbage_total = 0

    abandoned = threading.Event()  # the test ended (timeout): stop generating

    def on_loop(coroutine: Any) -> Any:
        if abandoned.is_set():
            coroutine.close()
            raise RuntimeError("the test was abandoned")
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(15)

    @settings(
        max_examples=PROFILE.fuzz_examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        # No shrinking: each example runs against live processes, and a failure
        # already names its (at most 5) inputs.
        phases=[Phase.explicit, Phase.generate],
    )
    @given(st.lists(kafka_records, min_size=1, max_size=5))
    @example([{"value": nested_text(100_000, "["), "key": None, "headers": []}])
    def garbage_then_a_good_event(records: list[dict[str, Any]]) -> None:
        nonlocal produced, garbage_total
        for record in records:
            on_loop(producer.send_and_wait(topic, **record))
        n = next(good)
        on_loop(publisher.publish(Numbered(topic=topic, n=n, key="good")))
        produced += len(records) + 1
        garbage_total += len(records)
        deadline = time.monotonic() + 20
        while True:
            committed = on_loop(committed_offsets(kafka_bootstrap, group, topic))
            if not ledger.missing([n]) and committed.get(0, -1) >= produced:
                break
            assert worker.process.poll() is None, f"the worker died:\n{worker.output()}"
            assert time.monotonic() < deadline, (
                f"wedged at offset {committed} of {produced} after {records!r}\n"
                f"{worker.output()[-3000:]}"
            )
            time.sleep(0.05)

    try:
        await asyncio.to_thread(garbage_then_a_good_event)
        abandoned.set()
        handled_garbage = sum(c for n, c in ledger.refresh().done.items() if n < GOOD)
        dead = await read_topic(kafka_bootstrap, f"{topic}.dlq", garbage_total - handled_garbage)
        assert len(dead) == garbage_total - handled_garbage
        assert worker.process.poll() is None
        assert "reconnecting" not in worker.output(), worker.output()[-3000:]
    finally:
        abandoned.set()
        await producer.stop()
        await publisher.stop()
