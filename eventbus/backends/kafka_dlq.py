"""Dead letters kept in Kafka: one DLQ topic per event topic, ``<topic><suffix>``.

Each dead letter is a record whose value is :meth:`FailedEvent.to_dict` as JSON
and whose key is the record id; its headers repeat the failure (error type,
error, handler, attempts, original partition and offset) so tools that only see
headers can still tell why it is there.

Kafka cannot delete single records, so removing, claiming and releasing are
records too: a value-less record with the same key and an ``eventbus-dlq-op``
header.  Readers replay each DLQ topic from its earliest offset and fold those
markers in; a claim older than ``claim_timeout`` seconds is void, so a record
claimed by a replay that died comes back by itself.  Two replays claiming the
same record at the same instant can both win (Kafka offers no compare-and-set):
the event is then delivered twice, which at-least-once handlers tolerate.

Example::

    store = KafkaDeadLetterStore(KafkaConfig("localhost:9092"))
    for failed in store.find(20, topic="order.paid"):
        print(failed.id, failed.error_type, failed.error)
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ..config import DEFAULT_DLQ_TOPIC_SUFFIX, DEFAULT_KAFKA_IDEMPOTENCE
from ..dlq import DEFAULT_PEEK_LIMIT, FailedEvent, newest
from ..exceptions import BackendError, ShutdownError
from .kafka_config import KafkaConfig

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Header naming a marker's operation: ``remove``, ``claim`` or ``release``.
HEADER_OP = "eventbus-dlq-op"
#: Headers repeating the failure on every dead-letter record.
HEADER_ERROR_TYPE = "eventbus-error-type"
HEADER_ERROR = "eventbus-error"
HEADER_HANDLER = "eventbus-handler"
HEADER_ATTEMPTS = "eventbus-attempts"
HEADER_ORIGINAL_TOPIC = "eventbus-original-topic"
HEADER_ORIGINAL_PARTITION = "eventbus-original-partition"
HEADER_ORIGINAL_OFFSET = "eventbus-original-offset"
#: Longest error message copied into a header, in characters (the value has it all).
MAX_HEADER_ERROR = 1_000
#: Seconds a claim hides a record from other replays.
DEFAULT_CLAIM_TIMEOUT = 60.0
#: Seconds a blocking read or marker write may take before BackendError.
DEFAULT_OPERATION_TIMEOUT = 15.0
#: First and last pause, in seconds, between attempts to write a dead letter.
WRITE_BACKOFF_MIN = 0.1
WRITE_BACKOFF_MAX = 5.0

_OPS = ("remove", "claim", "release")


@dataclass(frozen=True, slots=True)
class WriteFailure:
    """A dead letter the store keeps failing to write.

    Attributes:
      record_id: The dead letter's id.
      topic: Its DLQ topic.
      since: ``time.monotonic()`` of the first failed attempt.
      attempts: Failed attempts so far.
      error: The last attempt's error.
    """

    record_id: str
    topic: str
    since: float
    attempts: int
    error: str


def dead_letter_headers(record: FailedEvent) -> list[tuple[str, bytes]]:
    """The headers of ``record``'s DLQ record."""
    headers = [
        (HEADER_ERROR_TYPE, record.error_type.encode()),
        (HEADER_ERROR, record.error[:MAX_HEADER_ERROR].encode()),
        (HEADER_HANDLER, record.handler.encode()),
        (HEADER_ATTEMPTS, str(record.attempts).encode()),
        (HEADER_ORIGINAL_TOPIC, record.topic.encode()),
    ]
    if record.partition is not None:
        headers.append((HEADER_ORIGINAL_PARTITION, str(record.partition).encode()))
    if record.offset is not None:
        headers.append((HEADER_ORIGINAL_OFFSET, str(record.offset).encode()))
    return headers


