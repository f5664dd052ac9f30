"""The compatibility engine: breaking changes between two pydantic event schemas.

Each schema comes from a real pydantic event class (``event_schema``); the lines
asserted are what ``eventbus schema check`` prints.
"""

from __future__ import annotations

import itertools
import json
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field

from eventbus.contracts import (
    MODES,
    Breaking,
    assert_compatible,
    breaking_changes,
    check,
    event_schema,
    schema_hash,
)
from eventbus.contracts.snapshot import dump, snapshot
from eventbus.events import BaseEvent

_ids = itertools.count()


def _event(fields: dict[str, Any], **config: Any) -> type[BaseEvent]:
    """An event class ``OrderPlaced`` with ``fields`` ({name: annotation, or
    (annotation, default)}), under a type name no other class has."""
    annotations: dict[str, Any] = {"topic": str}
    namespace: dict[str, Any] = {
        "__event_type__": f"contracts.test:OrderPlaced:{next(_ids)}",
        "topic": "contracts.test",
        "__annotations__": annotations,
    }
    for name, spec in fields.items():
        if isinstance(spec, tuple):
            annotations[name], namespace[name] = spec
        else:
            annotations[name] = spec
    if config:
        namespace["model_config"] = ConfigDict(frozen=True, **config)
    return type("OrderPlaced", (BaseEvent,), namespace)


def _schema(fields: dict[str, Any], **config: Any) -> dict[str, Any]:
    return event_schema(_event(fields, **config))


def _lines(changes: list[Breaking]) -> list[str]:
    return [str(change) for change in changes]


def _modes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[str]]:
    return {
        mode: _lines(check(old, new, mode, event="OrderPlaced"))  # type: ignore[arg-type]
        for mode in ("backward", "forward", "full")
    }


# -- the schema ------------------------------------------------------------------------


def test_event_schema_leaves_out_the_envelope_and_is_deterministic() -> None:
    schema = _schema({"order_id": int, "note": (str, "")})
    assert set(schema["properties"]) == {"order_id", "note"}
    assert schema["required"] == ["order_id"]
    assert schema_hash(schema) == schema_hash(_schema({"note": (str, ""), "order_id": int}))
    assert schema_hash(schema) != schema_hash(_schema({"order_id": str, "note": (str, "")}))
    assert len(schema_hash(schema)) == 16
    with pytest.raises(TypeError, match="BaseEvent subclass"):
        event_schema(BaseModel)  # type: ignore[arg-type]


# -- fields removed, renamed, added ----------------------------------------------------


def test_a_renamed_field_breaks_both_ways_with_the_rename_named() -> None:
    old = _schema({"order_id": int, "email": str})
    new = _schema({"order_id": int, "email_address": str})
    assert _modes(old, new) == {
        "backward": [
            "OrderPlaced: email_address: new required field without a default "
            "(renamed from 'email'?)"
        ],
        "forward": [
            "OrderPlaced: email: field removed while the reader requires it "
            "(renamed to 'email_address'?)"
        ],
        "full": [
            "OrderPlaced: email_address: new required field without a default "
            "(renamed from 'email'?)",
            "OrderPlaced: email: field removed while the reader requires it "
            "(renamed to 'email_address'?)",
        ],
    }
    # Between two services (no old/new): the reader's words.
    assert _lines(breaking_changes(new, old, event="OrderPlaced")) == [
        "OrderPlaced: email: required by the reader, missing from the writer "
        "(the writer's 'email_address'? renamed)"
    ]


def test_a_removed_field_breaks_only_readers_that_require_it() -> None:
    required = _schema({"order_id": int, "coupon": str})
    optional = _schema({"order_id": int, "coupon": (str | None, None)})
    gone = _schema({"order_id": int})
    assert _modes(required, gone)["forward"] == [
        "OrderPlaced: coupon: field removed while the reader requires it"
    ]
    assert _modes(required, gone)["backward"] == []  # the new reader ignores it
    assert _modes(optional, gone) == {"backward": [], "forward": [], "full": []}


