"""Compatibility of two event schemas: which payloads one side sends that the other rejects.

Two roles: the *writer* (a publisher's copy of an event class: what it sends) and
the *reader* (a subscriber's copy: what its handler validates).  A change is
*breaking* when some payload valid under the writer's schema is rejected by the
reader's.  :func:`breaking_changes` lists the causes, one :class:`Breaking` per
cause, by walking the two pydantic JSON Schemas side by side (``$ref``/``$defs``
resolved, unions, nested models, lists, dicts, enums and Literals, string and
number constraints).  :func:`check` applies the Confluent Schema Registry modes
(``backward``, ``forward``, ``full``, their ``_transitive`` forms, ``none``).

Types are judged as pydantic validates events (lax mode): an integer is a
number, and a boolean is accepted where an integer or a number is expected; a
string where a number is expected is a narrowing (``"5"`` passes, ``"five"`` does
not).  Where the walk is conservative (it may report a change that no real payload
trips): regular expressions are compared as text (a reader pattern the writer
does not have verbatim is reported); ``format`` likewise; a writer union branch
must fit one reader branch as a whole; ``not``/``if``/``dependentRequired`` in
the reader are reported, not reasoned about.  Where it is lenient: the writer is
taken to send only the fields its schema declares (pydantic serializes model
fields only), so a reader's ``extra="forbid"`` breaks only on a declared writer
field the reader lacks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

#: A Schema Registry compatibility mode.
Mode = Literal[
    "backward",
    "forward",
    "full",
    "backward_transitive",
    "forward_transitive",
    "full_transitive",
    "none",
]
#: Every mode, in the order documented.
MODES: tuple[str, ...] = get_args(Mode)

#: Which side of a comparison is the newer schema (chooses the words of a change).
_Newer = Literal["reader", "writer"] | None

_TYPES = ("null", "boolean", "integer", "number", "string", "array", "object")


@dataclass(frozen=True)
class Breaking:
    """One breaking change between two schemas of an event.

    Attributes:
      event: The event type name (or topic) the change is in.
      path: The field path, e.g. ``customer.email`` (``""`` for the whole event);
        ``items[]`` is an element of the list ``items``, ``prices.*`` a value of
        the dict ``prices``.
      change: What breaks, e.g. ``field removed while the reader requires it``.
    """

    event: str
    path: str
    change: str

    def __str__(self) -> str:
        return f"{self.event or '<event>'}: {self.path or '<event>'}: {self.change}"


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


@dataclass
class _Walk:
    """One side-by-side walk of a writer and a reader schema."""

    writer_root: dict[str, Any]
    reader_root: dict[str, Any]
    event: str
    newer: _Newer
    found: list[Breaking] = field(default_factory=list)
    seen: set[tuple[int, int]] = field(default_factory=set)

    # -- output ------------------------------------------------------------------

    def report(self, path: str, change: str) -> None:
        item = Breaking(self.event, path, change)
        if item not in self.found:
            self.found.append(item)

    def quiet(self) -> _Walk:
        return _Walk(self.writer_root, self.reader_root, self.event, self.newer, [], set(self.seen))

    # -- schema plumbing -----------------------------------------------------------

    def resolve(self, schema: Any, root: dict[str, Any]) -> dict[str, Any]:
        """``schema`` as a dict with ``$ref`` followed and one-element ``allOf`` merged."""
        if schema is True or schema is None:
            return {}
        if schema is False:
            return {"not": {}}
        if not isinstance(schema, dict):
            raise ValueError(f"not a JSON Schema: {_show(schema)[:80]}")
        for _ in range(64):
            ref = schema.get("$ref")
            all_of = schema.get("allOf")
            if isinstance(ref, str):
                target = _pointer(root, ref)
                rest = {k: v for k, v in schema.items() if k != "$ref" and k not in _ANNOTATIONS}
                # Annotations beside a $ref are dropped: the target keeps its identity,
                # which stops the walk of a recursive model where it recurs.
                schema = {**target, **rest} if rest else target
            elif isinstance(all_of, list) and len(all_of) == 1:
                rest = {k: v for k, v in schema.items() if k != "allOf"}
                inner = self.resolve(all_of[0], root)
                schema = {**inner, **rest}
            else:
                resolved: dict[str, Any] = schema
                return resolved
        raise ValueError("a $ref chain longer than 64 links (a $ref cycle?)")

    def branches(self, schema: Any, root: dict[str, Any]) -> list[dict[str, Any]]:
        """The alternatives of ``schema``: ``anyOf``/``oneOf`` members and one per
        listed type, flattened (sibling keywords distributed into each member)."""
        resolved = self.resolve(schema, root)
        union = resolved.get("anyOf") or resolved.get("oneOf")
        if isinstance(union, list) and union:
            rest = {
                k: v
                for k, v in resolved.items()
                if k not in ("anyOf", "oneOf", "discriminator", "default", "title", "description")
            }
            out: list[dict[str, Any]] = []
            for member in union:
                for branch in self.branches(member, root):
                    out.append({**branch, **rest} if rest else branch)
            return out
        types = resolved.get("type")
        if isinstance(types, list) and len(types) != 1:
            return [{**resolved, "type": one} for one in types]
        if isinstance(types, list):
            return [{**resolved, "type": types[0]}]
        return [resolved]

    # -- the walk ------------------------------------------------------------------

    def sub(self, writer: Any, reader: Any, path: str) -> None:
        """Report why ``writer`` is not a subschema of ``reader`` (nothing when it is)."""
        w_all = self.branches(writer, self.writer_root)
        r_all = self.branches(reader, self.reader_root)
        if len(w_all) == 1 and len(r_all) == 1:
            self.compare(w_all[0], r_all[0], path)
            return
        for w in w_all:
            if any(_accepts_anything(r) for r in r_all):
                return
            trials = []
            for r in r_all:
                trial = self.quiet()
                trial.compare(w, r, path)
                if not trial.found:
                    break
                trials.append((r, trial.found))
            else:
                same_kind = [(r, f) for r, f in trials if _kind(r) == _kind(w) and _kind(w)]
                if len(same_kind) == 1:
                    for item in same_kind[0][1]:
                        self.report(item.path, item.change)
                elif w.get("type") == "null":
                    self.report(path, "null no longer accepted (an Optional field made required)")
                elif len(r_all) == 1:
                    for item in trials[0][1]:
                        self.report(item.path, item.change)
                else:
                    self.report(
                        path,
                        f"union member removed: the writer may send {_describe(w)}, "
                        f"the reader accepts only {' | '.join(_describe(r) for r in r_all)}",
                    )

    def compare(self, w: dict[str, Any], r: dict[str, Any], path: str) -> None:
        key = (id(w), id(r))
        if key in self.seen:
            return  # a recursive model: assumed compatible where it recurs
        self.seen.add(key)  # only while comparing inside this pair (the recursion)
        try:
            self.compare_pair(w, r, path)
        finally:
            self.seen.discard(key)

    def compare_pair(self, w: dict[str, Any], r: dict[str, Any], path: str) -> None:
        if _accepts_anything(r):
            return
        if "not" in w and not w["not"]:
            return  # the writer sends nothing here
        for keyword in ("not", "if", "dependentRequired", "dependentSchemas", "allOf"):
            if keyword in r and keyword not in w:
                self.report(path, f"the reader adds a '{keyword}' constraint (not compared)")
        values = _values(w)
        if values is not None:
            self.compare_values(values, w, r, path)
            return
        r_values = _values(r)
        if r_values is not None:
            shown = ", ".join(_show(v) for v in r_values)
            self.report(
                path,
                f"narrowed to fixed values: the writer sends any {_describe(w)}, "
                f"the reader accepts only {shown}",
            )
            return
        w_type, r_type = w.get("type"), r.get("type")
        if r_type is not None and not _type_fits(w_type, r_type):
            if w_type is None:
                self.report(
                    path,
                    f"type narrowed: the writer's value is untyped, the reader requires {r_type}",
                )
            else:
                word = "narrowed" if _type_fits(r_type, w_type) else "changed"
                self.report(path, f"type {word}: {w_type} -> {r_type}")
            return
        kind = w_type or r_type
        if kind == "string":
            self.strings(w, r, path)
        elif kind in ("integer", "number"):
            self.numbers(w, r, path)
        elif kind == "array":
            self.arrays(w, r, path)
        elif kind == "object" or "properties" in w or "properties" in r:
            self.objects(w, r, path)

    def compare_values(
        self, values: list[Any], w: dict[str, Any], r: dict[str, Any], path: str
    ) -> None:
        r_values = _values(r)
        for value in values:
            if r_values is not None and value not in r_values:
                if self.newer == "writer":
                    self.report(
                        path, f"enum value {_show(value)} added: the reader does not accept it"
                    )
                else:
                    self.report(
                        path, f"enum value {_show(value)} removed while the writer may send it"
                    )
            elif not _value_fits(value, r):
                self.report(path, f"value {_show(value)} is no longer accepted by the reader")

    def strings(self, w: dict[str, Any], r: dict[str, Any], path: str) -> None:
        _bounds(self, w, r, path, "minLength", lower=True)
        _bounds(self, w, r, path, "maxLength", lower=False)
        for keyword in ("pattern", "format"):
            if keyword not in r or r[keyword] == w.get(keyword):
                continue
            if keyword in w:
                change = f"{keyword} changed: {_show(w[keyword])} -> {_show(r[keyword])}"
            else:
                change = f"{keyword} {_show(r[keyword])} added"
            self.report(path, f"{change} (compared as text)")

    def numbers(self, w: dict[str, Any], r: dict[str, Any], path: str) -> None:
        _bounds(self, w, r, path, "minimum", lower=True)
        _bounds(self, w, r, path, "exclusiveMinimum", lower=True)
        _bounds(self, w, r, path, "maximum", lower=False)
        _bounds(self, w, r, path, "exclusiveMaximum", lower=False)
        r_mult, w_mult = r.get("multipleOf"), w.get("multipleOf")
        if r_mult is not None and (w_mult is None or (w_mult / r_mult) != int(w_mult / r_mult)):
            self.report(path, f"multipleOf added or changed: {_show(w_mult)} -> {_show(r_mult)}")

    def arrays(self, w: dict[str, Any], r: dict[str, Any], path: str) -> None:
        _bounds(self, w, r, path, "minItems", lower=True)
        _bounds(self, w, r, path, "maxItems", lower=False)
        if r.get("uniqueItems") and not w.get("uniqueItems"):
            self.report(
                path, "the reader requires unique items (a set), the writer may repeat them"
            )
        w_prefix = w.get("prefixItems") or []
        r_prefix = r.get("prefixItems") or []
        for index, w_item in enumerate(w_prefix):
            r_item = r_prefix[index] if index < len(r_prefix) else r.get("items", {})
            self.sub(w_item, r_item, f"{path}[{index}]")
        if r.get("items") is False and len(w_prefix) > len(r_prefix):
            pass  # covered above: items False resolves to "accepts nothing"
        w_items = w.get("items", {} if not w_prefix else False)
        if w_items is not False and (r_prefix or "items" in r):
            start = len(w_prefix)
            for index in range(start, len(r_prefix)):
                self.sub(w_items, r_prefix[index], f"{path}[{index}]")
            if "items" in r:
                self.sub(w_items, r["items"], f"{path}[]")

    def objects(self, w: dict[str, Any], r: dict[str, Any], path: str) -> None:
        w_props: dict[str, Any] = w.get("properties") or {}
        r_props: dict[str, Any] = r.get("properties") or {}
        w_req = set(w.get("required") or ())
        r_req = set(r.get("required") or ())
        w_extra = w.get("additionalProperties", None if w_props else True)
        r_extra = r.get("additionalProperties", True)
        for name in sorted(r_req):
            where = _join(path, name)
            if name in w_props:
                if name not in w_req:
                    if self.newer == "reader":
                        change = "optional field made required (the writer may leave it out)"
                    elif self.newer == "writer":
                        change = "required field made optional while the reader requires it"
                    else:
                        change = "optional for the writer but required by the reader"
                    self.report(where, change)
                continue
            if w_extra not in (None, False) and not w_props:
                self.report(
                    where,
                    "required by the reader; the writer (a free-form object) may leave it out",
                )
                continue
            hint = self.rename_hint(w_props, r_props, r_props.get(name), name)
            if self.newer == "reader":
                change = "new required field without a default"
                change += f" (renamed from '{hint}'?)" if hint else ""
            elif self.newer == "writer":
                change = "field removed while the reader requires it"
                change += f" (renamed to '{hint}'?)" if hint else ""
            else:
                change = "required by the reader, missing from the writer"
                change += f" (the writer's '{hint}'? renamed)" if hint else ""
            self.report(where, change)
        for name in sorted(w_props):
            where = _join(path, name)
            if name in r_props:
                self.sub(w_props[name], r_props[name], where)
            elif r_extra is False:
                self.report(where, "the writer sends a field the reader forbids (extra='forbid')")
            elif isinstance(r_extra, dict):
                self.sub(w_props[name], r_extra, where)
        if w_extra not in (None, False):
            w_values = {} if w_extra is True else w_extra
            if r_extra is False:
                self.report(
                    _join(path, "*"), "the writer allows any keys, the reader forbids extra fields"
                )
            elif isinstance(r_extra, dict) and not r_props:
                self.sub(w_values, r_extra, _join(path, "*"))

    def rename_hint(
        self, w_props: dict[str, Any], r_props: dict[str, Any], r_field: Any, name: str
    ) -> str:
        """A writer field the reader lacks, with the same schema as the missing one."""
        for other in sorted(w_props):
            if other in r_props or other == name:
                continue
            trial = self.quiet()
            trial.sub(w_props[other], r_field, other)
            if not trial.found:
                return other
        return ""


def _pointer(root: dict[str, Any], ref: str) -> dict[str, Any]:
    if not ref.startswith("#"):
        raise ValueError(f"only local $ref are supported, got {ref!r}")
    node: Any = root
    for part in ref[1:].split("/")[1:] if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise ValueError(f"$ref {ref!r} points to nothing in the schema")
    if node is True:
        return {}
    if not isinstance(node, dict):
        raise ValueError(f"$ref {ref!r} is not a schema")
    return node


_ANNOTATIONS = {
    "title",
    "description",
    "default",
    "examples",
    "deprecated",
    "readOnly",
    "writeOnly",
    "$comment",
    "$defs",
    "definitions",
    "$schema",
    "$id",
}


def _accepts_anything(schema: dict[str, Any]) -> bool:
    return all(k in _ANNOTATIONS or k.startswith("x-") for k in schema)


def _values(schema: dict[str, Any]) -> list[Any] | None:
    if "const" in schema:
        return [schema["const"]]
    enum = schema.get("enum")
    return list(enum) if isinstance(enum, list) else None


def _kind(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, str):
        return "number" if kind == "integer" else kind
    values = _values(schema)
    if values:
        return _json_type(values[0])
    return "object" if "properties" in schema else ""


def _type_fits(w_type: Any, r_type: Any) -> bool:
    if w_type is None:
        return False
    w_set = {w_type} if isinstance(w_type, str) else set(w_type)
    r_set = {r_type} if isinstance(r_type, str) else set(r_type)
    if "number" in r_set:
        r_set.add("integer")
    if "integer" in r_set:
        r_set.add("boolean")  # pydantic (lax, as events are validated) takes true as 1
    return w_set <= r_set


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _value_fits(value: Any, schema: dict[str, Any]) -> bool:
    """Whether a fixed value (an enum member) meets ``schema``'s simple constraints."""
    kind = schema.get("type")
    if kind is not None and not _type_fits(_json_type(value), kind):
        return False
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get(
            "maxLength", len(value)
        ):
            return False
        pattern = schema.get("pattern")
        if isinstance(pattern, str) and re.search(pattern, value) is None:
            return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            return False
        if "maximum" in schema and value > schema["maximum"]:
            return False
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            return False
        if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
            return False
    return True


