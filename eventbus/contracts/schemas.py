"""The JSON Schema of an event class and its content hash.

The schema is what a handler typed by the class accepts: pydantic's validation
schema of the event's *own* fields.  The envelope fields every event carries
(``event_id``, ``topic``, ``timestamp``, ``metadata``) are left out: the bus
fills them in and every copy of :class:`~eventbus.events.BaseEvent` agrees on
them, so they never make two services' classes incompatible.  ``$defs`` (nested
models, enums) are kept.  The result is plain JSON with sorted keys, so
:func:`schema_hash` of the same class is the same in every process.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from eventbus.events import BaseEvent

#: The fields of :class:`BaseEvent` that travel in every envelope (left out of schemas).
ENVELOPE_FIELDS: tuple[str, ...] = tuple(BaseEvent.model_fields)

#: Key of the schema listing the envelope fields left out (informative).
ENVELOPE_KEY = "x-eventbus-envelope"

#: Key of a live subscriber schema holding its class's ``__event_version__``
#: (absent: version 1).  Compatibility checks ignore ``x-`` keys.
VERSION_KEY = "x-eventbus-version"

#: Key of a live subscriber schema listing the versions its class has an upcaster
#: from (``@upcaster(Cls, from_version=N)``), ascending (absent: none).
UPCASTS_KEY = "x-eventbus-upcasts-from"


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _sorted(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted(item) for item in value]
    return value


def event_schema(event_class: type[BaseEvent]) -> dict[str, Any]:
    """The JSON Schema (pydantic, ``mode="validation"``) of ``event_class``'s own fields.

    What a handler typed by this class accepts.  The envelope fields
    (:data:`ENVELOPE_FIELDS`) are removed from ``properties`` and ``required`` and
    named under ``"x-eventbus-envelope"``; ``$defs`` are kept; keys are sorted so
    the schema can be hashed (:func:`schema_hash`).
    """
    if not (isinstance(event_class, type) and issubclass(event_class, BaseEvent)):
        raise TypeError(f"event_schema() needs a BaseEvent subclass, got {event_class!r}")
    schema = event_class.model_json_schema(mode="validation")
    properties = schema.get("properties", {})
    for name in ENVELOPE_FIELDS:
        properties.pop(name, None)
    schema["properties"] = properties
    required = [name for name in schema.get("required", []) if name not in ENVELOPE_FIELDS]
    if required:
        schema["required"] = required
    else:
        schema.pop("required", None)
    schema[ENVELOPE_KEY] = list(ENVELOPE_FIELDS)
    result: dict[str, Any] = _sorted(schema)
    return result


def canonical_json(schema: dict[str, Any]) -> str:
    """``schema`` as compact JSON with sorted keys (the text :func:`schema_hash` hashes)."""
    return json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def schema_hash(schema: dict[str, Any]) -> str:
    """sha256 hex (first 16 characters) of the canonical JSON of ``schema``."""
    return hashlib.sha256(canonical_json(schema).encode("utf-8")).hexdigest()[:16]
