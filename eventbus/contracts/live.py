"""Event classes checked against the schemas their live subscribers stored.

On a backend that stores subscriptions (Redis), a worker writes, with each
subscription of a typed handler, the JSON Schema of the class the handler
validates into (stored once per content hash).  Two checks read them:

- ``eventbus schema check --live MODULES`` compares every event class of the
  modules with every stored subscriber schema of its topic, one line per breaking
  change naming the subscriber (service, handler) and the field;
- a publishing process compares each event class it publishes, once per class
  and topic (refreshed every :data:`~eventbus.redis.schemas.CACHE_TTL` seconds),
  and per ``EVENTBUS_SCHEMA_CHECK`` warns (``warn``: once per class and
  subscriber, and counts each event in ``eventbus_schema_mismatch_total``) or
  refuses with :class:`SchemaMismatchError` (``error``: nothing is published).

The comparison is :func:`eventbus.contracts.compat.breaking_changes` with the
publisher's class as the writer and the subscriber's stored schema as the
reader: payloads the publisher can send that the subscriber would reject.
Untyped handlers (``BaseEvent`` or no class) store nothing: they accept any
payload.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from eventbus.contracts.compat import Breaking, breaking_changes
from eventbus.contracts.schemas import event_schema
from eventbus.events import BaseEvent
from eventbus.exceptions import PublishError


@dataclass(frozen=True)
class SubscriberSchema:
    """The schema a live subscription stored.

    Attributes:
      service: The subscriber's service.
      topic: The topic it receives.
      handler: Its handler (actor name).
      hash: The schema's content hash (:func:`eventbus.contracts.schemas.schema_hash`).
      schema: The JSON Schema its handler validates into.
    """

    service: str
    topic: str
    handler: str
    hash: str
    schema: dict[str, Any]

    @property
    def subscriber(self) -> str:
        """``<service>/<handler>``: how messages and metrics name it."""
        return f"{self.service}/{self.handler}"


@dataclass(frozen=True)
class LiveMismatch:
    """A breaking change between a publisher's class and a live subscriber's schema.

    Attributes:
      event: The publisher's event class name.
      subscriber: The subscriber whose stored schema rejects some of its payloads.
      breaking: The change (field path and what is wrong).
    """

    event: str
    subscriber: SubscriberSchema
    breaking: Breaking

    def __str__(self) -> str:
        sub = self.subscriber
        path = self.breaking.path or "(the whole event)"
        return (
            f"{self.event} -> service {sub.service}, handler {sub.handler} "
            f"(topic {sub.topic}): field {path}: {self.breaking.change}"
        )


def live_mismatches(
    event: str, writer: dict[str, Any], subscribers: Iterable[SubscriberSchema]
) -> list[LiveMismatch]:
    """The breaking changes between ``writer`` (the publisher's class schema, named
    ``event``) and each of ``subscribers``' schemas; [] when every one accepts
    whatever the publisher sends."""
    out = []
    for sub in subscribers:
        for breaking in breaking_changes(writer, sub.schema, event=event):
            out.append(LiveMismatch(event, sub, breaking))
    return out


def module_event_classes(module: ModuleType) -> list[type[BaseEvent]]:
    """The event classes ``module`` defines or imports (``BaseEvent`` subclasses with
    a default topic), in name order."""
    found = {
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, BaseEvent)
        and value is not BaseEvent
        and isinstance(value.model_fields["topic"].default, str)
    }
    return sorted(found, key=lambda cls: (cls.__module__, cls.__qualname__))


def default_topic(event_class: type[BaseEvent]) -> str:
    """The topic ``event_class`` publishes to by default."""
    return str(event_class.model_fields["topic"].default)


def check_live(
    classes: Iterable[type[BaseEvent]], subscribers: Iterable[SubscriberSchema]
) -> list[LiveMismatch]:
    """Every breaking change between ``classes`` (as publishers of their default
    topic) and the stored schemas of ``subscribers`` of those topics."""
    by_topic: dict[str, list[SubscriberSchema]] = {}
    for sub in subscribers:
        by_topic.setdefault(sub.topic, []).append(sub)
    out = []
    for cls in classes:
        readers = by_topic.get(default_topic(cls), [])
        if readers:
            out += live_mismatches(cls.__name__, event_schema(cls), readers)
    return out


class SchemaMismatchError(PublishError):
    """A live subscriber's stored schema would reject the event class being
    published (``EVENTBUS_SCHEMA_CHECK=error``); nothing of the publish call was
    enqueued.  ``mismatches`` names each subscriber and field."""

    def __init__(self, message: str, mismatches: list[LiveMismatch]) -> None:
        super().__init__(message)
        self.mismatches = mismatches


def refusal(mismatches: list[LiveMismatch]) -> SchemaMismatchError:
    """The error of ``EVENTBUS_SCHEMA_CHECK=error`` for ``mismatches``."""
    lines = "; ".join(str(m) for m in mismatches[:5])
    more = f" (and {len(mismatches) - 5} more)" if len(mismatches) > 5 else ""
    return SchemaMismatchError(
        f"live subscribers would reject this event: {lines}{more}; nothing was published. "
        "Deploy a subscriber that accepts it first, or make the change compatible (a new "
        "field optional, none removed that a subscriber requires); EVENTBUS_SCHEMA_CHECK=warn "
        "publishes anyway",
        mismatches,
    )
