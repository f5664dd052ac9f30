"""Event classes shared by the Kafka tests and their worker processes (no pytest here)."""

from __future__ import annotations

from eventbus import BaseEvent


class Numbered(BaseEvent):
    """The n-th event of a test stream; ``key`` is its partition key."""

    __event_type__ = "tests.kafka.Numbered"
    __partition_key__ = "key"

    n: int = 0
    key: str = "k"
