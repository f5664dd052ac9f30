"""A typed handler for tests/test_validation_errors.py, run by real
``dramatiq eventbus.actors tests.validation_handlers`` workers: it records the
orders it got under ``shipped`` (a payload that does not validate never reaches it)."""

from __future__ import annotations

from pydantic import BaseModel

from eventbus import BaseEvent, on_event
from tests.redis_keys import client, key

TOPIC = "validation.orders"
HANDLER = f"{TOPIC}:ship"


class Line(BaseModel):
    sku: str
    qty: int


class ShipOrder(BaseEvent):
    topic: str = TOPIC
    order_id: int
    lines: list[Line]
    api_token: int = 0


@on_event(ShipOrder, name=HANDLER)
def ship(event: ShipOrder) -> None:
    client().rpush(key("shipped"), event.event_id)
