"""Billing's handlers, run by a worker process:

    dramatiq eventbus.actors tests.live_billing.handlers

``LIVE_OUT``: a file; each handled event appends ``<handler> <order_id>``.
"""

from __future__ import annotations

import os

from eventbus import on_event
from tests.live_billing.events import OrderPlaced

OUT = os.environ.get("LIVE_OUT", os.devnull)

_fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


@on_event(OrderPlaced, name="live_billing.bill")
async def bill(event: OrderPlaced) -> None:
    os.write(_fd, f"bill {event.order_id}\n".encode())
