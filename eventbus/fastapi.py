"""FastAPI integration: lifespan helpers and the ``get_event_bus`` dependency."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

from starlette.requests import HTTPConnection

if TYPE_CHECKING:
    from .bus import EventBus


def create_lifespan(bus: EventBus) -> Callable[[Any], AbstractAsyncContextManager[None]]:
    """A FastAPI ``lifespan`` that starts ``bus`` with the app and stops it after.

    Example::

        bus = EventBus()
        app = FastAPI(lifespan=create_lifespan(bus))
    """

    def lifespan(app: Any) -> AbstractAsyncContextManager[None]:
        return eventbus_lifespan(bus, app)

    return lifespan


@asynccontextmanager
async def eventbus_lifespan(bus: EventBus, app: Any) -> AsyncIterator[None]:
    """Start ``bus`` for the duration of the block; compose it into your own lifespan.

    Example::

        @asynccontextmanager
        async def lifespan(app):
            async with eventbus_lifespan(bus, app):
                yield
    """
    app.state.event_bus = bus
    await bus.start()
    try:
        yield
    finally:
        await bus.stop()


def get_event_bus(conn: HTTPConnection) -> EventBus:
    """FastAPI dependency returning the app's bus: ``bus: EventBus = Depends(get_event_bus)``.

    Raises:
      RuntimeError: The app was not given ``create_lifespan(bus)`` or
        ``eventbus_lifespan``.
    """
    bus: EventBus | None = getattr(conn.app.state, "event_bus", None)
    if bus is None:
        raise RuntimeError(
            "no EventBus on app.state: create the app with FastAPI(lifespan=create_lifespan(bus)) "
            "or use eventbus_lifespan(bus, app) in your lifespan"
        )
    return bus
