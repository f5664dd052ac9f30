"""Handlers run by Kafka worker processes in the tests.

``python -m eventbus.kafka tests.kafka_handlers`` with:

* ``KAFKA_TEST_TOPIC``: the topic to handle;
* ``KAFKA_TEST_OUT``: a file; each handled event appends ``<pid> <n>`` to it;
* ``KAFKA_TEST_DELAY``: seconds each event takes (default 0).
"""

from __future__ import annotations

import asyncio
import os

from eventbus import on_event

from .kafka_events import Numbered

TOPIC = os.environ.get("KAFKA_TEST_TOPIC", "tests.kafka.unused")
OUT = os.environ.get("KAFKA_TEST_OUT", os.devnull)
DELAY = float(os.environ.get("KAFKA_TEST_DELAY", "0"))

_fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


@on_event(TOPIC, name="tests.kafka.record")
async def record(event: Numbered) -> None:
    if DELAY:
        await asyncio.sleep(DELAY)
    n = event.n if isinstance(event, Numbered) else -1
    os.write(_fd, f"{os.getpid()} {n}\n".encode())