def test_a_new_field_breaks_backward_only_without_a_default() -> None:
    old = _schema({"order_id": int})
    assert _modes(old, _schema({"order_id": int, "channel": str})) == {
        "backward": ["OrderPlaced: channel: new required field without a default"],
        "forward": [],
        "full": ["OrderPlaced: channel: new required field without a default"],
    }
    with_default = _schema({"order_id": int, "channel": (str, "web")})
    optional = _schema({"order_id": int, "channel": (str | None, None)})
    assert _modes(old, with_default) == {"backward": [], "forward": [], "full": []}
    assert _modes(old, optional) == {"backward": [], "forward": [], "full": []}


# -- types -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after", "line"),
    [
        (int, bool, "type narrowed: integer -> boolean"),
        (int, str, "type changed: integer -> string"),
        (float, int, "type narrowed: number -> integer"),
        (str, int, "type changed: string -> integer"),
        (list[int], list[str], "type changed: integer -> string"),
    ],
)
def test_a_narrowed_type_breaks_the_new_reader(before: Any, after: Any, line: str) -> None:
    path = "amount[]" if "list" in str(before) else "amount"
    lines = _modes(_schema({"amount": before}), _schema({"amount": after}))
    assert lines["backward"] == [f"OrderPlaced: {path}: {line}"]
    assert lines["full"][0] == f"OrderPlaced: {path}: {line}"


def test_a_widened_type_is_backward_compatible_only() -> None:
    lines = _modes(_schema({"amount": int}), _schema({"amount": float}))
    assert lines["backward"] == []
    assert lines["forward"] == ["OrderPlaced: amount: type narrowed: number -> integer"]
    # pydantic takes true for 1 where an integer is expected (lax validation).
    assert _modes(_schema({"flag": bool}), _schema({"flag": int}))["backward"] == []


def test_a_union_member_removed_breaks() -> None:
    lines = _modes(_schema({"ref": int | str}), _schema({"ref": int}))
    assert lines["backward"] == ["OrderPlaced: ref: type changed: string -> integer"]
    assert lines["forward"] == []
    three = _schema({"ref": int | str | list[int]})
    assert _lines(check(three, _schema({"ref": int | str}), "backward", event="E")) == [
        "E: ref: union member removed: the writer may send array, "
        "the reader accepts only integer | string"
    ]


def test_optional_made_required_breaks_on_null_and_on_absence() -> None:
    old = _schema({"note": (str | None, None)})
    assert _modes(old, _schema({"note": str}))["backward"] == [
        "OrderPlaced: note: optional field made required (the writer may leave it out)",
        "OrderPlaced: note: null no longer accepted (an Optional field made required)",
    ]
    # With a default the field may be absent, but null still breaks it.
    assert _modes(old, _schema({"note": (str, "")}))["backward"] == [
        "OrderPlaced: note: null no longer accepted (an Optional field made required)"
    ]
    assert _modes(_schema({"note": str}), old)["backward"] == []


# -- constraints -----------------------------------------------------------------------


def test_string_constraints_tightened_break() -> None:
    def code(**constraints: Any) -> dict[str, Any]:
        return _schema({"code": Annotated[str, Field(**constraints)]})

    assert _modes(code(max_length=10), code(max_length=5))["backward"] == [
        "OrderPlaced: code: maxLength lowered from 10 to 5"
    ]
    assert _modes(code(max_length=5), code(max_length=10))["backward"] == []
    assert _modes(code(), code(min_length=2))["backward"] == [
        "OrderPlaced: code: minLength 2 added"
    ]
    assert _modes(code(), code(pattern="^[A-Z]+$"))["backward"] == [
        'OrderPlaced: code: pattern "^[A-Z]+$" added (compared as text)'
    ]
    # The same pattern on both sides is compatible; a different text is reported
    # even when it accepts more (conservative).
    assert _modes(code(pattern="^[A-Z]+$"), code(pattern="^[A-Z]+$"))["full"] == []
    assert _modes(code(pattern="^[A-Z]+$"), code(pattern="^[A-Za-z]+$"))["backward"] == [
        'OrderPlaced: code: pattern changed: "^[A-Z]+$" -> "^[A-Za-z]+$" (compared as text)'
    ]
    # A str field that becomes a datetime: the reader's format is new.
    assert _modes(_schema({"at": str}), _schema({"at": datetime}))["backward"] == [
        'OrderPlaced: at: format "date-time" added (compared as text)'
    ]
    assert _modes(_schema({"at": datetime}), _schema({"at": str}))["backward"] == []


