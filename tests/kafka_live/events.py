"""Billing's copy of the shared event contract."""

from __future__ import annotations

import os

from eventbus import BaseEvent

#: The topic both services agree on (one per test).
TOPIC = os.environ.get("KAFKA_LIVE_TOPIC", "kafka.live.order.placed")


class OrderPlaced(BaseEvent):
    __event_type__ = "kafka_live.OrderPlaced"  # the same whatever the test's topic
    topic: str = TOPIC
    order_id: int
    total_cents: int
