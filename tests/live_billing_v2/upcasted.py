"""Billing's ``OrderPlaced``, version 2, with the upcaster from version 1."""

from __future__ import annotations

from typing import Any

from eventbus import BaseEvent
from eventbus.upcasting import upcaster

TOPIC = "live.order.placed"


class OrderPlaced(BaseEvent):
    __event_version__ = 2
    topic: str = TOPIC
    order_id: int
    amount_cents: int  # version 1 had "total_cents"


@upcaster(OrderPlaced, from_version=1)
def total_renamed(fields: dict[str, Any]) -> dict[str, Any]:
    fields["amount_cents"] = fields.pop("total_cents")
    return fields
