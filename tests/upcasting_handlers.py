"""Handlers for tests/test_upcasting.py, run by real ``dramatiq eventbus.actors
tests.upcasting_handlers`` workers.

``UPCAST_ORDER_VERSION`` picks the deploy: ``1`` (the old code: ``OrderPlaced`` with
``amount`` in euros, and a handler that fails) or ``2`` (the new code: version 2 of
the class, ``amount_cents``, an upcaster from version 1, a handler that books the
order under ``booked``).  Both deploys run the same handler name.
"""

from __future__ import annotations

import json
import os
from typing import Any

from eventbus import BaseEvent, on_event
from eventbus.upcasting import upcaster
from tests.redis_keys import client, key

TOPIC = "upcast.orders"
HANDLER = f"{TOPIC}:book"
TYPE = f"{TOPIC}:OrderPlaced"
VERSION = int(os.environ.get("UPCAST_ORDER_VERSION", "1"))

if VERSION == 1:

    class OrderPlaced(BaseEvent):
        topic: str = TOPIC
        order_id: int
        amount: float  # euros

    @on_event(OrderPlaced, name=HANDLER)
    def book(event: OrderPlaced) -> None:
        raise LookupError(f"ledger has no account for order {event.order_id}")

else:

    class OrderPlaced(BaseEvent):  # type: ignore[no-redef]
        __event_version__ = 2
        topic: str = TOPIC
        order_id: int
        amount_cents: int

    @upcaster(OrderPlaced, from_version=1)
    def euros_to_cents(fields: dict[str, Any]) -> dict[str, Any]:
        fields["amount_cents"] = round(fields.pop("amount") * 100)
        return fields

    @on_event(OrderPlaced, name=HANDLER)
    def book(event: OrderPlaced) -> None:
        client().rpush(
            key("booked"),
            json.dumps(
                {
                    "event_id": event.event_id,
                    "order_id": event.order_id,
                    "amount_cents": event.amount_cents,
                    "version": event.event_version,
                }
            ),
        )
