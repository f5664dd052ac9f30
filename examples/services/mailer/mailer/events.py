"""Mailer's copy of shop's event: same topic, class name and fields."""

from eventbus import BaseEvent


class OrderPlaced(BaseEvent):
    topic: str = "order.placed"
    order_id: int
    email: str
    total_cents: int
