"""The shop's ``OrderPlaced`` with ``total_cents`` renamed: billing requires it."""

from __future__ import annotations

import os

from eventbus import BaseEvent

TOPIC = os.environ.get("KAFKA_LIVE_TOPIC", "kafka.live.order.placed")


class OrderPlaced(BaseEvent):
    __event_type__ = "kafka_live.OrderPlaced"  # the same whatever the test's topic
    topic: str = TOPIC
    amount_cents: int
    order_id: int
