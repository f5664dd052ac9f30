"""Another service on the same Redis, subscribed to the same topic (run it with
EVENTBUS_SERVICE=shipping).  Its handler's default name differs from the orders
handlers'; a handler named like one of theirs would still be its own subscription."""

from __future__ import annotations

from eventbus import on_event
from tests.deploy.events import OrderPlaced
from tests.deploy.record import record


@on_event(OrderPlaced)
async def ship(event: OrderPlaced) -> None:
    record("ship", event)


@on_event(OrderPlaced, name="orders.email")  # same name as the orders service's handler
def email(event: OrderPlaced) -> None:
    record("shipping-email", event)