def test_number_bounds_tightened_break() -> None:
    def qty(**constraints: Any) -> dict[str, Any]:
        return _schema({"qty": Annotated[int, Field(**constraints)]})

    assert _modes(qty(ge=0), qty(ge=1))["backward"] == [
        "OrderPlaced: qty: minimum raised from 0 to 1"
    ]
    assert _modes(qty(le=100), qty(lt=50))["backward"] == [
        "OrderPlaced: qty: exclusiveMaximum 50 added"
    ]
    assert _modes(qty(ge=1), qty(ge=0))["backward"] == []


class Color(StrEnum):
    RED = "red"
    BLUE = "blue"


class FewerColors(StrEnum):
    RED = "red"


def test_an_enum_value_removed_or_a_literal_narrowed_breaks() -> None:
    old = _schema({"color": Color})
    new = _schema({"color": FewerColors})
    assert "$defs" in old  # an Enum class lives in $defs, referenced by $ref
    assert _modes(old, new) == {
        "backward": ['OrderPlaced: color: enum value "blue" removed while the writer may send it'],
        "forward": [],
        "full": ['OrderPlaced: color: enum value "blue" removed while the writer may send it'],
    }
    assert _modes(new, old)["forward"] == [
        'OrderPlaced: color: enum value "blue" added: the reader does not accept it'
    ]
    literal = _modes(
        _schema({"kind": (Literal["retail", "wholesale"], "retail")}),
        _schema({"kind": (Literal["retail"], "retail")}),
    )
    assert literal["backward"] == [
        'OrderPlaced: kind: enum value "wholesale" removed while the writer may send it'
    ]
    assert _modes(_schema({"kind": str}), _schema({"kind": Literal["a", "b"]}))["backward"] == [
        "OrderPlaced: kind: narrowed to fixed values: the writer sends any string, "
        'the reader accepts only "a", "b"'
    ]
    assert _modes(_schema({"kind": Literal["a", "b"]}), _schema({"kind": str}))["full"] == [
        "OrderPlaced: kind: narrowed to fixed values: the writer sends any string, "
        'the reader accepts only "a", "b"'
    ]


# -- nested models, lists, dicts, recursion, extra="forbid" ------------------------------


class Customer(BaseModel):
    email: str
    name: str = ""


class CustomerV2(BaseModel):
    email: Annotated[str, Field(max_length=50)]
    name: str = ""
    tier: int


class Line(BaseModel):
    sku: str
    qty: int


class LineV2(BaseModel):
    sku: int
    qty: int


def test_nested_models_lists_and_dicts_are_compared_field_by_field() -> None:
    old = _schema({"customer": Customer, "lines": list[Line], "prices": dict[str, float]})
    new = _schema({"customer": CustomerV2, "lines": list[LineV2], "prices": dict[str, int]})
    assert _modes(old, new)["backward"] == [
        "OrderPlaced: customer.tier: new required field without a default",
        "OrderPlaced: customer.email: maxLength 50 added",
        "OrderPlaced: lines[].sku: type changed: string -> integer",
        "OrderPlaced: prices.*: type narrowed: number -> integer",
    ]
    assert _modes(old, new)["forward"] == [
        "OrderPlaced: lines[].sku: type changed: integer -> string"
    ]
    # An optional nested model made required, and one dropped from a reader.
    optional = _schema({"customer": (Customer | None, None)})
    assert _modes(optional, _schema({"customer": Customer}))["backward"] == [
        "OrderPlaced: customer: optional field made required (the writer may leave it out)",
        "OrderPlaced: customer: null no longer accepted (an Optional field made required)",
    ]


def test_a_nested_model_used_twice_is_reported_at_both_paths() -> None:
    old = _schema({"billing": Customer, "shipping": Customer})
    new = _schema({"billing": CustomerV2, "shipping": CustomerV2})
    assert _modes(old, new)["backward"] == [
        "OrderPlaced: billing.tier: new required field without a default",
        "OrderPlaced: billing.email: maxLength 50 added",
        "OrderPlaced: shipping.tier: new required field without a default",
        "OrderPlaced: shipping.email: maxLength 50 added",
    ]


