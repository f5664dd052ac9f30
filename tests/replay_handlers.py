"""Handlers for the console replay tests (tests/test_console_replay.py), run by real
``dramatiq eventbus.actors tests.replay_handlers`` workers.

One handler of topic ``replay.orders``, named by ``REPLAY_HANDLER_NAME`` (default
``replay.orders:old_name``): a deploy that renames it runs the same module with
``REPLAY_HANDLER_NAME=replay.orders:new_name``.  It fails while the ``broken`` key
exists and records the event ids it handled under ``handled:<its name>``.
"""

from __future__ import annotations

import os

from eventbus import BaseEvent, on_event
from tests.redis_keys import client, key

TOPIC = "replay.orders"
OLD_NAME = f"{TOPIC}:old_name"
NEW_NAME = f"{TOPIC}:new_name"
NAME = os.environ.get("REPLAY_HANDLER_NAME", OLD_NAME)


class ReplayOrder(BaseEvent):
    topic: str = TOPIC
    n: int = 0


@on_event(TOPIC, name=NAME)
def book(event: BaseEvent) -> None:
    if client().exists(key("broken")):
        raise LookupError(f"ledger has no account for order {event.model_extra}")
    client().rpush(key(f"handled:{NAME}"), event.event_id)
