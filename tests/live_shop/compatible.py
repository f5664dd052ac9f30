"""The shop's ``OrderPlaced`` with a new optional field: billing still accepts it."""

from __future__ import annotations

from eventbus import BaseEvent

TOPIC = "live.order.placed"


class OrderPlaced(BaseEvent):
    topic: str = TOPIC
    order_id: int
    total_cents: int
    note: str | None = None
