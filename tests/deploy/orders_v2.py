"""Version 2 of the orders service: adds the ``audit`` handler."""

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


@on_event(OrderPlaced, name="orders.audit")
def audit(event: OrderPlaced) -> None:
    record("audit", event)
