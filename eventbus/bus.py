"""The EventBus: publish events, run their handlers as dramatiq actors.

One concept past ~500 lines: :class:`EventBus`, the application's one entry point
(publishing, its lifecycle, subscriptions, health, dead letters); what it
delegates (encoding, routing, dispatch, the backends) lives in modules of its own.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import dramatiq
from dramatiq import Middleware
from dramatiq.encoder import JSONEncoder
from pydantic_core import PydanticSerializationError

from eventbus import keys
from eventbus.backends import create_backend
from eventbus.backends.base import Backend, OutgoingEvent
from eventbus.config import DEFAULT_SERVICE, EventBusSettings
from eventbus.context import (
    VALID_CORRELATION_ID,
    correlation_id_var,
    get_current_event,
    new_correlation_id,
)
from eventbus.dlq.queue import DeadLetterQueue
from eventbus.dlq.store import DeadLetterStore, MemoryDeadLetterStore
from eventbus.events import CAUSATION_ID, CORRELATION_ID, BaseEvent, encode_envelope
from eventbus.exceptions import (
    ConfigurationError,
    EventBusError,
    EventTooLargeError,
    PublishError,
    UnroutedError,
)
from eventbus.health import HealthChecker
from eventbus.metrics import (
    CountsUnrouted,
    InMemoryMetricsCollector,
    MetricsCollector,
    NoopMetricsCollector,
    ReadsTheBus,
)
from eventbus.middleware import DeadLetters, Metrics, Retries, RetryPolicy, Tracing
from eventbus.registry import TOPIC_NAME, HandlerRegistry, HandlerSpec
from eventbus.routing import Subscriptions
from eventbus.tracing import (
    EventSpan,
    EventTracer,
    LoggingTracer,
    NoopTracer,
    SpanStatus,
    get_current_span,
)
from eventbus.upcasting import warn_chain_gaps

if TYPE_CHECKING:
    from eventbus.dependencies import DependencyOverrides
    from eventbus.outbox.outbox import Outbox, OutboxSession

logger = logging.getLogger(__name__)

#: Stands in for the publish span when the tracer is the NoopTracer (never finished).
_UNTRACED = EventSpan(span_id="", operation="publish")

#: Seconds between two warnings about the same unrouted topic.
UNROUTED_WARNING_INTERVAL = 60.0

#: Longest ``publish(..., delay=...)``, in seconds (a week: the longest retry delay).
MAX_PUBLISH_DELAY = 7 * 24 * 3600.0


def deliver_at(delay: timedelta | float | None, eta: datetime | None) -> int | None:
    """When an event published with ``delay`` or ``eta`` becomes due, in
    milliseconds since the epoch; None for at once (no delay, a zero delay, or an
    ``eta`` already past).

    Raises:
      ValueError: Both are given; ``delay`` is negative, not finite or over
        :data:`MAX_PUBLISH_DELAY`; ``eta`` is a naive datetime or further than that.
      TypeError: ``delay`` is not a number or a timedelta, ``eta`` not a datetime.
    """
    if delay is None and eta is None:
        return None
    if delay is not None and eta is not None:
        raise ValueError("publish() takes delay= or eta=, not both")
    now = time.time()
    if eta is not None:
        if not isinstance(eta, datetime):
            raise TypeError(f"eta must be a datetime, got {type(eta).__name__}")
        if eta.tzinfo is None or eta.utcoffset() is None:
            raise ValueError(
                f"eta={eta.isoformat()} is a naive datetime: give it a time zone, e.g. "
                "datetime.now(UTC) + timedelta(minutes=5)"
            )
        seconds = eta.timestamp() - now
        name = f"eta={eta.isoformat()}"
    else:
        if isinstance(delay, timedelta):
            seconds = delay.total_seconds()
        elif isinstance(delay, int | float) and not isinstance(delay, bool):
            seconds = float(delay)
        else:
            raise TypeError(
                f"delay must be seconds (a number) or a timedelta, got {type(delay).__name__}"
            )
        name = f"delay={seconds:g}s"
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"{name}: a delay must be a finite number of seconds >= 0")
    if seconds > MAX_PUBLISH_DELAY:
        raise ValueError(
            f"{name} is further than the longest delay, {MAX_PUBLISH_DELAY / 86400:g} days "
            "(eventbus.bus.MAX_PUBLISH_DELAY): store the event and publish it closer to "
            "its time"
        )
    if seconds <= 0:
        return None  # due now (an eta already past is delivered at once)
    return math.ceil((now + seconds) * 1000)


def _metrics(settings: EventBusSettings) -> MetricsCollector:
    if settings.metrics == "prometheus":
        from eventbus.prometheus import PrometheusMetricsCollector

        return PrometheusMetricsCollector()
    if settings.metrics == "memory":
        return InMemoryMetricsCollector()
    return NoopMetricsCollector()


def _tracer(settings: EventBusSettings, backend: Backend) -> EventTracer:
    if settings.tracing == "otel":
        from eventbus.otel import OpenTelemetryTracer

        return OpenTelemetryTracer(messaging_system=backend.messaging_system)
    if settings.tracing == "logging":
        return LoggingTracer()
    return NoopTracer()


#: Derived service names that say nothing about the code: two codebases with a flat
#: ``handlers.py`` would share one service (and split its events).  A worker refuses
#: them unless ``EVENTBUS_SERVICE`` is set.
GENERIC_SERVICE_NAMES = frozenset(
    {
        DEFAULT_SERVICE,
        "handlers",
        "handler",
        "app",
        "application",
        "main",
        "tasks",
        "worker",
        "workers",
        "events",
        "consumers",
        "subscribers",
        "src",
        "api",
        "service",
        "services",
    }
)


def service_name(handlers: Iterable[HandlerSpec]) -> str:
    """The default service name: the one top-level package the handlers come from.

    ``myapp`` for handlers in ``myapp.handlers`` and ``myapp.billing``; ``default``
    when there are none, or they come from several packages (set
    ``EVENTBUS_SERVICE`` then: the name must not change between deploys).
    """
    packages = set()
    for spec in handlers:
        module = getattr(spec.fn, "__module__", None) or ""
        top = module.split(".", 1)[0]
        if top and top != "__main__":
            packages.add(re.sub(r"[^a-zA-Z0-9_-]", "_", top))
    if len(packages) == 1:
        (name,) = packages
        return name if re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_-]{0,99}", name) else DEFAULT_SERVICE
    if packages:
        logger.warning(
            "Handlers come from several packages (%s): the service is named %r; set "
            "EVENTBUS_SERVICE so that it stays the same across deploys.",
            ", ".join(sorted(packages)),
            DEFAULT_SERVICE,
        )
    return DEFAULT_SERVICE


def _published_classes(classes: Iterable[type[BaseEvent]]) -> tuple[type[BaseEvent], ...]:
    """``EventBus(publishes=...)`` checked: event classes with a default topic, each once.

    Raises:
      TypeError: Not an iterable of BaseEvent subclasses (an instance, a string).
      ConfigurationError: A class without a default topic (its send channel is unknown).
    """
    if isinstance(classes, str | bytes) or not isinstance(classes, Iterable):
        raise TypeError(f"publishes must be a list of event classes, got {classes!r}")
    found: dict[type[BaseEvent], None] = {}
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, BaseEvent)) or cls is BaseEvent:
            raise TypeError(
                f"publishes must list BaseEvent subclasses (the classes, not instances), "
                f"got {cls!r}"
            )
        if cls.default_topic() is None:
            raise ConfigurationError(
                f"{cls.__name__} in publishes has no default topic; give its 'topic' field "
                "a default so its channel is known"
            )
        found[cls] = None
    return tuple(found)


class EventBus:
    """Publishes events and runs every subscribed handler of their topic.

    Parameters:
      backend: Where events go; default from ``settings.backend`` (``sync``: in
        this process).
      settings: Defaults to :class:`EventBusSettings` read from the environment.
      retry_policy: The retry policy of handlers that set none; default from
        settings (3 retries after 1 s, x2, at most 60 s apart).
      metrics: A :class:`~eventbus.metrics.MetricsCollector`.
      tracer: An :class:`~eventbus.tracing.EventTracer`.
      publishes: The event classes this application publishes, for its AsyncAPI
        document (``send`` operations; see :mod:`eventbus.contracts.asyncapi`).
        It documents; it does not restrict what :meth:`publish` accepts.

    Where handlers run: in this process on the embedded ``sync`` backend; on the
    ``redis`` and ``kafka`` backends in worker processes (``dramatiq
    eventbus.actors``), and in this process too only with ``EVENTBUS_CONSUME=true``.

    Example::

        bus = EventBus()
        app = FastAPI(lifespan=create_lifespan(bus))

        @app.post("/users")
        async def create_user(bus: EventBus = Depends(get_event_bus)):
            await bus.publish(UserCreated(user_id=1, username="alice"))
    """

    def __init__(
        self,
        backend: Backend | None = None,
        settings: EventBusSettings | None = None,
        retry_policy: RetryPolicy | None = None,
        metrics: MetricsCollector | None = None,
        tracer: EventTracer | None = None,
        *,
        publishes: Iterable[type[BaseEvent]] = (),
    ) -> None:
        #: The event classes this application declares it publishes (its AsyncAPI
        #: document's ``send`` operations, :mod:`eventbus.contracts.asyncapi`).
        self.publishes: tuple[type[BaseEvent], ...] = _published_classes(publishes)
        self.settings = settings if settings is not None else EventBusSettings()
        self.metrics: MetricsCollector = metrics if metrics is not None else _metrics(self.settings)
        self.backend = backend if backend is not None else create_backend(self.settings)
        self.tracer: EventTracer = (
            tracer if tracer is not None else _tracer(self.settings, self.backend)
        )
        if not isinstance(self.metrics, MetricsCollector):
            raise TypeError(f"metrics must implement MetricsCollector, got {self.metrics!r}")
        if not isinstance(self.tracer, EventTracer):
            raise TypeError(f"tracer must implement EventTracer, got {self.tracer!r}")
        self.retry_policy = retry_policy or RetryPolicy.from_settings(self.settings)
        self.registry = HandlerRegistry()
        #: The topics this bus subscribed and their handlers.
        self.subscriptions = Subscriptions(self.registry, self.settings.default_queue)
        store = self.backend.dead_letter_store(self.settings)
        if store is None:
            store = MemoryDeadLetterStore(max_size=self.settings.dlq_max_size)
        self.dlq = DeadLetterQueue(
            store,
            replayer=self.backend.replay,
            refusal=self.backend.replay_refusal,
            refusals=self.backend.replay_refusals,
            targets=self.backend.replay_targets,
        )
        self.broker = self.backend.bind(self._middleware(), self.subscriptions)
        self.health = HealthChecker(self.backend)
        if isinstance(self.metrics, ReadsTheBus):
            self.metrics.attach(self)
        self._unrouted_warned: dict[str, float] = {}
        #: The transactional outbox ``publish(..., session=...)`` writes to, started
        #: and stopped with the bus (set by :class:`~eventbus.outbox.outbox.Outbox`).
        self.outbox: Outbox | None = None
        self._consume: bool | None = None
        self._stopping = False
        self._started = False
        self._before_stop: Callable[[], Awaitable[None]] | None = None

    def _middleware(self) -> list[Middleware]:
        store = self.dlq.store if self.settings.dlq_enabled else None
        middleware: list[Middleware] = []
        # The defaults record nothing: leave their middleware out of the hot path.
        if not isinstance(self.metrics, NoopMetricsCollector):
            middleware.append(Metrics(self.metrics))
        if not isinstance(self.tracer, NoopTracer):
            middleware.append(Tracing(self.tracer))
        middleware.append(DeadLetters(store, self.metrics))
        middleware.append(Retries(self.retry_policy, self.metrics))
        return middleware

    def run_on(
        self,
        backend: Backend,
        *,
        outer: Sequence[Middleware] = (),
        inner: Sequence[Middleware] = (),
        dead_letter_store: DeadLetterStore | None = None,
        before_stop: Callable[[], Awaitable[None]] | None = None,
    ) -> Callable[[], None]:
        """Run this stopped bus on ``backend`` until the returned ``restore()`` is called.

        For test kits (:class:`~eventbus.testing.EventBusTestKit` runs an app's bus
        on the embedded backend this way).  The bus's own middleware chain (metrics,
        tracing, dead letters, retries) runs between ``outer`` (first, so its
        ``after_`` hooks run last) and ``inner``; dead letters go to
        ``dead_letter_store`` (default: a fresh in-memory store), and
        ``before_stop`` is awaited at the start of :meth:`stop` while the bus still
        runs (to drain, say).  ``restore()`` gives the bus back its backend, broker,
        dead-letter queue and health checker.

        Raises:
          RuntimeError: The bus is running.
        """
        if self._started:
            raise RuntimeError("run_on() needs a stopped bus")
        saved = (self.backend, self.broker, self.dlq, self.health, self._before_stop)
        if dead_letter_store is None:
            dead_letter_store = MemoryDeadLetterStore(max_size=self.settings.dlq_max_size)
        self.dlq = DeadLetterQueue(
            dead_letter_store,
            replayer=backend.replay,
            refusal=backend.replay_refusal,
            refusals=backend.replay_refusals,
            targets=backend.replay_targets,
        )
        chain = [*outer, *self._middleware(), *inner]
        self.broker = backend.bind(chain, self.subscriptions)
        self.backend = backend
        self.health = HealthChecker(backend)
        self._before_stop = before_stop

        def restore() -> None:
            (self.backend, self.broker, self.dlq, self.health, self._before_stop) = saved

        return restore

    @property
    def started(self) -> bool:
        """Whether :meth:`start` has run and :meth:`stop` has not."""
        return self._started

    @property
    def service(self) -> str:
        """This process's service: ``EVENTBUS_SERVICE``, else derived from the
        handlers' package (see :func:`service_name`)."""
        return self.settings.service or service_name(self.registry.all_handlers())

    @property
    def consumes(self) -> bool:
        """Whether handlers run in this process (see the class docstring)."""
        if self._consume is not None:
            return self.backend.always_consumes or self._consume
        return self.backend.always_consumes or self.settings.consume

    async def start(self, *, consume: bool | None = None) -> None:
        """Start the backend and subscribe every topic that has handlers.

        Parameters:
          consume: Run the handlers in this process (and, on Redis, write their
            subscriptions); default ``EVENTBUS_CONSUME``.  Worker processes pass
            True; the embedded backend always consumes.
        """
        if self._started:
            return
        self._consume = consume
        encoder = dramatiq.get_encoder()
        if not isinstance(encoder, JSONEncoder):
            raise ConfigurationError(
                f"dramatiq's global encoder is {type(encoder).__name__}; eventbus only "
                "sends JSON (anyone able to write to the broker could run code otherwise)"
            )
        self.subscriptions.subscribe_all()
        self.subscriptions.service = self.service
        warn_chain_gaps(s.event_type for s in self.registry.all_handlers() if s.event_type)
        try:
            self.check_service(self.consumes)
        except ConfigurationError as exc:
            # Worker processes refuse (eventbus.actors, python -m eventbus.kafka); a
            # process that consumes on its own terms (EVENTBUS_CONSUME=true, tests) is
            # told loudly.
            logger.warning("%s", exc)
        await self.backend.start(self.consumes)
        self._started = True
        if self.outbox is not None:
            await self.outbox.start()
        logger.info(
            "EventBus started (backend=%s, service=%s, handlers run %s, topics=%d)",
            self.backend.name,
            self.subscriptions.service,
            "here" if self.consumes else "in workers",
            len(self.subscriptions.topics),
        )

    def check_service(self, consume: bool) -> None:
        """Refuse to consume under a generic derived service name on a shared backend.

        Two codebases with a flat ``handlers.py`` both derive the service
        ``handlers``: their workers would share one subscription and split its
        events.  Names in :data:`GENERIC_SERVICE_NAMES` need ``EVENTBUS_SERVICE``.

        Raises:
          ConfigurationError: ``consume`` on Redis or Kafka, no ``EVENTBUS_SERVICE``,
            and the handlers' package gives a generic name.
        """
        service = self.service
        if (
            consume
            and not self.backend.always_consumes
            and not self.settings.service
            and self.registry.all_handlers()
            and service in GENERIC_SERVICE_NAMES
        ):
            raise ConfigurationError(
                f"this worker's service would be named {service!r} after "
                "the package of its handlers, a name other codebases derive too (their "
                "workers would share its subscriptions and split its events): set "
                "EVENTBUS_SERVICE to this service's own name, e.g. EVENTBUS_SERVICE=billing"
            )

    async def stop(self) -> None:
        """Finish in-flight handlers (within ``settings.shutdown_timeout``) and stop.

        Handlers still finishing may publish follow-up events until the backend has
        stopped (the embedded backend refuses them once it stopped accepting work).
        """
        if not self._started or self._stopping:
            return
        if self._before_stop is not None:
            await self._before_stop()
        self._stopping = True
        try:
            if self.outbox is not None:  # its relay sends its last batch through the backend
                await self.outbox.stop(self.settings.shutdown_timeout)
            await self.backend.stop(self.settings.shutdown_timeout)
        finally:
            self._started = False
            self._stopping = False
        logger.info("EventBus stopped")

    @property
    def dependency_overrides(self) -> DependencyOverrides:
        """Replacements for handler dependencies on this bus, as FastAPI's
        ``app.dependency_overrides``::

            bus.dependency_overrides[get_db] = get_test_db
        """
        return self.registry.dependency_overrides

    @dependency_overrides.setter
    def dependency_overrides(self, value: Mapping[Callable[..., Any], Callable[..., Any]]) -> None:
        self.registry.dependency_overrides = value

    async def drain(self, timeout: float | None = None) -> None:
        """Return once every event published so far is handled or dead-lettered.

        Raises:
          TimeoutError: Deliveries are still pending after ``timeout`` seconds.
        """
        await self.backend.drain(timeout)

    async def subscribe(self, topic: str) -> None:
        """Dispatch ``topic`` to its handlers from now on (those registered so far and later)."""
        self.subscriptions.subscribe(topic)

    async def unsubscribe(self, topic: str) -> None:
        """Stop dispatching ``topic`` in this process."""
        self.subscriptions.unsubscribe(topic)

    @property
    def topics(self) -> list[str]:
        """The subscribed topics."""
        return self.subscriptions.topics

    def _check(self, event: object) -> BaseEvent:
        if not isinstance(event, BaseEvent):
            raise TypeError(f"publish() takes a BaseEvent, got {type(event).__name__}")
        if not self._started:
            raise PublishError(
                "the EventBus is not started: the app's lifespan did not run (in tests, "
                "`with TestClient(app) as client:` runs it; `TestClient(app)` alone does not). "
                "Create the app with FastAPI(lifespan=create_lifespan(bus)), or await bus.start()."
            )
        topic = event.topic
        if not TOPIC_NAME.fullmatch(topic):
            if not topic:
                name = type(event).__name__
                raise PublishError(
                    f"{name} has no topic (topic=''): give the class a default "
                    '(topic: str = "orders.created") or pass topic=... when creating the event'
                )
            raise PublishError(
                f"cannot publish to topic {topic!r}: use 1-249 letters, digits or . _ : / @ + -"
            )
        return event

    def _outgoing(
        self,
        event: BaseEvent,
        span: EventSpan,
        cid: str,
        due: int | None,
        cause: BaseEvent | None,
    ) -> OutgoingEvent:
        """``event`` encoded for the backend; ``cause``: the event being handled here
        (its id becomes the causation id), looked up once per publish."""
        metadata = {CORRELATION_ID: cid}
        if cause is not None:
            metadata[CAUSATION_ID] = cause.event_id
        own = event.metadata.get(CORRELATION_ID)
        if own is not None and not VALID_CORRELATION_ID.fullmatch(own):
            # An id set in the event's metadata must be as safe as a header's.
            event = event.model_copy(update={"metadata": {**event.metadata, CORRELATION_ID: cid}})
            own = None
        try:
            envelope = encode_envelope(event, metadata)
        except (PydanticSerializationError, ValueError, TypeError) as exc:
            raise PublishError(
                f"event {event.event_id} ({type(event).__name__}) cannot be written as JSON: {exc}"
            ) from None
        if len(envelope) > self.settings.max_event_bytes:
            raise EventTooLargeError(
                f"event {event.event_id} on {event.topic!r} is {len(envelope)} bytes as JSON, "
                f"over EVENTBUS_MAX_EVENT_BYTES={self.settings.max_event_bytes}; store the "
                "payload elsewhere and publish a reference"
            )
        event_cid = own or cid
        options: dict[str, Any] = {
            keys.TOPIC: event.topic,
            keys.CORRELATION_ID: event_cid,
            keys.TRACE_ID: span.trace_id,
            keys.PARENT_SPAN_ID: span.span_id,
        }
        context = span.context
        if context:
            options[keys.TRACE_CONTEXT] = context
        if due is not None:
            options[keys.DELIVER_AT] = due
        return OutgoingEvent(
            event=event,
            envelope=envelope,
            options=options,
            correlation_id=event_cid,
            trace_id=span.trace_id,
            span_id=span.span_id,
            trace_context=dict(context) if context else {},
        )

    async def publish(
        self,
        event: BaseEvent,
        *,
        session: OutboxSession | None = None,
        delay: timedelta | float | None = None,
        eta: datetime | None = None,
    ) -> None:
        """Deliver ``event`` to every handler subscribed to its topic.

        Returns once the backend holds the event for every subscription of its
        topic.  A topic without any subscription is counted as unrouted and, per
        ``EVENTBUS_UNROUTED``, logged at WARNING (default) or refused.

        Raises:
          TypeError: ``event`` is not a BaseEvent.
          PublishError: The bus is not started, the event has no topic, cannot be
            written as JSON (a NaN or infinite float, named; a lone surrogate; an
            object pydantic cannot serialize; nesting deeper than
            :data:`~eventbus.events.MAX_DEPTH`), or the backend refused it; nothing
            of it was enqueued.  Or the backend did not answer in time after the
            request was sent: the message then says the event may have been
            published (publishing it again can deliver it twice).
          EventTooLargeError: Its JSON is over ``EVENTBUS_MAX_EVENT_BYTES``.
          UnroutedError: ``EVENTBUS_UNROUTED=error`` and no subscription handles
            its topic.

        With ``session`` (a SQLAlchemy ``AsyncSession`` or ``AsyncConnection``), the
        event is written to the outbox in that session's transaction instead: it
        leaves only if the transaction commits, through the outbox relay (see
        :mod:`eventbus.outbox.outbox`; unrouted topics are then only warned about).

        With ``delay`` (seconds, or a ``timedelta``) or ``eta`` (a time-zone aware
        ``datetime``), the handlers get the event no earlier than then (at most
        :data:`MAX_PUBLISH_DELAY` ahead; an ``eta`` already past means now).  It is
        routed now: the subscriptions of its topic at publish time receive it.  The
        time is absolute, taken at this call: an outbox row relayed later keeps it.
        A backend that cannot hold events (Kafka) refuses with a PublishError.
        ``ValueError`` names a delay that is negative, both arguments, a naive
        ``eta`` or one too far ahead.
        """
        self._check(event)
        due = deliver_at(delay, eta) if delay is not None or eta is not None else None
        if due is not None:
            self._check_delay()
        if session is not None:
            await self._write_outbox([event], session, due)
            return
        cid = correlation_id_var.get()
        if cid:
            await self._publish_batch([event], cid, due)
            return
        cid = new_correlation_id()
        token = correlation_id_var.set(cid)
        try:
            await self._publish_batch([event], cid, due)
        finally:
            correlation_id_var.reset(token)

    def _check_delay(self) -> None:
        refusal = self.backend.delay_refusal()
        if refusal is not None:
            raise PublishError(refusal)

    async def publish_many(
        self,
        events: Iterable[BaseEvent],
        *,
        session: OutboxSession | None = None,
        delay: timedelta | float | None = None,
        eta: datetime | None = None,
    ) -> None:
        """Publish several events with one backend call, all or none.

        Every event is checked first: a non-event raises TypeError before any is sent.
        With ``session``, they are written to the outbox in its transaction; with
        ``delay`` or ``eta``, every event of the call is due then (see :meth:`publish`).
        """
        batch = [self._check(event) for event in events]
        due = deliver_at(delay, eta) if delay is not None or eta is not None else None
        if due is not None:
            self._check_delay()
        if not batch:
            return
        if session is not None:
            await self._write_outbox(batch, session, due)
            return
        token = None
        cid = correlation_id_var.get()
        if not cid:
            cid = new_correlation_id()
            token = correlation_id_var.set(cid)
        try:
            await self._publish_batch(batch, cid, due)
        finally:
            if token is not None:
                correlation_id_var.reset(token)

    async def _publish_batch(
        self, batch: list[BaseEvent], cid: str, due: int | None = None
    ) -> None:
        parent = get_current_span()
        cause = get_current_event()
        tracer = self.tracer
        started = time.perf_counter()
        spans: list[EventSpan] = []
        outgoing: list[OutgoingEvent] = []
        traced = not isinstance(tracer, NoopTracer)  # the default: no span to make or finish
        strict = self.settings.unrouted == "error"
        try:
            for event in batch:
                if traced:
                    span = tracer.start_span(
                        "publish", topic=event.topic, event_id=event.event_id, parent_span=parent
                    )
                else:
                    span = _UNTRACED
                spans.append(span)
                outgoing.append(self._outgoing(event, span, cid, due, cause))
            unrouted = await self.backend.publish(outgoing, strict=strict)
        except Exception as exc:
            for span in spans if traced else ():
                span.finish(SpanStatus.ERROR, str(exc))
                tracer.finish_span(span)
            if isinstance(exc, EventBusError):
                if isinstance(exc, UnroutedError):
                    self._unrouted(batch, set(exc.topics))
                raise
            raise PublishError(f"could not publish to {self.backend.name}: {exc}") from exc
        elapsed = (time.perf_counter() - started) / len(batch)
        metrics = self.metrics
        for event, span in zip(batch, spans, strict=True):
            if traced:
                span.finish(SpanStatus.OK)
                tracer.finish_span(span)
            metrics.inc_published(event.topic)
            metrics.observe_publish_duration(event.topic, elapsed)
        if unrouted:
            self._unrouted(batch, unrouted)

    async def _write_outbox(
        self, batch: list[BaseEvent], session: OutboxSession, due: int | None = None
    ) -> None:
        """Encode ``batch`` as for a publish (span, correlation and causation ids) and
        add it to the outbox in ``session``'s transaction."""
        outbox = self.outbox
        if outbox is None:
            raise PublishError(
                "publish(..., session=...) writes to the transactional outbox, and this bus "
                "has none: create it with Outbox(bus, engine) (eventbus.outbox.outbox)"
            )
        cid = correlation_id_var.get() or new_correlation_id()
        parent = get_current_span()
        cause = get_current_event()
        tracer = self.tracer
        traced = not isinstance(tracer, NoopTracer)
        spans: list[EventSpan] = []
        try:
            outgoing = []
            for event in batch:
                span = _UNTRACED
                if traced:
                    span = tracer.start_span(
                        "publish", topic=event.topic, event_id=event.event_id, parent_span=parent
                    )
                    spans.append(span)
                outgoing.append(self._outgoing(event, span, cid, due, cause))
            await outbox.write(session, outgoing)
        except Exception as exc:
            for span in spans:
                span.finish(SpanStatus.ERROR, str(exc))
                tracer.finish_span(span)
            if isinstance(exc, EventBusError):
                raise
            raise PublishError(f"could not write to the outbox: {exc}") from exc
        for span in spans:
            span.finish(SpanStatus.OK)
            tracer.finish_span(span)

    def _unrouted(self, batch: list[BaseEvent], topics: set[str]) -> None:
        """Count the events of ``topics`` as unrouted; warn at most once a minute per topic."""
        metrics = self.metrics
        if isinstance(metrics, CountsUnrouted):
            for event in batch:
                if event.topic in topics:
                    metrics.inc_unrouted(event.topic)
        if self.settings.unrouted == "ignore":
            return
        now = time.monotonic()
        for topic in sorted(topics):
            last = self._unrouted_warned.get(topic)
            if last is not None and now - last < UNROUTED_WARNING_INTERVAL:
                continue
            self._unrouted_warned[topic] = now
            logger.warning(
                "No subscription handles topic %r (%s backend): its events reach no handler "
                "unless a subscription is written within the backend's window for unrouted "
                "events, if it keeps them (docs: 'Unrouted events'). "
                "Register its handlers (workers write their subscriptions when they boot, "
                "or run `eventbus subscriptions sync MODULES`); EVENTBUS_UNROUTED=error "
                "refuses such publishes.",
                topic,
                self.backend.name,
            )
