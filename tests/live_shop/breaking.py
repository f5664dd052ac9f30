"""The shop's ``OrderPlaced`` with ``total_cents`` renamed: billing requires it."""

from __future__ import annotations

from eventbus import BaseEvent

TOPIC = "live.order.placed"


class OrderPlaced(BaseEvent):
    topic: str = TOPIC
    order_id: int
    amount_cents: int
