"""Snapshots of a service's event contracts, and the check before deploy.

A *snapshot* (``eventbus schema snapshot MODULES -o contracts.json``) is a JSON
file committed with the code: for each event type name, its topic, class, JSON
Schema (:func:`~eventbus.contracts.schemas.event_schema`), hash, and the older
schemas it replaced (``history``, oldest first: the transitive modes check them
too)::

    {"eventbus_contract": 1,
     "events": {"order.placed:OrderPlaced": {"topic": "order.placed",
                "class": "shop.events.OrderPlaced", "hash": "3f1c...",
                "schema": {...}, "history": [{"hash": "...", "schema": {...}}]}}}

``eventbus schema check`` and :func:`assert_compatible` compare the classes of
the code with a snapshot (old -> new, in a Schema Registry mode) and with another
service's snapshot or AsyncAPI document (``--against``, the other service as the
publisher or the subscriber).  Events are matched by type name, which is the same
in every codebase holding a copy of a class (``<topic>:<ClassName>``).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from eventbus.contracts.compat import MODES, Breaking, Mode, _diff, check
from eventbus.contracts.schemas import ENVELOPE_FIELDS, event_schema, schema_hash
from eventbus.events import BaseEvent
from eventbus.exceptions import EventBusError
from eventbus.registry import decorated_handlers
from eventbus.upcasting import missing_steps

#: Version of the snapshot format written by :func:`snapshot`.
FORMAT_VERSION = 1
#: The key that marks a snapshot file.
FORMAT_KEY = "eventbus_contract"

#: The role of the other service in a comparison: it publishes (writes) the
#: events, or it subscribes to (reads) them.
Role = Literal["publisher", "subscriber"]
ROLES: tuple[str, ...] = ("publisher", "subscriber")


class ContractError(EventBusError, ValueError):
    """Bad input to a contract check: a module that does not import, a file that
    cannot be read or is not a snapshot/AsyncAPI document, an unknown mode."""


@dataclass(frozen=True)
class EventContract:
    """One event type of a snapshot or of the code.

    Attributes:
      name: The event type name (``<topic>:<ClassName>`` by default).
      topic: Its default topic ("" when the class has none).
      schema: Its JSON Schema (the event's own fields).
      history: Older schemas it replaced, oldest first.
      origin: Where it comes from (``module.QualName`` of a class, or a file).
      version: Its ``__event_version__``.
      history_versions: The version of each schema of :attr:`history`.
      upcasts_from: The oldest version whose payloads this class's registered
        upcasters bring up to :attr:`version` (None: no complete chain).
    """

    name: str
    topic: str
    schema: dict[str, Any]
    history: tuple[dict[str, Any], ...] = ()
    origin: str = ""
    version: int = 1
    history_versions: tuple[int, ...] = ()
    upcasts_from: int | None = None

    def versions(self) -> list[tuple[dict[str, Any], int]]:
        """Each schema of the history with its version, oldest first, then this one."""
        olds = list(self.history_versions) + [self.version] * len(self.history)
        return [*zip(self.history, olds, strict=False), (self.schema, self.version)]

    @property
    def hash(self) -> str:
        """:func:`schema_hash` of :attr:`schema`."""
        return schema_hash(self.schema)


@dataclass
class CheckResult:
    """The outcome of a comparison.

    Attributes:
      breaking: One entry per breaking change (empty: compatible).
      checked: How many event types were compared.
      notes: Informative lines (an event type on one side only).
    """

    breaking: list[Breaking] = field(default_factory=list)
    checked: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing breaks."""
        return not self.breaking


# -- the classes of the code ---------------------------------------------------------


def import_modules(names: Iterable[str]) -> list[ModuleType]:
    """Import each module (``pkg.mod``, or ``pkg.mod:attr`` as an application is
    named: the module is imported); the working directory is on the path, as for
    ``dramatiq``.

    Raises:
      ContractError: a module cannot be imported.
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    modules = []
    for name in names:
        module_name = name.partition(":")[0]
        try:
            modules.append(importlib.import_module(module_name))
        except Exception as exc:  # an import runs user code: any error is bad input
            raise ContractError(
                f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
            ) from exc
    return modules


def _subclasses(cls: type[BaseEvent]) -> Iterable[type[BaseEvent]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _under(module: str, names: Sequence[str]) -> bool:
    return any(module == name or module.startswith(name + ".") for name in names)


def event_classes(
    sources: Iterable[str | ModuleType | type[BaseEvent]],
) -> dict[str, type[BaseEvent]]:
    """The event classes of ``sources`` by type name.

    A source is an event class, a module, or a module name (imported).  A module
    contributes the :class:`BaseEvent` subclasses defined in it or in its
    submodules that are imported, those it imports (a module attribute), and the
    classes its ``@on_event`` handlers validate into.

    Raises:
      ContractError: a module cannot be imported.
    """
    found: dict[str, type[BaseEvent]] = {}
    names: list[str] = []
    modules: list[ModuleType] = []
    for source in sources:
        if isinstance(source, type) and issubclass(source, BaseEvent):
            found[source.__event_type__] = source
        elif isinstance(source, ModuleType):
            modules.append(source)
        elif isinstance(source, str):
            modules += import_modules([source])
        else:
            raise ContractError(f"not an event class, module or module name: {source!r}")
    names = [module.__name__ for module in modules]
    candidates: list[type[BaseEvent]] = []
    candidates += [c for c in _subclasses(BaseEvent) if _under(c.__module__, names)]
    for module in modules:
        candidates += [
            value
            for value in vars(module).values()
            if isinstance(value, type) and issubclass(value, BaseEvent)
        ]
    candidates += [
        spec.event_type
        for spec in decorated_handlers()
        if spec.event_type is not None and _under(getattr(spec.fn, "__module__", ""), names)
    ]
    for cls in candidates:
        if cls is BaseEvent or cls.__dict__.get("_eventbus_unregistered"):
            continue
        found.setdefault(cls.__event_type__, cls)
    return dict(sorted(found.items()))


def contracts_of(classes: dict[str, type[BaseEvent]]) -> dict[str, EventContract]:
    """The :class:`EventContract` of each class (by type name)."""
    return {
        name: EventContract(
            name,
            cls.default_topic() or "",
            event_schema(cls),
            origin=f"{cls.__module__}.{cls.__qualname__}",
            version=cls.__event_version__,
            upcasts_from=_upcasts_from(cls),
        )
        for name, cls in classes.items()
    }


def _upcasts_from(cls: type[BaseEvent]) -> int | None:
    for version in range(1, cls.__event_version__):
        if not missing_steps(cls, version):
            return version
    return None


# -- snapshot files -----------------------------------------------------------------


def snapshot(
    classes: dict[str, type[BaseEvent]], previous: dict[str, EventContract] | None = None
) -> dict[str, Any]:
    """The snapshot document of ``classes``.  With the ``previous`` snapshot, an
    event whose schema changed keeps the old schema in its ``history`` (and the
    old history before it)."""
    events: dict[str, Any] = {}
    for name, contract in contracts_of(classes).items():
        before = previous.get(name) if previous else None
        history = before.versions()[:-1] if before else []
        if before is not None and (before.hash, before.version) != (
            contract.hash,
            contract.version,
        ):
            history.append((before.schema, before.version))
        entry: dict[str, Any] = {
            "topic": contract.topic,
            "class": contract.origin,
            "version": contract.version,
            "hash": contract.hash,
            "schema": contract.schema,
        }
        if history:
            entry["history"] = [
                {"hash": schema_hash(s), "version": v, "schema": s} for s, v in history
            ]
        events[name] = entry
    return {FORMAT_KEY: FORMAT_VERSION, "events": events}


def dump(document: dict[str, Any]) -> str:
    """A snapshot as the text written to a file (sorted keys, indented, newline)."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def read_contracts(path: str | os.PathLike[str]) -> dict[str, EventContract]:
    """The event contracts in a snapshot file or an AsyncAPI document (JSON; YAML
    when PyYAML is installed).

    Raises:
      ContractError: the file cannot be read or is neither format.
    """
    where = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ContractError(f"cannot read {where}: {exc}") from exc
    return parse_contracts(text, where)


def parse_contracts(text: str, where: str = "<text>") -> dict[str, EventContract]:
    """:func:`read_contracts` of a file's text (``where`` names it in errors)."""
    try:
        document = json.loads(text)
    except ValueError as exc:
        document = _yaml(text, where, exc)
    if not isinstance(document, dict):
        raise ContractError(f"{where} is not a contract snapshot or an AsyncAPI document")
    if FORMAT_KEY in document:
        return _from_snapshot(document, where)
    if "asyncapi" in document:
        return _from_asyncapi(document, where)
    raise ContractError(
        f"{where} is not a contract snapshot (no {FORMAT_KEY!r} key) "
        "or an AsyncAPI document (no 'asyncapi' key)"
    )


def _yaml(text: str, where: str, error: ValueError) -> Any:
    if text.lstrip()[:1] in ("{", "[", ""):
        raise ContractError(f"{where} is not valid JSON: {error}") from error
    try:
        yaml: Any = importlib.import_module("yaml")
    except ImportError:
        raise ContractError(f"{where} is not valid JSON: {error}") from error
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ContractError(f"{where} is neither valid JSON nor YAML: {detail}") from exc


def _schema_at(value: Any, where: str, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ContractError(f"{where}: {what} is not a JSON Schema object")
    return value


def _from_snapshot(document: dict[str, Any], where: str) -> dict[str, EventContract]:
    if document[FORMAT_KEY] != FORMAT_VERSION:
        raise ContractError(
            f"{where}: snapshot format {document[FORMAT_KEY]!r} is not supported "
            f"(this version reads {FORMAT_VERSION})"
        )
    events = document.get("events")
    if not isinstance(events, dict):
        raise ContractError(f"{where}: 'events' is missing or not an object")
    out: dict[str, EventContract] = {}
    for name, entry in events.items():
        if not isinstance(entry, dict):
            raise ContractError(f"{where}: event {name!r} is not an object")
        history = entry.get("history") or []
        if not isinstance(history, list):
            raise ContractError(f"{where}: the history of {name!r} is not a list")
        out[name] = EventContract(
            name,
            str(entry.get("topic") or ""),
            _schema_at(entry.get("schema"), where, f"the schema of {name!r}"),
            tuple(
                _schema_at(
                    h.get("schema") if isinstance(h, dict) else None,
                    where,
                    f"history entry {i} of {name!r}",
                )
                for i, h in enumerate(history)
            ),
            origin=where,
            version=_version(entry, where, name),
            history_versions=tuple(_version(h, where, name) for h in history),
        )
    return out


def _version(entry: dict[str, Any], where: str, name: str) -> int:
    version = entry.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ContractError(f"{where}: a version of {name!r} is not a positive integer")
    return version


def _from_asyncapi(document: dict[str, Any], where: str) -> dict[str, EventContract]:
    """The event schemas of an AsyncAPI document: each message of
    ``components.messages`` whose payload (or the ``event`` property of an envelope
    payload) is an object schema; named by ``x-eventbus-type``, else ``name``, else
    its key."""
    components = document.get("components") or {}
    messages = components.get("messages") or {}
    if not isinstance(messages, dict):
        raise ContractError(f"{where}: components.messages is not an object")
    out: dict[str, EventContract] = {}
    for key, message in messages.items():
        if not isinstance(message, dict):
            continue
        payload = message.get("payload")
        if not isinstance(payload, dict):
            continue
        payload = _local(document, payload)
        schema = payload
        event_prop = (payload.get("properties") or {}).get("event")
        if isinstance(event_prop, dict):
            schema = _local(document, event_prop)
        schema = _with_defs(document, _without_envelope(schema))
        name = str(message.get("x-eventbus-type") or message.get("name") or key)
        topic = str(message.get("x-eventbus-topic") or "")
        out[name] = EventContract(name, topic, schema, origin=where)
    return out


def _without_envelope(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` without the envelope fields (as :func:`event_schema` leaves them out)."""
    properties = schema.get("properties")
    if not isinstance(properties, dict) or not set(properties) & set(ENVELOPE_FIELDS):
        return schema
    required = [n for n in schema.get("required") or () if n not in ENVELOPE_FIELDS]
    out = {
        **schema,
        "properties": {k: v for k, v in properties.items() if k not in ENVELOPE_FIELDS},
    }
    if required:
        out["required"] = required
    else:
        out.pop("required", None)
    return out


def _local(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Follow a ``$ref`` into the document (``#/components/schemas/X``)."""
    for _ in range(16):
        ref = schema.get("$ref")
        if not isinstance(ref, str) or not ref.startswith("#/"):
            return schema
        node: Any = document
        for part in ref[2:].split("/"):
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            raise ContractError(f"$ref {ref!r} points to nothing in the AsyncAPI document")
        schema = node
    return schema


def _with_defs(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with the document's component schemas reachable by its ``$ref``s:
    ``#/components/schemas/X`` references are kept resolvable by copying those
    schemas under ``components.schemas`` of the returned schema."""
    schemas = (document.get("components") or {}).get("schemas")
    if not isinstance(schemas, dict) or "components" in schema:
        return schema
    return {**schema, "components": {"schemas": schemas}}


# -- the comparisons -----------------------------------------------------------------


def check_snapshot(
    current: dict[str, EventContract], recorded: dict[str, EventContract], mode: Mode = "full"
) -> CheckResult:
    """The breaking changes from the ``recorded`` snapshot (old) to the ``current``
    code (new) in ``mode``; the transitive modes also check each recorded history."""
    if mode not in MODES:
        raise ContractError(f"unknown compatibility mode {mode!r}; one of: {', '.join(MODES)}")
    result = CheckResult()
    base = mode.removesuffix("_transitive")
    for name, now in current.items():
        before = recorded.get(name)
        if before is None:
            result.notes.append(f"{name}: new event type (not in the snapshot)")
            continue
        result.checked += 1
        olds = before.versions()
        if not mode.endswith("_transitive"):
            olds = olds[-1:]
        for index, (schema, version) in enumerate(reversed(olds)):
            suffix = f" (snapshot history entry {len(olds) - index}, version {version})"
            step = base
            if now.upcasts_from is not None and now.upcasts_from <= version < now.version:
                # Payloads of that version are upcast before validation: the new
                # classes never read them as they are.
                step = {"backward": "none", "full": "forward"}.get(base, base)
                if base in ("backward", "full"):
                    result.notes.append(
                        f"{name}: version {version} payloads are upcast to version "
                        f"{now.version}: the backward check against them is skipped"
                    )
            for item in check(schema, now.schema, step, event=name):  # type: ignore[arg-type]
                if index:
                    item = Breaking(item.event, item.path, item.change + suffix)
                if item not in result.breaking:
                    result.breaking.append(item)
    for name in recorded:
        if name not in current:
            result.notes.append(f"{name}: in the snapshot, not in the code any more")
    return result


def check_against(
    current: dict[str, EventContract],
    other: dict[str, EventContract],
    role: Role | None = None,
) -> CheckResult:
    """The breaking changes between this code and another service's contracts.

    ``role`` is the other service's: ``publisher`` (it writes, this code reads),
    ``subscriber`` (this code writes, it reads), None: both.  Event types on one
    side only are not compared.
    """
    if role is not None and role not in ROLES:
        raise ContractError(f"unknown role {role!r}; one of: {', '.join(ROLES)}")
    result = CheckResult()
    for name, mine in current.items():
        theirs = other.get(name)
        if theirs is None:
            continue
        result.checked += 1
        if role in (None, "publisher"):
            result.breaking += _diff(theirs.schema, mine.schema, name, "reader")
        if role in (None, "subscriber"):
            result.breaking += _diff(mine.schema, theirs.schema, name, "writer")
    if not result.checked:
        result.notes.append("no event type in common with the other service")
    return result


def assert_compatible(
    sources: str | ModuleType | type[BaseEvent] | Iterable[str | ModuleType | type[BaseEvent]],
    snapshot_path: str | os.PathLike[str],
    mode: Mode = "full",
) -> None:
    """Fail (``AssertionError``, one line per breaking change) unless the event
    classes of ``sources`` are compatible with the snapshot at ``snapshot_path``.

    For a service's own test suite::

        def test_events_stay_compatible():
            assert_compatible("shop.events", "contracts.json", mode="full")

    ``sources``: module names, modules or event classes (see :func:`event_classes`).

    Raises:
      AssertionError: a breaking change, or no event class in ``sources``.
      ContractError: the snapshot cannot be read, a module cannot be imported.
    """
    __tracebackhide__ = True
    items = [sources] if isinstance(sources, str | ModuleType | type) else list(sources)
    classes = event_classes(items)
    if not classes:
        raise AssertionError(f"no event classes found in {items!r}")
    result = check_snapshot(contracts_of(classes), read_contracts(snapshot_path), mode)
    if result.breaking:
        lines = "\n".join(str(item) for item in result.breaking)
        raise AssertionError(
            f"{len(result.breaking)} breaking change(s) against {snapshot_path} "
            f"(mode {mode}):\n{lines}"
        )
