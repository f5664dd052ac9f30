"""Billing's copy of the shared event contract."""

from __future__ import annotations

from eventbus import BaseEvent

#: The topic both services agree on (each test has its own Redis namespace).
TOPIC = "live.order.placed"


class OrderPlaced(BaseEvent):
    topic: str = TOPIC
    order_id: int
    total_cents: int
