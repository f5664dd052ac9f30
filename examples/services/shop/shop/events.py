"""The events shop publishes: the contract other services copy."""

from eventbus import BaseEvent


class OrderPlaced(BaseEvent):
    topic: str = "order.placed"
    order_id: int
    email: str
    total_cents: int
