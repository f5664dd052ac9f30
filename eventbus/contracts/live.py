"""Event classes checked against the schemas their live subscribers stored.

A worker stores, for each of its typed handlers, the JSON Schema of the class the
handler validates into: on Redis with each subscription (stored once per content
hash, :mod:`eventbus.redis.schemas`), on Kafka as a record of the schema topic
(:mod:`eventbus.kafka.schemas`).  Two checks read them:

- ``eventbus schema check --live MODULES`` compares every event class of the
  modules with every stored subscriber schema of its topic, one line per breaking
  change naming the subscriber (service, handler) and the field;
- a publishing process compares each event class it publishes, once per class
  and topic (refreshed every :data:`CACHE_TTL` seconds; :class:`LiveSchemaCheck`),
  and per ``EVENTBUS_SCHEMA_CHECK`` warns (``warn``: once per class and
  subscriber, and counts each event in ``eventbus_schema_mismatch_total``) or
  refuses with :class:`SchemaMismatchError` (``error``: nothing is published).

The stored schema (:func:`live_schema`) carries the handler's event version and
the versions it has upcasters from (:mod:`eventbus.upcasting`), and the
comparison follows what the handler's process does with the publisher's events:

- the same version, or a publisher *newer* than the handler (its payload is
  validated as it is): :func:`eventbus.contracts.compat.breaking_changes` with
  the publisher's class as the writer and the subscriber's stored schema as the
  reader, payloads the publisher can send that the subscriber would reject;
- a publisher *older* than the handler: its payloads are upcast before
  validation, so the check asks only whether the handler has an upcaster for
  every step from the publisher's version up to its own.  When it has, nothing
  is reported: the check trusts the upcasters (code, which it cannot run); when
  a step is missing, one mismatch names the ``@upcaster`` to register.

A stored schema without version keys (written before they existed) is version 1
with no upcasters.  Untyped handlers (``BaseEvent`` or no class) store nothing:
they accept any payload.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

from eventbus.config import SchemaCheckMode
from eventbus.contracts.compat import Breaking, breaking_changes
from eventbus.contracts.schemas import UPCASTS_KEY, VERSION_KEY, event_schema, schema_hash
from eventbus.events import BaseEvent
from eventbus.exceptions import PublishError
from eventbus.metrics import CountsSchemaMismatches, MetricsCollector
from eventbus.upcasting import upcasters

#: Seconds a publisher keeps its verdict on an event class and topic before it
#: reads the topic's subscriber schemas again (a subscriber deployed with another
#: class is noticed within this time).
CACHE_TTL = 30.0


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
      missing_upcasters: The versions the subscriber needs an upcaster from to read
        the publisher's (older) version; ``()`` for a change between schemas.
    """

    event: str
    subscriber: SubscriberSchema
    breaking: Breaking
    missing_upcasters: tuple[int, ...] = ()

    def __str__(self) -> str:
        sub = self.subscriber
        head = f"{self.event} -> service {sub.service}, handler {sub.handler} (topic {sub.topic})"
        if self.missing_upcasters:
            return f"{head}: {self.breaking.change}"
        path = self.breaking.path or "(the whole event)"
        return f"{head}: field {path}: {self.breaking.change}"


def live_schema(event_class: type[BaseEvent]) -> dict[str, Any]:
    """The schema a handler typed by ``event_class`` stores, and what a publisher of
    the class compares with it: :func:`~eventbus.contracts.schemas.event_schema`
    plus the class's ``__event_version__`` under ``"x-eventbus-version"`` when it
    is not 1, and the versions it has upcasters from under
    ``"x-eventbus-upcasts-from"`` when it has any.  A version 1 class without
    upcasters stores exactly its ``event_schema`` (the hash it had before
    versions were stored)."""
    schema = event_schema(event_class)
    version = event_class.__event_version__
    if version != 1:
        schema[VERSION_KEY] = version
    steps = sorted(upcasters(event_class))
    if steps:
        schema[UPCASTS_KEY] = steps
    return dict(sorted(schema.items()))


