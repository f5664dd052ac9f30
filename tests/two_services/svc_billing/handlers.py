"""The billing codebase's handler, run by ``dramatiq eventbus.actors svc_billing.handlers``
with ``PYTHONPATH=tests/two_services`` (it never imports the other codebase).

Its actor name is the same in both codebases (copies of one template): only the
service tells their subscriptions and dead letters apart.  It fails while the file
``FAIL_FILE`` exists; each run appends ``billing <order_id>`` to ``HANDLED_OUT``.
"""

from __future__ import annotations

import os
from pathlib import Path

from eventbus import on_event
from svc_billing.events import OrderPlaced

FAIL_FILE = Path(os.environ["FAIL_FILE"])
OUT = os.environ["HANDLED_OUT"]


@on_event(OrderPlaced, name="orders.handle", max_retries=0)
def handle(event: OrderPlaced) -> None:
    if FAIL_FILE.exists():
        raise ConnectionError(f"billing cannot handle order {event.order_id} now")
    with open(OUT, "a") as out:
        out.write(f"billing {event.order_id}\n")
