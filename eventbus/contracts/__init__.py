"""Event contracts between services: schemas of event classes and their compatibility.

* :func:`event_schema` / :func:`schema_hash`: the JSON Schema of an event class's
  own fields and a short content hash of it.
* :func:`breaking_changes` / :func:`check`: what a writer's payloads break in a
  reader, in the Schema Registry modes (backward, forward, full, transitive, none).
"""

from __future__ import annotations

from eventbus.contracts.compat import (
    MODES,
    Breaking,
    Mode,
    breaking_changes,
    check,
    format_breaking,
)
from eventbus.contracts.schemas import ENVELOPE_FIELDS, event_schema, schema_hash

__all__ = [
    "ENVELOPE_FIELDS",
    "MODES",
    "Breaking",
    "Mode",
    "breaking_changes",
    "check",
    "event_schema",
    "format_breaking",
    "schema_hash",
]
