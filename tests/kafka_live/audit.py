"""An untyped handler of the topic (it stores no schema: it takes any payload).

``KAFKA_LIVE_OUT``: a file; each handled event appends ``audit <order_id>``.
"""

from __future__ import annotations

import os

from eventbus import BaseEvent, on_event
from tests.kafka_live.events import TOPIC

OUT = os.environ.get("KAFKA_LIVE_OUT", os.devnull)

_fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


@on_event(TOPIC, name="kafka_live.audit")
async def audit(event: BaseEvent) -> None:
    os.write(_fd, f"audit {event.model_dump().get('order_id')}\n".encode())
