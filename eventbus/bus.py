"""The EventBus: publish events, run their handlers as dramatiq actors."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import dramatiq
from dramatiq import Actor, Message, Middleware
from dramatiq.encoder import JSONEncoder

from .asgi import correlation_id_var, new_correlation_id, new_message_id
from .backends.base import Backend, OutgoingEvent, handler_message
from .config import EventBusSettings
from .dlq import DeadLetterQueue, FailedEvent, MemoryDeadLetterStore
from .events import CAUSATION_ID, CORRELATION_ID, BaseEvent, encode_event
from .exceptions import ConfigurationError, EventBusError, EventTooLargeError, PublishError
from .health import HealthChecker
from .metrics import InMemoryMetricsCollector, MetricsCollector, NoopMetricsCollector
from .middleware import DeadLetters, Metrics, Retries, RetryPolicy, Tracing, keys
from .registry import TOPIC_NAME, HandlerRegistry, get_current_event, validate_topic
from .tracing import (
    EventSpan,
    EventTracer,
    LoggingTracer,
    NoopTracer,
    SpanStatus,
    get_current_span,
)

logger = logging.getLogger(__name__)

#: Stands in for the publish span when the tracer is the NoopTracer (never finished).
_UNTRACED = EventSpan(span_id="", operation="publish")

#: Bytes the envelope adds to an event's JSON (type name, correlation and causation ids).
ENVELOPE_OVERHEAD = 256


def create_backend(settings: EventBusSettings) -> Backend:
    """The backend ``settings.backend`` names, configured from ``settings``."""
    if settings.backend == "sync":
        from .backends.sync import SyncBackend

        return SyncBackend(
            max_concurrency=settings.max_concurrency, worker_threads=settings.worker_threads
        )
    if settings.backend == "redis":
        from .backends.redis import RedisBackend

        return RedisBackend.from_settings(settings)
    if settings.backend == "kafka":
        from .backends.kafka import KafkaBackend

        return KafkaBackend.from_settings(settings)
    raise ConfigurationError(
        f"EVENTBUS_BACKEND={settings.backend!r} is not available in this version"
    )


def _metrics(settings: EventBusSettings) -> MetricsCollector:
    if settings.metrics == "prometheus":
        from .prometheus import PrometheusMetricsCollector

        return PrometheusMetricsCollector()
    if settings.metrics == "memory":
        return InMemoryMetricsCollector()
    return NoopMetricsCollector()


def _tracer(settings: EventBusSettings, backend: Backend) -> EventTracer:
    if settings.tracing == "otel":
        from .otel import DEFAULT_MESSAGING_SYSTEM, OpenTelemetryTracer

        # Over Kafka the spans describe Kafka records: messaging.system = kafka.
        system = "kafka" if backend.name == "kafka" else DEFAULT_MESSAGING_SYSTEM
        return OpenTelemetryTracer(messaging_system=system)
    if settings.tracing == "logging":
        return LoggingTracer()
    return NoopTracer()


class EventBus:
    """Publishes events and runs every subscribed handler of their topic.

    Parameters:
      backend: Where messages go; default from ``settings.backend`` (``sync``: in
        this process).
      settings: Defaults to :class:`EventBusSettings` read from the environment.
      retry_policy: The retry policy of handlers that set none; default from
        settings (3 retries after 1 s, x2, at most 60 s apart).
      metrics: A :class:`~eventbus.metrics.MetricsCollector`.
      tracer: An :class:`~eventbus.tracing.EventTracer`.

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
    ) -> None:
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
        store = self.backend.dead_letter_store(self.settings)
        if store is None:
            store = MemoryDeadLetterStore(max_size=self.settings.dlq_max_size)
        self.dlq = DeadLetterQueue(store, replayer=self._replay)
        self.broker = self.backend.bind(self._middleware())
        self.backend.set_router(self._route, lambda: self.topics)
        self.health = HealthChecker(self.backend)
        attach = getattr(self.metrics, "attach", None)
        if attach is not None:
            attach(self)
        self._subscribed: dict[str, None] = {}
        self._routes: dict[str, list[Actor[Any, Any]]] = {}
        self._routes_version: tuple[int, int] | None = None
        self._started = False

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

    @property
    def started(self) -> bool:
        """Whether :meth:`start` has run and :meth:`stop` has not."""
        return self._started

    async def start(self) -> None:
        """Start the backend and subscribe every topic that has handlers."""
        if self._started:
            return
        encoder = dramatiq.get_encoder()
        if not isinstance(encoder, JSONEncoder):
            raise ConfigurationError(
                f"dramatiq's global encoder is {type(encoder).__name__}; eventbus only "
                "sends JSON (anyone able to write to the broker could run code otherwise)"
            )
        await self.backend.start()
        for topic in self.registry.topics:
            self._subscribed[topic] = None
        self._rebuild_routes()
        self._started = True
        logger.info(
            "EventBus started (backend=%s, topics=%d)", self.backend.name, len(self._subscribed)
        )

    async def stop(self) -> None:
        """Finish in-flight handlers (within ``settings.shutdown_timeout``) and stop."""
        if not self._started:
            return
        self._started = False
        await self.backend.stop(self.settings.shutdown_timeout)
        logger.info("EventBus stopped")

    async def drain(self, timeout: float | None = None) -> None:
        """Return once every event published so far is handled or dead-lettered.

        Raises:
          TimeoutError: Deliveries are still pending after ``timeout`` seconds.
        """
        await self.backend.drain(timeout)

    async def subscribe(self, topic: str) -> None:
        """Dispatch ``topic`` to its handlers from now on (those registered so far and later)."""
        validate_topic(topic)
        self._subscribed[topic] = None
        self._routes_version = None

    async def unsubscribe(self, topic: str) -> None:
        """Stop dispatching ``topic``; publishing to it is then a no-op."""
        self._subscribed.pop(topic, None)
        self._routes_version = None

    @property
    def topics(self) -> list[str]:
        """The subscribed topics."""
        return list(self._subscribed)

    def _rebuild_routes(self) -> None:
        # Actors of handlers that left the registry go (their pending messages are
        # dead-lettered with ActorNotFound); those of unsubscribed topics stay, so
        # messages already enqueued for them are still handled.
        broker = self.broker
        registered = {spec.name: spec for spec in self.registry.all_handlers()}
        for name, existing in list(broker.actors.items()):
            if existing.options.get(keys.HANDLER) is not registered.get(name):
                del broker.actors[name]
        routes: dict[str, list[Actor[Any, Any]]] = {}
        for spec in registered.values():
            if spec.topic not in self._subscribed:
                continue
            actor: Actor[Any, Any] | None = broker.actors.get(spec.name)
            if actor is None:
                actor = Actor(
                    spec.run_async if spec.is_async else spec.run_sync,
                    broker=broker,
                    actor_name=spec.name,
                    queue_name=spec.queue or self.settings.default_queue,
                    priority=0,
                    options={keys.HANDLER: spec, **self.backend.actor_options(spec)},
                )
            routes.setdefault(spec.topic, []).append(actor)
        self._routes = routes
        self._routes_version = self.registry.version

    def _route(self, topic: str) -> list[Actor[Any, Any]]:
        if self._routes_version != self.registry.version:
            self._rebuild_routes()
        return self._routes.get(topic, [])

    def _check(self, event: object) -> BaseEvent:
        if not isinstance(event, BaseEvent):
            raise TypeError(f"publish() takes a BaseEvent, got {type(event).__name__}")
        if not self._started:
            raise PublishError(
                "the EventBus is not started: use FastAPI(lifespan=create_lifespan(bus)) "
                "or await bus.start()"
            )
        if not TOPIC_NAME.fullmatch(event.topic):
            raise PublishError(
                f"cannot publish to topic {event.topic!r}: "
                "use 1-249 letters, digits or . _ : / @ + -"
            )
        size = len(event.__pydantic_serializer__.to_json(event)) + ENVELOPE_OVERHEAD
        if size > self.settings.max_event_bytes:
            raise EventTooLargeError(
                f"event {event.event_id} on {event.topic!r} is about {size} bytes as JSON, over "
                f"EVENTBUS_MAX_EVENT_BYTES={self.settings.max_event_bytes}; store the payload "
                "elsewhere and publish a reference"
            )
        return event

    def _envelope(self, event: BaseEvent, cid: str) -> dict[str, Any]:
        metadata = {CORRELATION_ID: cid}
        cause = get_current_event()
        if cause is not None:
            metadata[CAUSATION_ID] = cause.event_id
        return encode_event(event, metadata)

    def _outgoing(self, event: BaseEvent, span: EventSpan, cid: str) -> OutgoingEvent:
        # Backends that publish whole events (Kafka) route on the consuming side.
        envelope = self._envelope(event, cid)
        return OutgoingEvent(
            event=event,
            envelope=envelope,
            correlation_id=envelope["event"]["metadata"].get(CORRELATION_ID, cid),
            trace_id=span.trace_id,
            span_id=span.span_id,
            trace_context=dict(span.context),
        )

    def _prepare(self, event: BaseEvent, span: EventSpan, cid: str) -> list[Message[Any]]:
        actors = self._route(event.topic)
        if not actors:
            logger.debug(
                "No handler subscribed to topic %s; event %s dropped.", event.topic, event.event_id
            )
            unrouted = getattr(self.metrics, "inc_unrouted", None)
            if unrouted is not None:
                unrouted(event.topic)
            return []
        envelope = self._envelope(event, cid)
        options: dict[str, Any] = {
            keys.TOPIC: event.topic,
            keys.CORRELATION_ID: envelope["event"]["metadata"].get(CORRELATION_ID, cid),
            keys.TRACE_ID: span.trace_id,
            keys.PARENT_SPAN_ID: span.span_id,
        }
        if span.context:
            options[keys.TRACE_CONTEXT] = span.context
        return [handler_message(actor, envelope, options) for actor in actors]

    def _replay(self, record: FailedEvent) -> None:
        """Enqueue ``record``'s event for the handler that failed on it, retries reset."""
        if self._routes_version != self.registry.version:
            self._rebuild_routes()  # a handler unregistered since must not get it
        options = {
            keys.TOPIC: record.topic,
            keys.CORRELATION_ID: record.correlation_id,
            keys.TRACE_ID: record.trace_id,
            keys.REPLAY_OF: record.id,
        }
        message: Message[Any] = Message(
            queue_name=record.queue or self.settings.default_queue,
            actor_name=record.handler,
            args=(record.envelope,),
            kwargs={},
            options=options,
            message_id=new_message_id(),
        )
        self.backend.replay(message)

    async def publish(self, event: BaseEvent) -> None:
        """Deliver ``event`` to every handler subscribed to its topic.

        Returns once the backend holds one message per handler.  A topic without
        handlers is not an error (logged at debug level, counted as unrouted).

        Raises:
          TypeError: ``event`` is not a BaseEvent.
          PublishError: The bus is not started or the backend refused the event;
            nothing of it was enqueued.
        """
        self._check(event)
        cid = correlation_id_var.get()
        if cid:
            await self._publish_batch([event], cid)
            return
        cid = new_correlation_id()
        token = correlation_id_var.set(cid)
        try:
            await self._publish_batch([event], cid)
        finally:
            correlation_id_var.reset(token)

    async def publish_many(self, events: Iterable[BaseEvent]) -> None:
        """Publish several events with one backend call.

        Every event is checked first: a non-event raises TypeError before any is sent.
        """
        batch = [self._check(event) for event in events]
        if not batch:
            return
        token = None
        cid = correlation_id_var.get()
        if not cid:
            cid = new_correlation_id()
            token = correlation_id_var.set(cid)
        try:
            await self._publish_batch(batch, cid)
        finally:
            if token is not None:
                correlation_id_var.reset(token)

    async def _publish_batch(self, batch: list[BaseEvent], cid: str) -> None:
        parent = get_current_span()
        tracer = self.tracer
        started = time.perf_counter()
        spans: list[EventSpan] = []
        messages: list[Message[Any]] = []
        outgoing: list[OutgoingEvent] = []
        whole_events = self.backend.publishes_events
        traced = not isinstance(tracer, NoopTracer)  # the default: no span to make or finish
        try:
            for event in batch:
                if traced:
                    span = tracer.start_span(
                        "publish", topic=event.topic, event_id=event.event_id, parent_span=parent
                    )
                else:
                    span = _UNTRACED
                spans.append(span)
                if whole_events:
                    outgoing.append(self._outgoing(event, span, cid))
                else:
                    messages.extend(self._prepare(event, span, cid))
            if messages:
                await self.backend.enqueue(messages)
            if outgoing:
                await self.backend.publish_events(outgoing)
        except Exception as exc:
            for span in spans if traced else ():
                span.finish(SpanStatus.ERROR, str(exc))
                tracer.finish_span(span)
            if isinstance(exc, EventBusError):
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
