"""What the bus needs of a backend."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import dramatiq
    from dramatiq import Message, Middleware

    from ..config import EventBusSettings
    from ..dlq import DeadLetterStore
    from ..health import HealthResult
    from ..registry import HandlerSpec


class Backend(abc.ABC):
    """Moves dramatiq messages from ``publish`` to the handlers' actors.

    The bus calls :meth:`bind` once with its middleware, declares one actor per
    handler on the returned broker, then :meth:`start`, :meth:`enqueue` for each
    publish, and :meth:`stop`.
    """

    #: Short name used in logs and health results.
    name: str = "backend"

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

    def actor_options(self, spec: HandlerSpec) -> dict[str, Any]:
        """Extra dramatiq actor options for ``spec`` (e.g. ``time_limit`` for a Worker)."""
        return {}