def schema_versions(schema: dict[str, Any]) -> tuple[int, tuple[int, ...]]:
    """``(version, versions upcast from)`` of a stored schema (:func:`live_schema`);
    ``(1, ())`` for one without those keys or with values that are not versions."""

    def is_version(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    version = schema.get(VERSION_KEY, 1)
    steps = schema.get(UPCASTS_KEY, [])
    return (
        version if is_version(version) else 1,
        tuple(sorted(v for v in steps if is_version(v))) if isinstance(steps, list) else (),
    )


def _missing_step(
    event: str, sub: SubscriberSchema, writes: int, reads: int, steps: tuple[int, ...]
) -> LiveMismatch | None:
    """The mismatch of a publisher of version ``writes`` with a subscriber of version
    ``reads`` (higher) upcasting from ``steps``; None when its chain covers ``writes``."""
    missing = tuple(v for v in range(writes, reads) if v not in steps)
    if not missing:
        return None
    name = str(sub.schema.get("title") or event)  # the subscriber's own class name
    has = (
        f"upcasts from version{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps))} only"
        if steps
        else "has no upcaster"
    )
    fix = " and ".join(f"@upcaster({name}, from_version={v})" for v in missing)
    change = f"writes version {writes}; the handler reads version {reads} and {has}: register {fix}"
    return LiveMismatch(event, sub, Breaking(event, "", change), missing)


def live_mismatches(
    event: str, writer: dict[str, Any], subscribers: Iterable[SubscriberSchema]
) -> list[LiveMismatch]:
    """The breaking changes between ``writer`` (the publisher's class schema,
    :func:`live_schema`, named ``event``) and each of ``subscribers``' schemas; []
    when every one accepts whatever the publisher sends.

    A subscriber of a higher version than the writer's is checked for its
    upcasters only (see the module's docstring): one mismatch when a step from the
    writer's version up is missing, none when the chain is whole.
    """
    writes, _ = schema_versions(writer)
    out = []
    for sub in subscribers:
        reads, steps = schema_versions(sub.schema)
        if writes < reads:
            missing = _missing_step(event, sub, writes, reads, steps)
            if missing is not None:
                out.append(missing)
            continue
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
            out += live_mismatches(cls.__name__, live_schema(cls), readers)
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


def handler_schema(event_type: type[BaseEvent] | None) -> dict[str, Any] | None:
    """The schema a handler typed by ``event_type`` stores; None for an untyped
    handler (no class, or ``BaseEvent`` itself: it accepts any payload).  See
    :func:`live_schema`."""
    if event_type is None or event_type is BaseEvent:
        return None
    return live_schema(event_type)


@runtime_checkable
class ReadsLiveSchemas(Protocol):
    """A backend whose live subscriber schemas any process can read without a
    subscription store (Kafka's schema topic): what ``eventbus schema check
    --live`` reads there.  A backend that stores subscriptions
    (:class:`~eventbus.backends.base.StoresSubscriptions`) is read through them."""

    def live_schemas(self, topics: Collection[str]) -> list[SubscriberSchema]:
        """The stored schemas of the live subscribers of ``topics`` (blocking)."""


#: What :class:`LiveSchemaCheck` calls to read the subscribers of topics:
#: ``await read(topics)`` -> their stored schemas by topic (a topic without any: absent).
ReadSubscribers = Callable[[list[str]], Awaitable[dict[str, list[SubscriberSchema]]]]

_Verdicts = dict[tuple[type[BaseEvent], str], list[LiveMismatch]]


class LiveSchemaCheck:
    """A publisher's check of event classes against live subscriber schemas, on any
    backend: the backend says how to read a topic's subscribers (:data:`ReadSubscribers`).

    ``mode`` is ``EVENTBUS_SCHEMA_CHECK``.  :meth:`check_with` is called with every
    publish's events before they are sent; it reads the subscribers only for a
    (class, topic) it has no verdict on younger than ``ttl`` seconds: other
    publishes pay a dict lookup per event.  Mismatches are logged on ``log``.
    """

    def __init__(
        self, mode: SchemaCheckMode, ttl: float = CACHE_TTL, log: logging.Logger | None = None
    ) -> None:
        self.mode = mode
        self.ttl = ttl
        self.log = log or logging.getLogger(__name__)
        self._metrics: MetricsCollector | None = None
        self._counter: CountsSchemaMismatches | None = None
        #: (class, topic) -> (monotonic expiry, mismatches).
        self._verdicts: dict[tuple[type[BaseEvent], str], tuple[float, list[LiveMismatch]]] = {}
        #: Local class -> (schema, hash).
        self._local: dict[type[BaseEvent], tuple[dict[str, Any], str]] = {}
        #: (class, service, handler, subscriber hash) already logged.
        self._warned: set[tuple[type[BaseEvent], str, str, str]] = set()
        #: Reads under way, by (class, topic): concurrent first publishes share one.
        self._inflight: dict[tuple[type[BaseEvent], str], asyncio.Future[_Verdicts]] = {}

    @property
    def metrics(self) -> MetricsCollector | None:
        """The bus's metrics collector (set by the backend when bound); counted in
        when it implements :class:`~eventbus.metrics.CountsSchemaMismatches`."""
        return self._metrics

    @metrics.setter
    def metrics(self, collector: MetricsCollector | None) -> None:
        self._metrics = collector
        # Resolved once: a runtime protocol check costs ~25 us per call.
        self._counter = collector if isinstance(collector, CountsSchemaMismatches) else None

    async def check_with(self, events: Iterable[BaseEvent], read: ReadSubscribers) -> None:
        """Check ``events``' classes, reading subscribers with ``read`` when a verdict
        is missing or stale.  Logs and counts mismatches (``warn``) or raises
        :class:`SchemaMismatchError` (``error``); what ``read`` raises propagates."""
        now = time.monotonic()
        verdicts = self._verdicts
        found: list[tuple[BaseEvent, list[LiveMismatch]]] = []
        stale: list[BaseEvent] = []
        for event in events:
            verdict = verdicts.get((type(event), event.topic))
            if verdict is None or verdict[0] <= now:
                stale.append(event)
            elif verdict[1]:
                found.append((event, verdict[1]))
        if stale:
            fresh = await self._single_flight(stale, read)
            for event in stale:
                mismatches = fresh.get((type(event), event.topic), [])
                if mismatches:
                    found.append((event, mismatches))
        if not found:
            return
        if self.mode == "error":
            raise refusal([m for _, ms in found for m in ms])
        counter = self._counter
        for event, mismatches in found:
            subscribers = set()
            for m in mismatches:
                key = (type(event), m.subscriber.service, m.subscriber.handler, m.subscriber.hash)
                if key not in self._warned:
                    self._warned.add(key)
                    self.log.warning(
                        "Schema mismatch: %s. Its events will fail there and be "
                        "dead-lettered (EVENTBUS_SCHEMA_CHECK=error refuses such publishes).",
                        m,
                    )
                subscribers.add(m.subscriber.subscriber)
            if counter is not None:
                for subscriber in sorted(subscribers):
                    counter.inc_schema_mismatch(event.topic, subscriber)

    async def _single_flight(self, events: list[BaseEvent], read: ReadSubscribers) -> _Verdicts:
        """:meth:`_refresh`, shared: concurrent first publishes of a class and topic
        wait for the one read already under way instead of each reading."""
        keys = {(type(event), event.topic) for event in events}
        pending = [self._inflight[k] for k in keys if k in self._inflight]
        if pending and len(pending) == len(keys) and len(set(map(id, pending))) == 1:
            return await asyncio.shield(pending[0])
        future: asyncio.Future[_Verdicts] = asyncio.get_running_loop().create_future()
        for key in keys:
            self._inflight[key] = future
        try:
            fresh = await self._refresh(events, read)
        except BaseException as exc:
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: no "never retrieved" warning if unshared
            raise
        else:
            future.set_result(fresh)
            return fresh
        finally:
            for key in keys:
                if self._inflight.get(key) is future:
                    del self._inflight[key]

    async def _refresh(self, events: list[BaseEvent], read: ReadSubscribers) -> _Verdicts:
        """Read the subscriber schemas of ``events``' topics; record and return the
        verdict of each (class, topic)."""
        subscribers = await read(sorted({event.topic for event in events}))
        expiry = time.monotonic() + self.ttl
        out: _Verdicts = {}
        for event in events:
            cls, topic = type(event), event.topic
            if (cls, topic) in out:
                continue
            mismatches: list[LiveMismatch] = []
            rows = subscribers.get(topic, [])
            if rows and cls is not BaseEvent:
                writer = self._local.get(cls)
                if writer is None:
                    schema = live_schema(cls)
                    writer = self._local[cls] = (schema, schema_hash(schema))
                readers = [s for s in rows if s.hash != writer[1]]  # the same class: compatible
                mismatches = live_mismatches(cls.__name__, writer[0], readers)
            out[cls, topic] = mismatches
            self._verdicts[cls, topic] = (expiry, mismatches)
        return out
