"""The billing codebase's copy of the event (same topic, class name and fields)."""

from __future__ import annotations

from eventbus import BaseEvent


class OrderPlaced(BaseEvent):
    topic: str = "two.orders"
    order_id: int
