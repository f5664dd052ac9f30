"""Version 1 of the orders service: two handlers.  Explicit names keep each
handler's subscription the same across versions, as one module edited in place
would."""

from __future__ import annotations

from eventbus import on_event
from tests.deploy.events import OrderPlaced
from tests.deploy.record import record


@on_event(OrderPlaced, name="orders.email")
def email(event: OrderPlaced) -> None:
    record("email", event)


@on_event(OrderPlaced, name="orders.invoice")
async def invoice(event: OrderPlaced) -> None:
    record("invoice", event)
