"""One long-lived reader and writer of the DLQ topics, on its own thread.

A :class:`DeadLetterView` runs an event loop in a daemon thread with one
group-less consumer, assigned every partition of the DLQ topics it reads, that
keeps a :class:`~eventbus.kafka.dlq_fold.DeadLetterFold` up to date,
and one producer for markers.  The history is read once, when the view starts;
after that a read only *catches up*: it asks for the end offsets (one request,
plus one metadata request at most every :data:`DISCOVER_INTERVAL` seconds to
find new DLQ topics) and waits until the fold has applied everything before
them.  Records this process wrote itself are applied as soon as the broker
acknowledged them, so a replay of N dead letters costs O(N) requests.

Blocking callers (any thread but the view's) run coroutines on its loop with
:meth:`DeadLetterView.call`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from eventbus.dlq.records import FailedEvent
from eventbus.exceptions import BackendError
from eventbus.kafka.config import KafkaConfig
from eventbus.kafka.dlq_fold import HEADER_OP, DeadLetterFold, Entry, Op, marker_value

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

T = TypeVar("T")

#: Milliseconds one fetch of the view waits for records.
POLL_TIMEOUT_MS = 100
#: Milliseconds the broker may hold the view's fetch open (some brokers, Tansu
#: among them, answer a fetch only when this wait ends).
FETCH_MAX_WAIT_MS = 20
#: Seconds between two looks for new DLQ topics (reads within it see the topics
#: known at the last look, and every topic this process wrote to).
DISCOVER_INTERVAL = 1.0
#: Seconds closing the view's clients and thread may take.
CLOSE_TIMEOUT = 5.0
#: Seconds between attempts to read the DLQ topics after a failure.
RETRY_PAUSE = 1.0

logger = logging.getLogger(__name__)


class DeadLetterView:
    """The DLQ topics of a store, folded in memory and kept up to date.

    Parameters:
      config: Connection settings.
      wanted: ``wanted()``: the DLQ topics to read, or None for every topic whose
        name ends with ``suffix``.
      suffix: The DLQ topic suffix.
      idempotence: Whether the view's producer is idempotent.
      timeout: Seconds one :meth:`call` may take.
      new_topics: Awaited (on the view's loop) with DLQ topics the view starts
        reading, to check their configuration.
    """

    def __init__(
        self,
        config: KafkaConfig,
        wanted: Callable[[], set[str] | None],
        suffix: str,
        *,
        idempotence: bool,
        timeout: float,
        new_topics: Callable[[list[str]], Coroutine[Any, Any, None]],
    ) -> None:
        self.config = config
        self.wanted = wanted
        self.suffix = suffix
        self.idempotence = idempotence
        self.timeout = timeout
        self.new_topics = new_topics
        self.fold = DeadLetterFold()
        self._start_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Everything below lives on the view's loop.
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._poller: asyncio.Task[None] | None = None
        self._fetching: asyncio.Lock | None = None
        self._progress: asyncio.Event | None = None
        self._assigned: set[TopicPartition] = set()
        self._discovered_at = 0.0
        self._written_topics: set[str] = set()
        self._own: dict[TopicPartition, set[int]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the thread ---------------------------------------------------------------

    def call(self, factory: Callable[[], Awaitable[T]]) -> T:
        """Run ``factory()`` on the view's loop and return its result (blocking).

        Raises:
          BackendError: It failed, or took more than ``timeout`` seconds.
        """
        loop = self._start()
        if threading.current_thread() is self._thread:
            raise RuntimeError("DeadLetterView.call() from the view's own thread")

        async def bounded() -> T:
            async with asyncio.timeout(self.timeout):
                return await factory()

        future = asyncio.run_coroutine_threadsafe(bounded(), loop)
        try:
            return future.result()
        except BackendError:
            raise
        except TimeoutError:
            raise BackendError(
                f"Kafka dead-letter store: no answer within {self.timeout:g}s", backend="kafka"
            ) from None
        except Exception as exc:
            raise BackendError(f"Kafka dead-letter store: {exc!r}", backend="kafka") from exc

    def _start(self) -> asyncio.AbstractEventLoop:
        with self._start_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="eventbus-kafka-dlq", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def close(self) -> None:
        """Stop reading, close the clients and end the thread (a later call starts
        them again)."""
        with self._start_lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        with contextlib.suppress(Exception):
            future.result(CLOSE_TIMEOUT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(CLOSE_TIMEOUT)
        if not thread.is_alive():
            loop.close()

    async def _shutdown(self) -> None:
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await poller
        for task in list(self._tasks):
            task.cancel()
        consumer, self._consumer = self._consumer, None
        producer, self._producer = self._producer, None
        for client in (consumer, producer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()
        self._assigned = set()
        self._own.clear()
        self._discovered_at = 0.0
        self.fold = DeadLetterFold()  # a restarted view reads the history again

    # -- reading (on the view's loop) ------------------------------------------------

    async def _reader(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = self.config.consumer(
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            )
            await consumer.start()
            self._consumer = consumer
            self._fetching = asyncio.Lock()
            self._progress = asyncio.Event()
            self._poller = asyncio.get_running_loop().create_task(
                self._poll(consumer), name="eventbus-kafka-dlq-view"
            )
        return self._consumer

    async def _poll(self, consumer: AIOKafkaConsumer) -> None:
        assert self._fetching is not None and self._progress is not None
        while True:
            if not self._assigned:
                await asyncio.sleep(POLL_TIMEOUT_MS / 1000)
                continue
            try:
                async with self._fetching:
                    batch = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS)
            except Exception as exc:  # reads time out meanwhile; the view goes on
                logger.warning("Reading the DLQ topics failed (%r); retrying.", exc)
                await asyncio.sleep(RETRY_PAUSE)
                continue
            for tp, records in batch.items():  # each partition in offset order
                own = self._own.get(tp)
                for rec in records:
                    self.fold.apply(rec)
                    if own:
                        own.discard(rec.offset)
            self._progress.set()

    async def catch_up(self) -> DeadLetterFold:
        """Wait until the fold holds every record written to the DLQ topics before
        this call; returns it."""
        consumer = await self._reader()
        now = time.monotonic()
        topics = {tp.topic for tp in self._assigned}
        if now - self._discovered_at >= DISCOVER_INTERVAL or not self._written_topics <= topics:
            await self._discover(consumer)
        parts = list(self._assigned)
        if not parts:
            return self.fold
        ends: dict[TopicPartition, int] = await consumer.end_offsets(parts)
        progress = self._progress
        assert progress is not None
        while True:
            behind = False
            for tp in parts:
                position = await consumer.position(tp)
                end = ends[tp]
                own = self._own.get(tp, set())
                # Records this process wrote are applied already: no need to wait
                # for the fetch that brings them back.
                if position < end and not all(o in own for o in range(position, end)):
                    behind = True
                    break
            if not behind:
                return self.fold
            progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(progress.wait(), POLL_TIMEOUT_MS / 1000)

    async def _discover(self, consumer: AIOKafkaConsumer) -> None:
        from aiokafka import TopicPartition

        assert self._fetching is not None
        wanted = self.wanted()
        names = await consumer.topics()  # every topic: never auto-creates one
        dlq = {t for t in names if (t in wanted if wanted else t.endswith(self.suffix))}
        parts = {
            TopicPartition(topic, p)
            for topic in dlq
            for p in consumer.partitions_for_topic(topic) or ()
        }
        self._discovered_at = time.monotonic()
        if parts <= self._assigned:
            return
        async with self._fetching:
            added = parts - self._assigned
            if not added:
                return  # another read assigned them meanwhile
            kept = {tp: await consumer.position(tp) for tp in self._assigned}
            consumer.assign(sorted(self._assigned | parts))
            for tp, position in kept.items():
                consumer.seek(tp, position)  # assign() forgets every position
            self._assigned |= parts
        fresh = sorted({tp.topic for tp in added} - {tp.topic for tp in kept})
        if fresh:
            task = asyncio.get_running_loop().create_task(self.new_topics(fresh))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # -- writing (on the view's loop) ------------------------------------------------

    async def _writer(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = self.config.producer(acks="all", enable_idempotence=self.idempotence)
            await producer.start()
            self._producer = producer
        return self._producer

    async def send(
        self,
        topic: str,
        value: bytes,
        key: bytes | None,
        headers: list[tuple[str, bytes]],
        partition: int | None = None,
    ) -> Any:
        """Write one record and wait for the acknowledgement; returns its metadata."""
        producer = await self._writer()
        return await producer.send_and_wait(
            topic, value=value, key=key, headers=headers, partition=partition
        )

    async def add(self, record: FailedEvent, topic: str, value: bytes, headers: list[Any]) -> None:
        """Write a dead letter and fold it in at once."""
        meta = await self.send(topic, value, record.id.encode(), headers)
        self._wrote(meta)
        timestamp = meta.timestamp if meta.timestamp is not None and meta.timestamp >= 0 else -1
        if timestamp < 0:
            timestamp = int(time.time() * 1000)
        self.fold.put(Entry(record, meta.topic, meta.partition, meta.offset, timestamp))

    async def mark(self, entry: Entry, op: Op) -> None:
        """Write a marker next to ``entry``'s record (same partition) and apply it."""
        at = time.time()
        record_id = entry.record.id
        meta = await self.send(
            entry.topic,
            marker_value(record_id, op, at),
            record_id.encode(),
            [(HEADER_OP, op.encode())],
            partition=entry.partition,
        )
        self._wrote(meta)
        self.fold.mark(record_id, op, at)

    def _wrote(self, meta: Any) -> None:
        self._written_topics.add(meta.topic)
        if meta.topic_partition in self._assigned:
            self._own.setdefault(meta.topic_partition, set()).add(meta.offset)
