"""What the bus needs of a backend."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import dramatiq
    from dramatiq import Message, Middleware

    from ..health import HealthResult


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
