"""Events and tables of the outbox tests (no handlers: importing this registers none).

``OUTBOX_TEST_TOPIC`` (default ``outbox.test``) is the default topic of
:class:`Placed`; worker processes get it from the test that starts them.
"""

from __future__ import annotations

import os

from sqlalchemy import BigInteger, Column, Identity, Integer, MetaData, Table, Text

from eventbus import BaseEvent

TOPIC = os.environ.get("OUTBOX_TEST_TOPIC", "outbox.test")

metadata = MetaData()
#: One row per delivery to ``record``, ``audit`` or ``apply`` (the id: handling order).
deliveries = Table(
    "outbox_test_deliveries",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("handler", Text, nullable=False),
    Column("event_id", Text, nullable=False),
    Column("key", Text, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("correlation_id", Text, nullable=False),
)
#: One row per effect of the idempotent handler: exactly one per event.
effects = Table(
    "outbox_test_effects",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("event_id", Text, nullable=False),
    Column("seq", Integer, nullable=False),
)


class Placed(BaseEvent):
    """An event of the outbox tests; events of one ``key`` must arrive in ``seq`` order."""

    __event_type__ = "tests.outbox.Placed"
    __partition_key__ = "key"
    topic: str = TOPIC
    key: str = "k"
    seq: int = 0
