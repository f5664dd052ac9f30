"""The settings reference (docs/settings.md), written from :class:`EventBusSettings`.

Every variable, its type, default and meaning come from the fields themselves, so
the page cannot drift from the code: ``eventbus settings`` prints it, and a test
compares the committed page with a fresh rendering.
"""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import SecretStr
from pydantic.fields import FieldInfo

from eventbus.config import (
    ENV_PREFIX,
    NOT_SETTINGS,
    SETTINGS_GROUPS,
    TEST_PREFIX,
    EventBusSettings,
    allowed_text,
)

#: Section of the page of each name prefix; settings without one are "General".
SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("General", ()),
    ("Retries and dead letters", ("max_retries", "retry_", "dlq_")),
    ("Redis backend", ("redis_",)),
    ("Kafka backend", ("kafka_",)),
)

_HEADER = """\
# Settings

<!-- Generated from EventBusSettings by `eventbus settings > docs/settings.md`.
     Do not edit: change the field's description in eventbus/config.py. -->

Each setting is read from the environment variable `{prefix}<NAME>` (upper case), or
given in code: `EventBus(settings=EventBusSettings(backend="redis"))`. Values given
in code win over the environment. An invalid value fails when the settings are built,
naming the variable; a value that needs an extra that is not installed
(`{prefix}BACKEND=redis` without `fastapi-eventbus[redis]`) fails naming the extra.

An `{prefix}*` variable that is no setting (a typo) is ignored and logged at
WARNING once per process, with the closest setting's name. Not warned about: the
variables the project's reliability suite reads ({not_settings}) and those starting
with `{test_prefix}`, reserved for test suites.
"""


def section_of(name: str) -> str:
    """The section of the page that lists setting ``name``."""
    for title, prefixes in SECTIONS[1:]:
        if any(name == p or name.startswith(p) for p in prefixes):
            return title
    return SECTIONS[0][0]


def type_text(annotation: Any) -> str:
    """How the type of a setting reads in the table (``int``, `` `a`, `b` ``, ...)."""
    origin = get_origin(annotation)
    if origin is Literal:
        return " or ".join(f"`{value}`" for value in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " or ".join(type_text(a) for a in get_args(annotation) if a is not type(None))
    if annotation is SecretStr:
        return "secret string"
    if annotation is str:
        return "string"
    return getattr(annotation, "__name__", str(annotation))


def constraints_text(field: FieldInfo) -> str:
    """The field's bounds and pattern: ``≥ 0``, ``1 to 65535``, ``matches ...`` (the
    same text an invalid value's error gives as what is allowed)."""
    return allowed_text(field)


def default_text(value: Any) -> str:
    """The default as it would be written in the environment."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == "":
        return "empty"
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    """The reference page, as markdown."""
    rows: dict[str, list[str]] = {title: [] for title, _ in SECTIONS}
    for name, field in EventBusSettings.model_fields.items():
        if not field.description:
            raise ValueError(f"setting {name!r} has no description")
        kind = type_text(field.annotation)
        bounds = constraints_text(field)
        if bounds:
            kind += f" ({bounds})"
        cells = [f"`{ENV_PREFIX}{name.upper()}`", kind, default_text(field.default)]
        cells.append(field.description)
        rows[section_of(name)].append("| " + " | ".join(_cell(c) for c in cells) + " |")
    not_settings = ", ".join(f"`{v}`" for v in sorted(NOT_SETTINGS))
    header = _HEADER.format(prefix=ENV_PREFIX, not_settings=not_settings, test_prefix=TEST_PREFIX)
    parts = [header]
    for title, _ in SECTIONS:
        parts.append(f"## {title}\n")
        parts.append("| Variable | Type | Default | Meaning |\n| --- | --- | --- | --- |")
        parts.append("\n".join(rows[title]) + "\n")
    for prefix, (module, name, extra) in SETTINGS_GROUPS.items():
        parts.append(
            f"## `{prefix}*`\n\nRead by `{module}.{name}` (extra `{extra}`), documented with it.\n"
        )
    return "\n".join(parts)