class Node(BaseModel):
    name: str
    children: list[Node] = []


class NodeV2(BaseModel):
    name: Annotated[str, Field(max_length=8)]
    children: list[NodeV2] = []


def test_recursive_models_terminate_and_report_inside_the_recursion() -> None:
    old = _schema({"tree": Node})
    assert _modes(old, old) == {"backward": [], "forward": [], "full": []}
    assert _modes(old, _schema({"tree": NodeV2}))["backward"] == [
        "OrderPlaced: tree.name: maxLength 8 added"
    ]


class Card(BaseModel):
    method: Literal["card"] = "card"
    last4: str


class Transfer(BaseModel):
    method: Literal["transfer"] = "transfer"
    iban: str


class Cash(BaseModel):
    method: Literal["cash"] = "cash"


Payment3 = Annotated[Card | Transfer | Cash, Field(discriminator="method")]
Payment2 = Annotated[Card | Transfer, Field(discriminator="method")]


def test_a_discriminated_union_member_removed_breaks() -> None:
    old = _schema({"payment": Payment3})
    new = _schema({"payment": Payment2})
    assert _modes(old, old)["full"] == []
    assert _modes(old, new)["backward"] == [
        "OrderPlaced: payment: union member removed: the writer may send object (Cash), "
        "the reader accepts only object (Card) | object (Transfer)"
    ]
    assert _modes(old, new)["forward"] == []


def test_tuples_are_compared_position_by_position() -> None:
    old = _schema({"pair": tuple[int, str]})
    assert _modes(old, _schema({"pair": tuple[int, int]}))["backward"] == [
        "OrderPlaced: pair[1]: type changed: string -> integer"
    ]
    assert _modes(old, old)["full"] == []


def test_extra_forbid_in_the_reader_breaks_on_a_field_the_writer_adds() -> None:
    writer = _schema({"order_id": int, "channel": (str, "web")})
    forbidding = _schema({"order_id": int}, extra="forbid")
    ignoring = _schema({"order_id": int})
    assert _lines(breaking_changes(writer, forbidding, event="E")) == [
        "E: channel: the writer sends a field the reader forbids (extra='forbid')"
    ]
    assert breaking_changes(writer, ignoring) == []
    assert breaking_changes(_schema({"order_id": int}), forbidding) == []


# -- modes and history ------------------------------------------------------------------


def test_full_is_backward_plus_forward_and_none_checks_nothing() -> None:
    old = _schema({"order_id": int, "email": str})
    new = _schema({"order_id": str, "email_address": str})
    both = _modes(old, new)
    assert both["full"] == both["backward"] + both["forward"]
    assert check(old, new, "none") == []
    with pytest.raises(ValueError, match="unknown compatibility mode 'sideways'"):
        check(old, new, "sideways")  # type: ignore[arg-type]


def test_transitive_modes_check_every_version_in_the_history() -> None:
    # v1 sends code as a string; v2 dropped it; v3 brings it back as an int.
    v1 = _schema({"order_id": int, "code": str})
    v2 = _schema({"order_id": int})
    v3 = _schema({"order_id": int, "code": (int, 0)})
    assert check(v2, v3, "backward") == []
    assert _lines(check(v2, v3, "backward_transitive", event="E", history=[v1])) == [
        "E: code: type changed: string -> integer (against version 1 of 1 in the history)"
    ]
    # Forward: v1 read code as an optional int; v2 did not read it; v3 sends a string.
    r1 = _schema({"order_id": int, "code": (int, 0)})
    w3 = _schema({"order_id": int, "code": str})
    assert check(v2, w3, "forward") == []
    assert _lines(check(v2, w3, "forward_transitive", event="E", history=[r1])) == [
        "E: code: type changed: string -> integer (against version 1 of 1 in the history)"
    ]
    assert _lines(check(v2, w3, "full_transitive", event="E", history=[r1])) == [
        "E: code: new required field without a default",
        "E: code: optional field made required (the writer may leave it out) "
        "(against version 1 of 1 in the history)",
        "E: code: type changed: integer -> string (against version 1 of 1 in the history)",
        "E: code: type changed: string -> integer (against version 1 of 1 in the history)",
    ]
    assert check(v2, w3, "forward", history=[r1]) == []  # history only in transitive modes


