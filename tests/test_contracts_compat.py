"""The compatibility engine: breaking changes between two pydantic event schemas."""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict

from eventbus.contracts import Breaking, check, event_schema, schema_hash
from eventbus.events import BaseEvent


def _event(name: str, fields: dict[str, Any], **config: Any) -> type[BaseEvent]:
    """An event class ``name`` with ``fields`` ({name: annotation or (annotation, default)}),
    kept out of the process-wide registry under a unique type name."""
    annotations: dict[str, Any] = {"topic": str}
    namespace: dict[str, Any] = {
        "__event_type__": f"contracts.test:{name}:{id(fields)}",
        "topic": "contracts.test",
        "__annotations__": annotations,
    }
    for field_name, spec in fields.items():
        if isinstance(spec, tuple):
            annotations[field_name], namespace[field_name] = spec
        else:
            annotations[field_name] = spec
    if config:
        namespace["model_config"] = ConfigDict(frozen=True, **config)
    return type(name, (BaseEvent,), namespace)


def _schema(fields: dict[str, Any], **config: Any) -> dict[str, Any]:
    return event_schema(_event("OrderPlaced", fields, **config))


def _lines(changes: list[Breaking]) -> list[str]:
    return [str(change) for change in changes]


def test_event_schema_leaves_out_the_envelope_and_is_deterministic() -> None:
    schema = _schema({"order_id": int, "note": (str, "")})
    assert set(schema["properties"]) == {"order_id", "note"}
    assert schema["required"] == ["order_id"]
    assert schema_hash(schema) == schema_hash(_schema({"note": (str, ""), "order_id": int}))
    assert schema_hash(schema) != schema_hash(_schema({"order_id": str, "note": (str, "")}))
    assert len(schema_hash(schema)) == 16


def test_a_renamed_field_breaks_both_ways_with_the_rename_named() -> None:
    old = _schema({"order_id": int, "email": str})
    new = _schema({"order_id": int, "email_address": str})
    assert _lines(check(old, new, "backward", event="OrderPlaced")) == [
        "OrderPlaced: email_address: new required field without a default (renamed from 'email'?)"
    ]
    assert _lines(check(old, new, "forward", event="OrderPlaced")) == [
        "OrderPlaced: email: field removed while the reader requires it (renamed to 'email_address'?)"
    ]
