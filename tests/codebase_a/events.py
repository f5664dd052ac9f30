"""Codebase A's copy of the shared event contract."""

from __future__ import annotations

import os

from eventbus import BaseEvent

#: The topic both codebases agree on (a test may set its own through the variable).
TOPIC = os.environ.get("CODEBASE_TOPIC", "codebase.order.placed")


class OrderPlaced(BaseEvent):
    topic: str = TOPIC
    order_id: int
    total_cents: int