def test_a_dangling_ref_is_a_clear_error() -> None:
    bad = {"type": "object", "properties": {"x": {"$ref": "#/$defs/Missing"}}}
    with pytest.raises(ValueError, match="points to nothing"):
        breaking_changes(bad, _schema({"x": int}))


# -- property: every schema is compatible with itself -------------------------------------

_leaves = st.sampled_from(
    [int, float, str, bool, Color, Literal["a", "b"], Annotated[str, Field(max_length=3)]]
)
_types = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        inner.map(lambda t: list[t]),  # type: ignore[valid-type]
        inner.map(lambda t: dict[str, t]),  # type: ignore[valid-type]
        inner.map(lambda t: t | None),
        st.tuples(inner, inner).map(lambda ts: ts[0] | ts[1]),
    ),
    max_leaves=4,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), _types, min_size=1, max_size=4))
def test_every_schema_is_compatible_with_itself_and_with_a_new_optional_field(
    fields: dict[str, Any],
) -> None:
    schema = _schema(fields)
    for mode in MODES:
        assert check(schema, schema, mode, history=[schema]) == []  # type: ignore[arg-type]
    wider = _schema({**fields, "added": (str | None, None)})
    assert check(schema, wider, "full") == []


# -- the pytest helper --------------------------------------------------------------------


def test_assert_compatible_passes_and_fails_with_one_line_per_change(tmp_path: Path) -> None:
    old = _event({"order_id": int, "email": str})
    path = tmp_path / "contracts.json"
    path.write_text(dump(snapshot({old.__event_type__: old})))
    assert_compatible(old, path)
    renamed = _event({"order_id": int, "email_address": str})
    renamed.__event_type__ = old.__event_type__
    with pytest.raises(AssertionError) as failure:
        assert_compatible([renamed], path, mode="backward")
    assert str(failure.value).splitlines() == [
        f"1 breaking change(s) against {path} (mode backward):",
        f"{old.__event_type__}: email_address: new required field without a default "
        "(renamed from 'email'?)",
    ]
    assert json.loads(path.read_text())["events"][old.__event_type__]["hash"] == schema_hash(
        event_schema(old)
    )


def test_a_version_with_upcasters_skips_only_the_backward_check(tmp_path: Path) -> None:
    from eventbus.contracts import check_snapshot, read_contracts
    from eventbus.contracts.snapshot import contracts_of
    from eventbus.upcasting import upcaster

    v1 = _event({"order_id": int, "amount": float})
    path = tmp_path / "contracts.json"
    path.write_text(dump(snapshot({v1.__event_type__: v1})))
    recorded = read_contracts(path)

    def v2() -> type[BaseEvent]:
        cls = _event({"order_id": int, "amount_cents": int})
        cls.__event_type__ = v1.__event_type__
        cls.__event_version__ = 2
        return cls

    name = v1.__event_type__
    plain = v2()
    without = check_snapshot(contracts_of({name: plain}), recorded, "full")
    removed = "field removed while the reader requires it (renamed to 'amount_cents'?)"
    assert [b.change for b in without.breaking] == [
        "new required field without a default",
        removed,
    ]
    upcast = v2()

    @upcaster(upcast, from_version=1)
    def to_cents(fields: dict[str, Any]) -> dict[str, Any]:
        fields["amount_cents"] = round(fields.pop("amount") * 100)
        return fields

    result = check_snapshot(contracts_of({name: upcast}), recorded, "full")
    # Old readers still get version-2 payloads as they are: forward still breaks.
    assert [b.change for b in result.breaking] == [removed]
    assert result.notes == [
        f"{name}: version 1 payloads are upcast to version 2: the backward check against "
        "them is skipped"
    ]
    assert check_snapshot(contracts_of({name: upcast}), recorded, "backward").ok


