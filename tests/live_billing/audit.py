"""The audit service's untyped handler, run by a worker process of its own:

    dramatiq eventbus.actors tests.live_billing.audit

It imports no event class, so every payload of the topic reaches it as a
``BaseEvent`` with its fields (a process that registered a class under the
event's type name would validate into that class instead).  It stores no schema.
``LIVE_OUT``: a file; each handled event appends ``audit <order_id>``.
"""

from __future__ import annotations

import os

from eventbus import BaseEvent, on_event

OUT = os.environ.get("LIVE_OUT", os.devnull)

_fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


@on_event("live.order.placed", name="live_billing.audit")
async def audit(event: BaseEvent) -> None:
    os.write(_fd, f"audit {event.model_dump().get('order_id')}\n".encode())
