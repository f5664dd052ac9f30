"""Handlers for the dead-letter tests on Redis (tests/test_dlq_redis.py), run by real
``dramatiq eventbus.actors tests.dlq_handlers`` workers.

``poison`` fails until the test "fixes" it by setting the ``fixed`` key; ``sibling``
handles the same topic and always succeeds.  Both record their calls in Redis.
"""

from __future__ import annotations

import json

from eventbus import BaseEvent, on_event
from tests.redis_keys import client, key

POISON = "dlq.poison"


class Poison(BaseEvent):
    topic: str = POISON
    n: int = 0


@on_event(POISON, name="dlq.poison:poison")
def poison(event: BaseEvent) -> None:
    client().incr(key(f"attempts:{event.event_id}"))
    if not client().exists(key("fixed")):
        raise LookupError(f"ledger has no account for event {event.event_id}")
    client().rpush(
        key("handled"), json.dumps({"id": event.event_id, "extra": event.model_extra or {}})
    )


@on_event(POISON, name="dlq.poison:sibling")
def sibling(event: BaseEvent) -> None:
    client().incr(key(f"sibling:{event.event_id}"))