def test_the_version_keys_of_live_schemas_are_no_breaking_change(tmp_path: Path) -> None:
    # Live subscriber schemas carry the class's version and upcasters ("x-" keys);
    # neither the compatibility engine nor snapshots count them as a change.
    from eventbus.contracts import check_snapshot, read_contracts
    from eventbus.contracts.live import live_schema
    from eventbus.contracts.schemas import UPCASTS_KEY, VERSION_KEY
    from eventbus.contracts.snapshot import contracts_of
    from eventbus.upcasting import upcaster

    v1 = _event({"order_id": int, "note": (str, "")})
    v3 = _event({"order_id": int, "note": (str, "")})
    v3.__event_type__ = v1.__event_type__
    v3.__event_version__ = 3

    @upcaster(v3, from_version=2)
    def same(fields: dict[str, Any]) -> dict[str, Any]:
        return fields

    old, new = live_schema(v1), live_schema(v3)
    assert VERSION_KEY not in old and UPCASTS_KEY not in old  # version 1: as before
    assert (new[VERSION_KEY], new[UPCASTS_KEY]) == (3, [2])
    assert _modes(old, new) == {"backward": [], "forward": [], "full": []}
    assert check(new, old, "full_transitive", history=[new, old]) == []
    # A snapshot holds the plain schema: the keys never reach a committed file.
    name = v1.__event_type__
    document = snapshot({name: v3})
    assert document["events"][name]["schema"] == event_schema(v3)
    path = tmp_path / "contracts.json"
    path.write_text(dump(snapshot({name: v1})))
    result = check_snapshot(contracts_of({name: v3}), read_contracts(path), "full")
    assert result.breaking == []


def test_an_asyncapi_document_is_read_as_another_services_contracts(tmp_path: Path) -> None:
    from eventbus.contracts import check_against, read_contracts
    from eventbus.contracts.snapshot import contracts_of

    mine = _event({"order_id": int, "customer": Customer})
    name = mine.__event_type__
    theirs = _schema({"order_id": int, "customer": CustomerV2})  # $defs inside
    defs = theirs.pop("$defs")
    text = json.dumps(theirs).replace("#/$defs/", "#/components/schemas/")
    event = json.loads(text)
    event["properties"]["event_id"] = {"type": "string"}  # an envelope field: left out
    document = {
        "asyncapi": "3.0.0",
        "info": {"title": "shipping", "version": "1"},
        "channels": {
            "order.placed": {
                "messages": {"OrderPlaced": {"$ref": "#/components/messages/OrderPlaced"}}
            }
        },
        "components": {
            "messages": {
                "OrderPlaced": {
                    "name": name,
                    "payload": {
                        "type": "object",
                        "properties": {
                            "type": {"const": name},
                            "event": {"$ref": "#/components/schemas/OrderPlacedEvent"},
                        },
                    },
                }
            },
            "schemas": {"OrderPlacedEvent": event, **defs},
        },
    }
    path = tmp_path / "asyncapi.json"
    path.write_text(json.dumps(document))
    other = read_contracts(path)
    assert set(other) == {name}
    assert "event_id" not in other[name].schema["properties"]
    result = check_against(contracts_of({name: mine}), other, "subscriber")
    assert [str(b) for b in result.breaking] == [
        f"{name}: customer.tier: field removed while the reader requires it",
        f"{name}: customer.email: maxLength 50 added",
    ]
    assert check_against(contracts_of({name: mine}), other, "publisher").ok


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.dictionaries(st.sampled_from(["a", "b", "c"]), _types, min_size=1, max_size=3),
    st.dictionaries(st.sampled_from(["a", "b", "c"]), _types, min_size=0, max_size=3),
    st.data(),
)
def test_no_breaking_change_means_the_reader_accepts_what_the_writer_sends(
    writer_fields: dict[str, Any], reader_fields: dict[str, Any], data: st.DataObject
) -> None:
    """Soundness on random pairs: when nothing is reported, a payload the writer's
    class produced validates in the reader's class (pydantic, as a handler would)."""
    writer, reader = _event(writer_fields), _event(reader_fields)
    changes = breaking_changes(event_schema(writer), event_schema(reader))
    values = {name: data.draw(st.from_type(kind)) for name, kind in writer_fields.items()}
    try:
        sent = writer.model_validate(values).model_dump(mode="json")
    except ValueError:
        return  # hypothesis drew a value the writer itself refuses (a constraint)
    if not changes:
        reader.model_validate(sent)
