"""Billing's handler of version 2 with its upcaster, run by a worker process:

    dramatiq eventbus.actors tests.live_billing_v2.handlers

``LIVE_OUT``: a file; each handled event appends ``bill <order_id> <amount_cents>``.
"""

from __future__ import annotations

import os

from eventbus import on_event
from tests.live_billing_v2.upcasted import OrderPlaced

OUT = os.environ.get("LIVE_OUT", os.devnull)

_fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


@on_event(OrderPlaced, name="live_billing_v2.bill")
async def bill(event: OrderPlaced) -> None:
    os.write(_fd, f"bill {event.order_id} {event.amount_cents}\n".encode())