def _describe(schema: dict[str, Any]) -> str:
    values = _values(schema)
    if values is not None:
        return " | ".join(_show(v) for v in values)
    kind = schema.get("type")
    if isinstance(kind, str):
        title = schema.get("title")
        return f"{kind} ({title})" if kind == "object" and title else kind
    return "any value"


def _bounds(
    walk: _Walk, w: dict[str, Any], r: dict[str, Any], path: str, keyword: str, *, lower: bool
) -> None:
    if keyword not in r:
        return
    r_bound, w_bound = r[keyword], w.get(keyword)
    if w_bound is None:
        walk.report(path, f"{keyword} {r_bound} added")
    elif (lower and w_bound < r_bound) or (not lower and w_bound > r_bound):
        walk.report(
            path, f"{keyword} {'raised' if lower else 'lowered'} from {w_bound} to {r_bound}"
        )


def _diff(
    writer: dict[str, Any], reader: dict[str, Any], event: str, newer: _Newer
) -> list[Breaking]:
    walk = _Walk(writer, reader, event, newer)
    walk.sub(writer, reader, "")
    return walk.found


def breaking_changes(
    writer: dict[str, Any], reader: dict[str, Any], *, event: str = ""
) -> list[Breaking]:
    """Payloads valid under ``writer`` (what a publisher sends) that ``reader`` (what a
    subscriber validates) would reject, as one :class:`Breaking` per cause; ``[]`` when
    compatible.

    Raises:
      ValueError: a schema is not a JSON Schema object or has a ``$ref`` that
        points nowhere.
    """
    return _diff(writer, reader, event, None)


