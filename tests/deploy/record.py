"""Where deployment handlers record what they did (the test's Redis namespace)."""

from __future__ import annotations

from tests.deploy.events import OrderPlaced
from tests.redis_keys import client, key


def record(handler: str, event: OrderPlaced) -> None:
    """Note that ``handler`` ran on ``event``."""
    with client().pipeline(transaction=False) as pipe:
        pipe.sadd(key(f"{handler}:seen"), event.n)
        pipe.incr(key(f"{handler}:runs"))
        pipe.execute()
