"""Billing's handler of ``OrderPlaced`` version 2 (``total_cents`` became
``amount_cents``) with the upcaster from version 1, run by a worker process:

    python -m eventbus.kafka tests.kafka_live.upcasted

``KAFKA_LIVE_OUT``: a file; each handled event appends ``bill <order_id> <amount_cents>``.
"""

from __future__ import annotations

import os
from typing import Any

from eventbus import BaseEvent, on_event
from eventbus.upcasting import upcaster

TOPIC = os.environ.get("KAFKA_LIVE_TOPIC", "kafka.live.order.placed")
OUT = os.environ.get("KAFKA_LIVE_OUT", os.devnull)

_fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


class OrderPlaced(BaseEvent):
    __event_type__ = "kafka_live.OrderPlaced"  # the same whatever the test's topic
    __event_version__ = 2
    topic: str = TOPIC
    order_id: int
    amount_cents: int  # version 1 had "total_cents"


@upcaster(OrderPlaced, from_version=1)
def total_renamed(fields: dict[str, Any]) -> dict[str, Any]:
    fields["amount_cents"] = fields.pop("total_cents")
    return fields


@on_event(OrderPlaced, name="kafka_live.bill")
async def bill(event: OrderPlaced) -> None:
    os.write(_fd, f"bill {event.order_id} {event.amount_cents}\n".encode())