class KafkaDeadLetterStore:
    """A :class:`~eventbus.dlq.DeadLetterStore` over DLQ topics ``<topic><topic_suffix>``.

    Inside a running :class:`~eventbus.backends.kafka.KafkaBackend`, :meth:`add`
    hands the record to the backend's producer without blocking the event loop and
    keeps retrying until the broker acknowledges it; the bridge commits the failed
    event's offset only after that (:meth:`take_write`).  Everything else (and
    ``add`` outside a running backend) opens its own short-lived clients and
    blocks: call it from a thread, or use the ``bus.dlq.a*`` methods.

    Parameters:
      config: Connection settings (TLS/SASL included).
      topic_suffix: Appended to an event's topic to name its DLQ topic.
      claim_timeout: Seconds a claim by a replay hides a record.
      operation_timeout: Seconds a blocking read or write may take.
      topics: ``topics()`` names the event topics whose DLQ topics are read (the
        Kafka backend passes its bus's subscribed topics); None, or an empty list:
        every topic ending with ``topic_suffix``.
      idempotence: Whether the store's own producer is idempotent (see
        :class:`~eventbus.backends.kafka.KafkaBackend`).
      skip_shutdown_errors: Drop records of handlers cancelled by shutdown
        (``ShutdownError``): the Kafka backend leaves their offset uncommitted, so
        the event is delivered again instead.
    """

    #: Calls do network I/O: async wrappers run them in a thread.
    blocking = True

    def __init__(
        self,
        config: KafkaConfig,
        topic_suffix: str = DEFAULT_DLQ_TOPIC_SUFFIX,
        *,
        claim_timeout: float = DEFAULT_CLAIM_TIMEOUT,
        operation_timeout: float = DEFAULT_OPERATION_TIMEOUT,
        topics: Callable[[], list[str]] | None = None,
        skip_shutdown_errors: bool = False,
        idempotence: bool = DEFAULT_KAFKA_IDEMPOTENCE,
    ) -> None:
        self.config = config
        self.topic_suffix = topic_suffix
        self.claim_timeout = claim_timeout
        self.operation_timeout = operation_timeout
        self.skip_shutdown_errors = skip_shutdown_errors
        self.idempotence = idempotence
        self.topics = topics
        self._producer: AIOKafkaProducer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._writes: dict[str, asyncio.Task[None]] = {}
        self._failing: dict[str, WriteFailure] = {}
        self._closing = False

    def dlq_topic(self, topic: str) -> str:
        """The DLQ topic of events of ``topic``."""
        return f"{topic}{self.topic_suffix}"

    # -- writing from the backend's loop ---------------------------------------------

    def attach(self, producer: AIOKafkaProducer, loop: asyncio.AbstractEventLoop) -> None:
        """Write through ``producer`` on ``loop`` (the running backend's), from now on."""
        self._producer = producer
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._closing = False

    async def detach(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for pending writes, then stop using the producer."""
        pending = [t for t in self._writes.values() if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        self._closing = True
        for task in pending:
            task.cancel()
        self._producer = None
        self._loop = None
        self._loop_thread = None

    def add(self, record: FailedEvent) -> None:
        """Write ``record`` to its DLQ topic (asynchronously inside a running backend)."""
        if self.skip_shutdown_errors and record.error_type == ShutdownError.__name__:
            logger.info(
                "Not dead-lettering %s (%s): its offset stays uncommitted, so it is "
                "delivered again.",
                record.id,
                record.error,
            )
            return
        if self._producer is not None and threading.get_ident() == self._loop_thread:
            assert self._loop is not None
            task = self._loop.create_task(self.write(record), name=f"eventbus-dlq-{record.id}")
            self._writes[record.id] = task
            task.add_done_callback(lambda _: self._writes.pop(record.id, None))
            task.add_done_callback(_consume_result)
            return
        self._blocking(lambda producer: self._send(producer, record))

    def take_write(self, record_id: str) -> asyncio.Task[None] | None:
        """The pending write of the record ``record_id`` added on the loop, if any."""
        return self._writes.get(record_id)

    async def write(self, record: FailedEvent) -> None:
        """Write ``record`` through the attached producer, retrying until acknowledged.

        Raises:
          BackendError: The store was detached (the backend stopped) before the
            broker acknowledged the record.
        """
        delay = WRITE_BACKOFF_MIN
        try:
            while True:
                producer = self._producer
                if producer is None or self._closing:
                    raise BackendError(
                        f"dead letter {record.id} not written: the backend stopped",
                        backend="kafka",
                    )
                try:
                    await asyncio.wait_for(self._send(producer, record), self.operation_timeout)
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    failure = self._failing.get(record.id)
                    self._failing[record.id] = WriteFailure(
                        record_id=record.id,
                        topic=self.dlq_topic(record.topic),
                        since=failure.since if failure is not None else time.monotonic(),
                        attempts=failure.attempts + 1 if failure is not None else 1,
                        error=f"{type(exc).__name__}: {exc}",
                    )
                    logger.error(
                        "Could not write dead letter %s to %s (%s); retrying in %.1fs.",
                        record.id,
                        self.dlq_topic(record.topic),
                        exc,
                        delay,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, WRITE_BACKOFF_MAX)
        finally:
            self._failing.pop(record.id, None)

    def failing_writes(self) -> list[WriteFailure]:
        """Dead letters whose write failed at least once and is still being retried
        (their partitions cannot commit past them), oldest first."""
        return sorted(self._failing.values(), key=lambda failure: failure.since)

    async def _send(self, producer: AIOKafkaProducer, record: FailedEvent) -> None:
        value = json.dumps(record.to_dict(), separators=(",", ":"), default=str).encode()
        await producer.send_and_wait(
            self.dlq_topic(record.topic),
            value=value,
            key=record.id.encode(),
            headers=dead_letter_headers(record),
        )

    # -- blocking operations -------------------------------------------------------

    def _blocking(self, operation: Callable[[AIOKafkaProducer], Awaitable[T]]) -> T:
        async def run() -> T:
            producer = self.config.producer(acks="all", enable_idempotence=self.idempotence)
            await producer.start()
            try:
                return await operation(producer)
            finally:
                await producer.stop()

        return self._run(run)

    def _run(self, factory: Callable[[], Awaitable[T]]) -> T:
        # A private loop in a private thread: callable from any thread, even one
        # running an event loop (which it then blocks for the call's duration).
        result: list[T] = []
        error: list[BaseException] = []

        async def bounded() -> T:
            return await asyncio.wait_for(factory(), self.operation_timeout)

        def target() -> None:
            try:
                result.append(asyncio.run(bounded()))
            except BaseException as exc:
                error.append(exc)

        thread = threading.Thread(target=target, name="eventbus-kafka-dlq", daemon=True)
        thread.start()
        thread.join()
        if error:
            exc = error[0]
            if isinstance(exc, BackendError):
                raise exc
            raise BackendError(f"Kafka dead-letter store: {exc!r}", backend="kafka") from exc
        return result[0]

    async def _read(self) -> list[tuple[FailedEvent, float | None]]:
        """Every live record (with its claim time, if claimed), oldest first."""
        consumer = self.config.consumer(
            group_id=None, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            from aiokafka import TopicPartition

            wanted = {self.dlq_topic(t) for t in self.topics()} if self.topics else set()
            topics = [
                t
                for t in await consumer.topics()
                if (t in wanted if wanted else t.endswith(self.topic_suffix))
            ]
            partitions = [
                TopicPartition(topic, p)
                for topic in topics
                for p in sorted(consumer.partitions_for_topic(topic) or ())
            ]
            if not partitions:
                return []
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            ends: dict[Any, int] = await consumer.end_offsets(partitions)
            waiting = {tp for tp, end in ends.items() if end > 0}
            raw: list[Any] = []
            while waiting:
                for records in (await consumer.getmany(*waiting, timeout_ms=200)).values():
                    raw.extend(records)
                for tp in list(waiting):
                    if await consumer.position(tp) >= ends[tp]:
                        waiting.discard(tp)
        finally:
            await consumer.stop()
        return self._fold(sorted(raw, key=lambda r: (r.timestamp, r.topic, r.partition, r.offset)))

    def _fold(self, raw: list[Any]) -> list[tuple[FailedEvent, float | None]]:
        live: OrderedDict[str, tuple[FailedEvent, float | None]] = OrderedDict()
        for rec in raw:
            key = rec.key.decode("utf-8", "replace") if rec.key else ""
            headers = {k: v for k, v in rec.headers or ()}
            op = headers.get(HEADER_OP, b"").decode()
            if op == "remove":
                live.pop(key, None)
            elif op == "claim":
                if key in live:
                    live[key] = (live[key][0], rec.timestamp / 1000)
            elif op == "release":
                if key in live:
                    live[key] = (live[key][0], None)
            elif rec.value is not None:
                try:
                    failed = FailedEvent.from_dict(json.loads(rec.value))
                except (ValueError, KeyError, TypeError) as exc:
                    logger.warning(
                        "Skipping unreadable dead letter %s-%d@%d: %s",
                        rec.topic,
                        rec.partition,
                        rec.offset,
                        exc,
                    )
                    continue
                live.pop(failed.id, None)
                live[failed.id] = (failed, None)
        return list(live.values())

    def _visible(self) -> list[FailedEvent]:
        now = time.time()
        return [
            failed
            for failed, claimed in self._run(self._read)
            if claimed is None or now - claimed > self.claim_timeout
        ]

    async def _mark(self, producer: AIOKafkaProducer, record: FailedEvent, op: str) -> None:
        assert op in _OPS
        await producer.send_and_wait(
            self.dlq_topic(record.topic),
            value=None,
            key=record.id.encode(),
            headers=[(HEADER_OP, op.encode())],
        )

    def find(
        self,
        limit: int | None = DEFAULT_PEEK_LIMIT,
        *,
        topic: str | None = None,
        handler: str | None = None,
        error_type: str | None = None,
    ) -> list[FailedEvent]:
        """Matching records, newest last; at most ``limit`` (the newest), None for all."""
        return newest([r for r in self._visible() if r.matches(topic, handler, error_type)], limit)

    def peek(self, limit: int = DEFAULT_PEEK_LIMIT) -> list[FailedEvent]:
        """The ``limit`` newest records, oldest first."""
        return self.find(limit)

    def get(self, record_id: str) -> FailedEvent | None:
        """The record ``record_id``, or None (also while a replay holds it)."""
        for record in self._visible():
            if record.id == record_id:
                return record
        return None

    def remove(self, record_id: str) -> FailedEvent | None:
        """Remove and return the record ``record_id``."""
        record = self.get(record_id)
        if record is not None:
            self._blocking(lambda producer: self._mark(producer, record, "remove"))
        return record

    def size(self) -> int:
        """How many records there are."""
        return len(self._visible())

    def clear(self) -> None:
        """Remove every record."""
        records = self._visible()

        async def remove_all(producer: AIOKafkaProducer) -> None:
            for record in records:
                await self._mark(producer, record, "remove")

        if records:
            self._blocking(remove_all)

    def claim(self, record_id: str) -> FailedEvent | None:
        """Hide the record from other replays for ``claim_timeout`` seconds and return it."""
        record = self.get(record_id)
        if record is not None:
            self._blocking(lambda producer: self._mark(producer, record, "claim"))
        return record

    def release(self, record: FailedEvent) -> None:
        """Make a claimed record visible again (its replay failed)."""
        self._blocking(lambda producer: self._mark(producer, record, "release"))

    def complete(self, record_id: str) -> None:
        """Delete a claimed record whose replay was enqueued."""
        found = [failed for failed, _ in self._run(self._read) if failed.id == record_id]
        if found:
            self._blocking(lambda producer: self._mark(producer, found[0], "remove"))


def _consume_result(task: asyncio.Task[None]) -> None:
    # The bridge awaits writes it depends on; this only silences "never retrieved".
    if not task.cancelled():
        task.exception()
