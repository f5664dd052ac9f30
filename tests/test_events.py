"""Events on the wire: JSON envelopes that decode safely."""

from __future__ import annotations

import json
import sys

import pytest

from eventbus import BaseEvent, EventDecodeError
from eventbus.events import MAX_DEPTH, UnknownEvent, decode_event, encode_event


class UserCreated(BaseEvent):
    # Named: test_seed_examples defines a UserCreated of this topic in the same test
    # process, and two classes under one type name decode by name to the newest.
    __event_type__ = "tests.events.UserCreated"
    topic: str = "user.created"
    user_id: int
    username: str


def test_typed_event_round_trips_as_its_class() -> None:
    event = UserCreated(user_id=1, username="alice")
    wire = json.dumps(encode_event(event))

    decoded = decode_event(wire)

    assert type(decoded) is UserCreated
    assert decoded == event


def test_events_are_frozen() -> None:
    event = UserCreated(user_id=1, username="alice")
    with pytest.raises(ValueError, match="frozen"):
        event.username = "mallory"  # type: ignore[misc]


def test_unknown_type_decodes_to_base_event_with_every_field() -> None:
    envelope = encode_event(UserCreated(user_id=7, username="bob"))
    envelope["type"] = "someone.elses.Event"

    decoded = decode_event(envelope)

    assert isinstance(decoded, BaseEvent)
    assert isinstance(decoded, UnknownEvent)
    assert decoded.event_type == "someone.elses.Event"
    assert decoded.topic == "user.created"
    assert decoded.model_extra == {"user_id": 7, "username": "bob"}
    # re-encoding keeps the original type and fields (for dead letters and replay)
    again = encode_event(decoded)
    assert again["type"] == "someone.elses.Event"
    assert again["event"]["user_id"] == 7


def test_envelope_naming_a_module_imports_nothing() -> None:
    name = "eventbus_test_never_imported_module"
    envelope = {
        "type": f"{name}.Evil",
        "event": {"topic": "x"},
        "__event_cls__": f"{name}:Evil",  # the seed's field: must be ignored
    }
    before = set(sys.modules)

    decoded = decode_event(envelope)

    assert name not in sys.modules
    assert set(sys.modules) - before == set()
    assert isinstance(decoded, UnknownEvent)


def test_expected_class_validates_payload_into_it() -> None:
    fields = {"topic": "user.created", "user_id": "5", "username": "c"}
    envelope = {"type": "other.Name", "event": fields}

    decoded = decode_event(envelope, UserCreated)

    assert type(decoded) is UserCreated
    assert decoded.user_id == 5


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\xff\xfe not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ({"event": {}}, "no 'type'"),
        ({"type": "x.Y"}, "no 'event'"),
        ({"type": "x.Y", "event": {"timestamp": "yesterday"}}, "timestamp"),
    ],
)
def test_malformed_payload_raises_event_decode_error(payload: object, message: str) -> None:
    with pytest.raises(EventDecodeError, match=message):
        decode_event(payload)


def test_invalid_fields_for_expected_class_name_the_field() -> None:
    envelope = {"type": "t", "event": {"topic": "user.created", "user_id": "abc", "username": "c"}}
    with pytest.raises(EventDecodeError, match="user_id"):
        decode_event(envelope, UserCreated)


def test_event_type_name_can_be_pinned() -> None:
    class Pinned(BaseEvent):
        __event_type__ = "billing.InvoicePaid.v1"
        topic: str = "invoice.paid"

    envelope = encode_event(Pinned())
    assert envelope["type"] == "billing.InvoicePaid.v1"
    assert type(decode_event(envelope)) is Pinned


def test_seed_to_dict_from_dict_round_trip() -> None:
    event = UserCreated(user_id=3, username="d")
    assert BaseEvent.from_dict(event.to_dict()) == event


# -- nesting depth -------------------------------------------------------------------


def nested(depth: int, leaf: object = 0) -> object:
    """``leaf`` inside ``depth`` lists, built without recursion."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def envelope_nesting(field_depth: int) -> dict[str, object]:
    """An envelope whose field ``p`` holds ``field_depth`` nested lists."""
    return {"type": "x.Deep", "event": {"topic": "deep", "p": nested(field_depth)}}


@pytest.mark.parametrize("as_bytes", [False, True])
def test_100000_levels_of_json_text_raise_event_decode_error(as_bytes: bool) -> None:
    text = '{"type":"x","event":{"p":' + "[" * 100_000 + "]" * 100_000 + "}}"
    payload: str | bytes = text.encode() if as_bytes else text

    with pytest.raises(EventDecodeError, match="too deeply nested"):
        decode_event(payload)


def test_deeply_nested_dict_raises_event_decode_error() -> None:
    with pytest.raises(EventDecodeError, match="too deeply nested"):
        decode_event(envelope_nesting(100_000))


def test_a_self_containing_envelope_raises_event_decode_error() -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(EventDecodeError, match="too deeply nested"):
        decode_event({"type": "x.Loop", "event": {"topic": "t", "p": loop}})


def test_nesting_up_to_the_limit_decodes_one_more_level_does_not() -> None:
    # envelope (1) > event (2) > the lists: MAX_DEPTH levels in all
    fits = envelope_nesting(MAX_DEPTH - 2)
    too_deep = envelope_nesting(MAX_DEPTH - 1)

    for payload in (fits, json.dumps(fits)):
        assert decode_event(payload).model_extra == {"p": fits["event"]["p"]}  # type: ignore[index]
    for payload in (too_deep, json.dumps(too_deep), json.dumps(too_deep).encode()):
        with pytest.raises(EventDecodeError, match=f"more than {MAX_DEPTH} levels"):
            decode_event(payload)


def test_brackets_inside_strings_are_not_nesting() -> None:
    text = "[{" * 10_000 + '\\"]'
    event = decode_event(json.dumps({"type": "x.Text", "event": {"topic": "t", "s": text}}))
    assert event.model_extra == {"s": text}
