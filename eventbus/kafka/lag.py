"""Consumer-group lag per partition: the Kafka backend's ``eventbus_backlog``.

The lag of a partition is its end offset minus the offset the group committed
(records not yet handled, or handled and not yet committed); a partition the
group never committed counts from its first record.  One reading costs three
requests (metadata, end offsets, the group's offsets), made on the backend's
event loop through two long-lived clients; it is reused for
:data:`BACKLOG_TTL` seconds, so Prometheus scrapes cost nothing in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING

from eventbus.kafka.config import KafkaConfig

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer
    from aiokafka.admin import AIOKafkaAdminClient

#: Seconds a lag reading is reused before the next one is made.
BACKLOG_TTL = 5.0
#: Seconds a caller outside the event loop waits for a fresh reading.
BACKLOG_WAIT = 2.0


class LagReader:
    """Reads a consumer group's lag per partition of some topics.

    :meth:`read` is synchronous and callable from any thread (the Prometheus
    collector's): it never blocks the event loop.  On the loop's own thread it
    answers from the last reading at once and asks for a new one; elsewhere it
    waits up to :data:`BACKLOG_WAIT` seconds for a fresh reading when the last
    one is older than :data:`BACKLOG_TTL` seconds.

    Parameters:
      config: Connection settings.
      timeout: Seconds one reading may take.
    """

    def __init__(self, config: KafkaConfig, timeout: float = 5.0) -> None:
        self.config = config
        self.timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._lag: dict[str, int] = {}
        self._read_at: float | None = None
        self._pending: Future[dict[str, int]] | None = None
        self._lock = threading.Lock()
        self._closed = False

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Make readings on ``loop`` (the running backend's) from now on."""
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._closed = False

    async def close(self) -> None:
        """Stop making readings and close the clients (on the backend's loop)."""
        self._loop = None
        self._closed = True
        pending = self._pending
        if pending is not None:
            pending.cancel()
        consumer, self._consumer = self._consumer, None
        admin, self._admin = self._admin, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()
        if admin is not None:
            with contextlib.suppress(Exception):
                await admin.close()

    def read(self, group: str, topics: Callable[[], list[str]]) -> dict[str, int]:
        """Lag per ``"<topic>:<partition>"`` of ``group`` on the ``topics()`` (called
        on the loop); ``{}`` until the first reading, or when the backend is not
        running."""
        loop = self._loop
        if loop is None:
            return {}
        started = None
        with self._lock:
            fresh = self._read_at is not None and time.monotonic() - self._read_at < BACKLOG_TTL
            pending = self._pending
            if not fresh and pending is None:
                pending = started = self._pending = asyncio.run_coroutine_threadsafe(
                    self._refresh(group, topics), loop
                )
        if started is not None:
            started.add_done_callback(self._done)  # outside the lock: may run at once
        if not fresh and pending is not None and threading.get_ident() != self._loop_thread:
            with contextlib.suppress(FutureTimeout, Exception):
                pending.result(BACKLOG_WAIT)
        return dict(self._lag)

    def _done(self, future: Future[dict[str, int]]) -> None:
        with self._lock:
            self._pending = None
            if not future.cancelled() and future.exception() is None:
                self._lag = future.result()
                self._read_at = time.monotonic()

    async def _refresh(self, group: str, subscribed: Callable[[], list[str]]) -> dict[str, int]:
        from aiokafka import TopicPartition

        topics = subscribed()
        if not topics:
            return {}
        async with asyncio.timeout(self.timeout):
            consumer = await self._open_consumer()
            existing = set(await consumer.topics())  # metadata of all: never auto-creates
            partitions = [
                TopicPartition(topic, p)
                for topic in sorted(topics)
                if topic in existing
                for p in sorted(consumer.partitions_for_topic(topic) or ())
            ]
            if not partitions:
                return {}
            ends = await consumer.end_offsets(partitions)
            admin = await self._open_admin()
            committed = await admin.list_consumer_group_offsets(group, partitions=partitions)
            bases = {tp: meta.offset for tp, meta in committed.items() if meta.offset >= 0}
            never = [tp for tp in partitions if tp not in bases]
            if never:
                bases.update(await consumer.beginning_offsets(never))
            return {
                f"{tp.topic}:{tp.partition}": max(0, ends[tp] - bases.get(tp, 0))
                for tp in partitions
            }

    async def _open_consumer(self) -> AIOKafkaConsumer:
        if self._closed:
            raise RuntimeError("the lag reader is closed")
        if self._consumer is None:
            consumer = self.config.consumer(group_id=None, enable_auto_commit=False)
            await consumer.start()
            self._consumer = consumer
        return self._consumer

    async def _open_admin(self) -> AIOKafkaAdminClient:
        if self._closed:
            raise RuntimeError("the lag reader is closed")
        if self._admin is None:
            admin = self.config.admin(request_timeout_ms=int(self.timeout * 1000))
            await admin.start()
            self._admin = admin
        return self._admin
