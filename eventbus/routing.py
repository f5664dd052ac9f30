"""Where a bus's handlers meet a broker: subscribed topics and one actor per handler.

A bus owns a :class:`Subscriptions` (its handler registry plus the topics it
subscribed).  The backend owns a :class:`Router`, which declares one dramatiq
actor per subscribed handler on the backend's broker and answers "which actors
handle this topic" wherever the subscriptions live: in the publishing process
(embedded), in a worker (Redis) or in a consumer-group member (Kafka).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dramatiq
from dramatiq import Actor

import eventbus.keys as keys
from eventbus.config import DEFAULT_QUEUE, DEFAULT_SERVICE
from eventbus.registry import HandlerRegistry, HandlerSpec, validate_topic


class Subscriptions:
    """A bus's handlers and the topics it has subscribed.

    At :meth:`EventBus.start` every topic with a handler is subscribed; a handler
    registered on a running bus receives events once its topic is subscribed
    (``await bus.subscribe(topic)``).

    Parameters:
      registry: The bus's handler registry.
    """

    def __init__(self, registry: HandlerRegistry, default_queue: str = DEFAULT_QUEUE) -> None:
        self.registry = registry
        #: The dramatiq queue of handlers that name none.
        self.default_queue = default_queue
        #: The service these subscriptions belong to (set when the bus starts).
        self.service = DEFAULT_SERVICE
        self._topics: dict[str, None] = {}
        self._version = 0

    @property
    def version(self) -> tuple[int, int, int]:
        """Changes whenever the subscribed handlers may have changed."""
        return (*self.registry.version, self._version)

    def subscribe(self, topic: str) -> None:
        """Dispatch ``topic`` to its handlers from now on."""
        validate_topic(topic)
        if topic not in self._topics:
            self._topics[topic] = None
            self._version += 1

    def unsubscribe(self, topic: str) -> None:
        """Stop dispatching ``topic``."""
        if self._topics.pop(topic, 0) is None:
            self._version += 1

    def subscribe_all(self) -> None:
        """Subscribe every topic that has a handler now."""
        for topic in self.registry.topics:
            self.subscribe(topic)

    @property
    def topics(self) -> list[str]:
        """The subscribed topics."""
        return list(self._topics)

    def queue_of(self, spec: HandlerSpec) -> str:
        """The dramatiq queue of ``spec``'s actor."""
        return spec.queue or self.default_queue

    def handlers(self) -> list[HandlerSpec]:
        """The handlers of the subscribed topics."""
        topics = self._topics
        return [spec for spec in self.registry.all_handlers() if spec.topic in topics]


class Router:
    """Declares one actor per subscribed handler on ``broker`` and routes topics to them.

    Actors of handlers that left the registry are removed (messages still queued
    for them are dead-lettered with ``ActorNotFound`` by the embedded backend);
    those of unsubscribed topics stay, so messages already enqueued for them are
    still handled.

    Parameters:
      subscriptions: The bus's subscriptions.
      broker: The broker the actors are declared on.
      queue_name: The dramatiq queue of a handler's actor.
      actor_options: Extra dramatiq actor options of a handler's actor.
    """

    def __init__(
        self,
        subscriptions: Subscriptions,
        broker: dramatiq.Broker,
        queue_name: Callable[[HandlerSpec], str],
        actor_options: Callable[[HandlerSpec], dict[str, Any]] | None = None,
    ) -> None:
        self.subscriptions = subscriptions
        self.broker = broker
        self.queue_name = queue_name
        self.actor_options = actor_options or (lambda spec: {})
        self._routes: dict[str, list[Actor[Any, Any]]] = {}
        self._version: tuple[int, int, int] | None = None

    def _rebuild(self) -> None:
        broker = self.broker
        registered = {spec.name: spec for spec in self.subscriptions.registry.all_handlers()}
        for name, existing in list(broker.actors.items()):
            if keys.HANDLER in existing.options and existing.options[keys.HANDLER] is not (
                registered.get(name)
            ):
                del broker.actors[name]
        routes: dict[str, list[Actor[Any, Any]]] = {}
        for spec in self.subscriptions.handlers():
            actor: Actor[Any, Any] | None = broker.actors.get(spec.name)
            if actor is None:
                actor = Actor(
                    spec.run_async if spec.is_async else spec.run_sync,
                    broker=broker,
                    actor_name=spec.name,
                    queue_name=self.queue_name(spec),
                    priority=0,
                    options={keys.HANDLER: spec, **self.actor_options(spec)},
                )
            routes.setdefault(spec.topic, []).append(actor)
        self._routes = routes
        self._version = self.subscriptions.version

    def declare(self) -> list[Actor[Any, Any]]:
        """Declare the actor of every subscribed handler now; returns them."""
        if self._version != self.subscriptions.version:
            self._rebuild()
        return [actor for actors in self._routes.values() for actor in actors]

    def actors(self, topic: str) -> list[Actor[Any, Any]]:
        """The actors of ``topic``'s subscribed handlers (declared on first use)."""
        if self._version != self.subscriptions.version:
            self._rebuild()
        return self._routes.get(topic, [])

    def topics(self) -> list[str]:
        """The subscribed topics that have at least one handler."""
        if self._version != self.subscriptions.version:
            self._rebuild()
        return list(self._routes)

    def actor(self, name: str) -> Actor[Any, Any] | None:
        """The declared actor of the handler named ``name``, if it is still registered."""
        if self._version != self.subscriptions.version:
            self._rebuild()
        return self.broker.actors.get(name)
