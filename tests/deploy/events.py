"""The event classes: all a publishing service imports."""

from __future__ import annotations

from eventbus import BaseEvent

#: The topic both services subscribe to.
ORDERS = "deploy.orders"


class OrderPlaced(BaseEvent):
    topic: str = ORDERS
    n: int