def check(
    old: dict[str, Any],
    new: dict[str, Any],
    mode: Mode,
    *,
    event: str = "",
    history: list[dict[str, Any]] | None = None,
) -> list[Breaking]:
    """The breaking changes from ``old`` to ``new`` in a Schema Registry ``mode``.

    ``backward``: the new schema (as reader) reads data written with the old one;
    ``forward``: the old schema (as reader) reads data written with the new one;
    ``full``: both.  The ``_transitive`` forms check ``new`` against ``old`` and
    every schema in ``history`` (older versions, any order); ``none`` checks
    nothing.

    Raises:
      ValueError: an unknown mode, or a schema that is not a JSON Schema.
    """
    if mode not in MODES:
        raise ValueError(f"unknown compatibility mode {mode!r}; one of: {', '.join(MODES)}")
    if mode == "none":
        return []
    base = mode.removesuffix("_transitive")
    olds: list[tuple[str, dict[str, Any]]] = [("", old)]
    if mode.endswith("_transitive"):
        count = len(history or [])
        olds += [
            (f" (against version {i + 1} of {count} in the history)", h)
            for i, h in enumerate(history or [])
        ]
    found: list[Breaking] = []
    for suffix, older in olds:
        lines: list[Breaking] = []
        if base in ("backward", "full"):
            lines += _diff(older, new, event, "reader")
        if base in ("forward", "full"):
            lines += _diff(new, older, event, "writer")
        for item in lines:
            tagged = Breaking(item.event, item.path, item.change + suffix) if suffix else item
            if tagged not in found and item not in found:
                found.append(tagged)
    return found


def format_breaking(changes: Iterable[Breaking]) -> str:
    """One line per breaking change (the text the CLI and the pytest helper print)."""
    return "\n".join(str(item) for item in changes)


__all__: Sequence[str] = (
    "MODES",
    "Breaking",
    "Mode",
    "breaking_changes",
    "check",
    "format_breaking",
)
