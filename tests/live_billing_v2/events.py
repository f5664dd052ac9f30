"""Billing's ``OrderPlaced``, version 2, deployed without an upcaster from version 1."""

from __future__ import annotations

from eventbus import BaseEvent

TOPIC = "live.order.placed"


class OrderPlaced(BaseEvent):
    __event_version__ = 2
    topic: str = TOPIC
    order_id: int
    amount_cents: int  # version 1 had "total_cents"
