"""Billing's typed handler, run by a worker process:

    python -m eventbus.kafka tests.kafka_live.handlers

``KAFKA_LIVE_OUT``: a file; each handled event appends ``bill <order_id>``.
"""

from __future__ import annotations

import os

from eventbus import on_event
from tests.kafka_live.events import OrderPlaced

OUT = os.environ.get("KAFKA_LIVE_OUT", os.devnull)

_fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


@on_event(OrderPlaced, name="kafka_live.bill")
async def bill(event: OrderPlaced) -> None:
    os.write(_fd, f"bill {event.order_id}\n".encode())
