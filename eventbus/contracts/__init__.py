"""Event contracts between services: schemas of event classes and their compatibility.

* :func:`event_schema` / :func:`schema_hash`: the JSON Schema of an event class's
  own fields and a short content hash of it.
* :func:`breaking_changes` / :func:`check`: what a writer's payloads break in a
  reader, in the Schema Registry modes (backward, forward, full, transitive, none).
* :func:`event_classes`, :func:`read_contracts`, :func:`check_snapshot`,
  :func:`check_against`: what ``eventbus schema snapshot|check`` runs;
  :func:`assert_compatible` runs the same check in a service's own tests.
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
from eventbus.contracts.snapshot import (
    ContractError,
    assert_compatible,
    check_against,
    check_snapshot,
    event_classes,
    read_contracts,
)

__all__ = [
    "ENVELOPE_FIELDS",
    "MODES",
    "Breaking",
    "ContractError",
    "Mode",
    "assert_compatible",
    "breaking_changes",
    "check",
    "check_against",
    "check_snapshot",
    "event_classes",
    "event_schema",
    "format_breaking",
    "read_contracts",
    "schema_hash",
]
