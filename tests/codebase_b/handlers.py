"""Codebase B's handlers, run by worker processes (Redis or Kafka):

    dramatiq eventbus.actors tests.codebase_b.handlers

``CODEBASE_OUT``: a file; each handled event appends ``<order_id> <class module>``.
"""

from __future__ import annotations

import os

from eventbus import on_event
from tests.codebase_b.events import OrderPlaced

OUT = os.environ.get("CODEBASE_OUT", os.devnull)

_fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


@on_event(OrderPlaced, name="codebase_b.bill")
async def bill(event: OrderPlaced) -> None:
    os.write(_fd, f"{event.order_id} {type(event).__module__}\n".encode())
