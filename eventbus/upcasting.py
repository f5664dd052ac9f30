"""Event versions and upcasters: old payloads for new handlers.

An event class has a version, ``__event_version__`` (1 unless it says otherwise).
The envelope carries it as ``"version"`` when it is not 1, so every envelope
written before versions existed reads as version 1::

    {"type": "order.placed:OrderPlaced", "version": 2, "event": {...}}

When a class changes shape, raise its version and register an *upcaster* for
each step, a function from the fields of version N (a JSON dict) to those of
version N + 1::

    class OrderPlaced(BaseEvent):
        __event_version__ = 2
        topic: str = "order.placed"
        order_id: int
        amount_cents: int  # version 1 had "amount", in euros

    @upcaster(OrderPlaced, from_version=1)
    def amount_in_cents(fields: dict[str, Any]) -> dict[str, Any]:
        fields["amount_cents"] = round(fields.pop("amount") * 100)
        return fields

Decoding a payload into a class (a handler's class, or the class its type name
finds) runs the steps from the payload's version up to the class's, in the
handler's process, before validation.  The rules:

* An upcaster gets a copy of the payload's fields (envelope fields included:
  ``event_id``, ``topic``, ``timestamp``, ``metadata``) and returns the fields of
  the next version; it works on JSON values only.  The stored envelope (a dead
  letter's, for a replay) is never changed.
* A payload whose chain has a missing step, an upcaster that raises or returns
  something other than a dict: :class:`~eventbus.exceptions.EventDecodeError`
  naming the step.  It is never retried (an upcaster is deterministic): the event
  goes to the dead letters with that reason, to replay once the step is deployed.
* A payload *newer* than the class (a publisher deployed before this worker) is
  validated as it is: fields the class does not know are ignored, and a payload
  the class cannot read fails validation like any other, its error saying which
  version each side has.  Upcasters only go up.
* A chain with a hole (steps from 1 and from 3 for a version 4 class, none from
  2) is logged as a WARNING when a bus starts (:func:`warn_chain_gaps`); a
  test can assert :func:`chain_gaps` is empty.

This module imports nothing of the event classes (``eventbus.events`` imports it).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar
from weakref import WeakKeyDictionary

from eventbus.exceptions import ConfigurationError, EventDecodeError

if TYPE_CHECKING:
    from eventbus.events import BaseEvent

__all__ = [
    "VERSION_KEY",
    "Upcaster",
    "chain_gaps",
    "missing_steps",
    "upcast",
    "upcaster",
    "upcasters",
    "warn_chain_gaps",
]

logger = logging.getLogger(__name__)

#: Envelope key holding the event's version (absent: version 1).
VERSION_KEY = "version"

#: A step from the fields of one version to those of the next.
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
_F = TypeVar("_F", bound=Upcaster)

#: Steps by event class, then by the version they start from.
_steps: WeakKeyDictionary[type[BaseEvent], dict[int, Upcaster]] = WeakKeyDictionary()


def _is_version(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_version(event_class: type[Any], version: object) -> int:
    """``version`` when it is a valid ``__event_version__`` (an int >= 1).

    Raises:
      ConfigurationError: It is not.
    """
    if not _is_version(version):
        raise ConfigurationError(
            f"{event_class.__qualname__}.__event_version__ must be an integer >= 1, got {version!r}"
        )
    assert isinstance(version, int)
    return version


def upcaster(event_class: type[BaseEvent], *, from_version: int) -> Callable[[_F], _F]:
    """Register the decorated function as the step of ``event_class`` from
    ``from_version`` to ``from_version + 1``.

    The function takes the fields of a payload of version ``from_version`` (a
    JSON dict, a copy it may change) and returns those of the next version.

    Raises:
      ConfigurationError: ``from_version`` is not an integer between 1 and the
        class's version minus one, or that step already has an upcaster.
    """
    current = event_class.__event_version__
    if not _is_version(from_version) or from_version >= current:
        raise ConfigurationError(
            f"@upcaster({event_class.__qualname__}, from_version={from_version!r}): "
            f"from_version must be an integer from 1 to {current - 1} "
            f"({event_class.__qualname__} is version {current}; raise "
            "__event_version__ first)"
        )

    def register(fn: _F) -> _F:
        steps = _steps.setdefault(event_class, {})
        existing = steps.get(from_version)
        if existing is not None and existing is not fn:
            raise ConfigurationError(
                f"{event_class.__qualname__} already has an upcaster from version "
                f"{from_version}: {_name(existing)}"
            )
        steps[from_version] = fn
        return fn

    return register


def upcasters(event_class: type[BaseEvent]) -> dict[int, Upcaster]:
    """The steps registered for ``event_class``, by the version they start from."""
    return dict(sorted(_steps.get(event_class, {}).items()))


def missing_steps(event_class: type[BaseEvent], from_version: int = 1) -> list[int]:
    """The versions from ``from_version`` up to the class's that have no step
    (``[]``: a payload of any of them can be upcast).  A start-up check::

        assert not missing_steps(OrderPlaced)
    """
    steps = _steps.get(event_class, {})
    return [v for v in range(from_version, event_class.__event_version__) if v not in steps]


def chain_gaps(event_class: type[BaseEvent]) -> list[int]:
    """The versions between the class's lowest upcaster and its version that have
    no step (``[]`` when it has no upcaster or an unbroken chain).

    With steps from 1 and from 3 for a version 4 class, ``[2]``: a version 1
    payload is upcast to 2 and stops there, so registering the step from 1 was
    meant to be followed by one from 2.  (Versions below the lowest step are not
    counted: a team may have never shipped them.)
    """
    steps = _steps.get(event_class)
    if not steps:
        return []
    return missing_steps(event_class, min(steps))


def warn_chain_gaps(event_classes: Iterable[type[BaseEvent]]) -> list[type[BaseEvent]]:
    """Log one WARNING per class whose upcasters leave a gap (:func:`chain_gaps`),
    naming the class and the missing steps; returns those classes.

    A warning, not an error: the worker still handles payloads of the versions
    above the gap, and one of a version below it is dead-lettered with a reason
    naming the step, to replay once the step is deployed.  A bus calls it at start
    for the classes its handlers validate into.
    """
    gapped: list[type[BaseEvent]] = []
    for cls in dict.fromkeys(event_classes):
        gaps = chain_gaps(cls)
        if not gaps:
            continue
        gapped.append(cls)
        steps = ", ".join(f"{v} to {v + 1}" for v in gaps)
        fix = " and ".join(f"@upcaster({cls.__name__}, from_version={v})" for v in gaps)
        logger.warning(
            "%s is version %d and has upcasters from version(s) %s, but none from "
            "version %s: payloads older than version %d will be dead-lettered instead "
            "of upcast; register %s",
            f"{cls.__module__}.{cls.__qualname__}",
            cls.__event_version__,
            ", ".join(str(v) for v in upcasters(cls)),
            steps,
            gaps[-1] + 1,
            fix,
        )
    return gapped


def upcast(event_class: type[BaseEvent], fields: dict[str, Any], version: int) -> dict[str, Any]:
    """The fields of a payload of ``version`` brought up to ``event_class``'s version.

    ``fields`` itself is never changed.  A payload already at (or above) the
    class's version is returned as it is.

    Raises:
      EventDecodeError: A step is missing, raises, or does not return a dict.
    """
    target = event_class.__event_version__
    if version >= target:
        return fields
    name = event_class.__event_type__
    steps = _steps.get(event_class, {})
    for step in range(version, target):
        if step not in steps:
            raise EventDecodeError(
                f"event type {name!r} is version {version} and the handler's class "
                f"{event_class.__qualname__} is version {target}, but no upcaster "
                f"takes it from version {step} to {step + 1}: register one with "
                f"@upcaster({event_class.__name__}, from_version={step})"
            )
    for step in range(version, target):
        fn = steps[step]
        try:
            result = fn(copy.deepcopy(fields))
        except Exception as exc:
            raise EventDecodeError(
                f"upcaster {_name(fn)} of event type {name!r} (version {step} to "
                f"{step + 1}) raised {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(result, dict):
            raise EventDecodeError(
                f"upcaster {_name(fn)} of event type {name!r} (version {step} to "
                f"{step + 1}) returned {type(result).__name__}, not a dict of fields"
            )
        fields = result
    return fields


def version_of(envelope: dict[str, Any]) -> int:
    """The version an envelope carries (1 when it has none).

    Raises:
      EventDecodeError: ``version`` is there but not an integer >= 1.
    """
    version = envelope.get(VERSION_KEY, 1)
    if not _is_version(version):
        raise EventDecodeError(
            f"event envelope {VERSION_KEY!r} must be an integer >= 1, got {version!r}"
        )
    assert isinstance(version, int)
    return version


def _name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
