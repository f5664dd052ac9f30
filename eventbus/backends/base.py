"""What the bus needs of a backend."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import dramatiq
from dramatiq import Middleware
from dramatiq.middleware import MiddlewareError

from ..asgi import new_message_id

if TYPE_CHECKING:
    from dramatiq import Actor, Message

    from ..config import EventBusSettings
    from ..dlq import DeadLetterStore
    from ..events import BaseEvent
    from ..health import HealthResult
    from ..registry import HandlerSpec


@dataclass(frozen=True, slots=True)
class OutgoingEvent:
    """One event as the bus hands it to a backend that publishes events itself.

    Attributes:
      event: The event.
      envelope: Its wire envelope (metadata already stamped with the correlation id).
      correlation_id: The correlation id of the publishing request.
      trace_id, span_id: The publish span, parent of the handlers' dispatch spans.
      trace_context: The publish span's propagation fields (W3C ``traceparent``,
        ``tracestate``, ``baggage``), when the tracer sets them.
    """

    event: BaseEvent
    envelope: dict[str, Any]
    correlation_id: str
    trace_id: str
    span_id: str
    trace_context: dict[str, str] = field(default_factory=dict)


class Backend(abc.ABC):
    """Moves dramatiq messages from ``publish`` to the handlers' actors.

    The bus calls :meth:`bind` once with its middleware, declares one actor per
    handler on the returned broker, then :meth:`start`, :meth:`enqueue` for each
    publish, and :meth:`stop`.
    """

    #: Short name used in logs and health results.
    name: str = "backend"
    #: True when the backend publishes whole events (:meth:`publish_events`, one record
    #: per event, e.g. Kafka) instead of one dramatiq message per handler (:meth:`enqueue`).
    publishes_events: bool = False

    @abc.abstractmethod
    def bind(self, middleware: list[Middleware]) -> dramatiq.Broker:
        """Create (once) and return the dramatiq broker, with ``middleware``."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect and begin delivering messages."""

    @abc.abstractmethod
    async def stop(self, timeout: float) -> None:
        """Finish in-flight work within ``timeout`` seconds, then release everything."""

    @abc.abstractmethod
    async def enqueue(self, messages: list[Message[Any]]) -> None:
        """Enqueue all of ``messages`` or none of them."""

    @abc.abstractmethod
    async def drain(self, timeout: float | None = None) -> None:
        """Return once every message enqueued so far has been handled or dead-lettered.

        Raises:
          TimeoutError: Messages are still pending after ``timeout`` seconds.
        """

    @abc.abstractmethod
    async def health(self) -> list[HealthResult]:
        """The backend's health, as one or more results."""

    def dead_letter_store(self, settings: EventBusSettings) -> DeadLetterStore | None:
        """The store this backend keeps dead letters in; None for the bus's in-memory one."""
        return None

    def replay(self, message: Message[Any]) -> None:
        """Enqueue a dead letter's message again (synchronously; may block).

        The default enqueues it on the bound broker, declaring its queue first.
        """
        broker = self.bind([])
        if message.queue_name not in broker.get_declared_queues():
            broker.declare_queue(message.queue_name)
        broker.enqueue(message)

    def backlog(self) -> dict[str, int]:
        """Messages waiting per queue, for the backlog gauge (may block briefly)."""
        return {}

    def actor_options(self, spec: HandlerSpec) -> dict[str, Any]:
        """Extra dramatiq actor options for ``spec`` (e.g. ``time_limit`` for a Worker)."""
        return {}

    async def publish_events(self, events: list[OutgoingEvent]) -> None:
        """Publish all of ``events`` (called instead of :meth:`enqueue` when
        :attr:`publishes_events` is true; handlers are then routed where the events
        are consumed, not where they are published)."""
        raise NotImplementedError(f"the {self.name} backend enqueues messages, not events")

    def set_router(
        self,
        route: Callable[[str], list[Actor[Any, Any]]],
        topics: Callable[[], list[str]],
    ) -> None:
        """Receive the bus's routing, once, right after :meth:`bind`.

        ``route(topic)`` returns the actors of the topic's handlers (declaring new
        ones); ``topics()`` the subscribed topics.  Backends that pull events
        themselves (Kafka) use them; the default ignores them.
        """
        return None


def handler_message(
    actor: Actor[Any, Any], envelope: dict[str, Any], options: dict[str, Any]
) -> Message[Any]:
    """The message that runs ``actor`` on an event's ``envelope`` (``options`` copied)."""
    return dramatiq.Message(
        queue_name=actor.queue_name,
        actor_name=actor.actor_name,
        args=(envelope,),
        kwargs={},
        options=dict(options),
        message_id=new_message_id(),
    )


class CachedHooksBroker(dramatiq.Broker):
    """A dramatiq Broker that emits each signal only to the middleware overriding it.

    Same contract as :meth:`dramatiq.Broker.emit_before` / ``emit_after`` (a
    ``MiddlewareError`` from a ``before_`` hook propagates, anything else is
    logged), without a ``getattr`` per middleware per signal: the hooks run several
    times per message on the hot path.  Mix it in before the concrete broker class.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._hook_cache: dict[str, list[Any]] = {}  # before Broker.__init__ adds middleware
        super().__init__(*args, **kwargs)

    def add_middleware(self, middleware: Middleware, **kwargs: Any) -> None:
        super().add_middleware(middleware, **kwargs)
        self._hook_cache.clear()

    def _hooks_for(self, signal: str) -> list[Any]:
        """The bound ``signal`` hooks of the middleware that override it, in order."""
        cache = self._hook_cache
        hooks = cache.get(signal)
        if hooks is None:
            base = getattr(Middleware, signal, None)
            hooks = [
                getattr(m, signal)
                for m in self.middleware
                if getattr(type(m), signal, None) is not base
            ]
            cache[signal] = hooks
        return hooks

    def emit_before(self, signal: str, *args: Any, **kwargs: Any) -> None:
        for hook in self._hooks_for("before_" + signal):
            try:
                hook(self, *args, **kwargs)
            except MiddlewareError:
                raise
            except Exception:
                self.logger.critical("Unexpected failure in before_%s.", signal, exc_info=True)

    def emit_after(self, signal: str, *args: Any, **kwargs: Any) -> None:
        for hook in reversed(self._hooks_for("after_" + signal)):
            try:
                hook(self, *args, **kwargs)
            except Exception:
                self.logger.critical("Unexpected failure in after_%s.", signal, exc_info=True)
