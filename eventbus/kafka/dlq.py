"""Dead letters kept in Kafka: one DLQ topic per event topic, ``<topic><suffix>``.

Each dead letter is a record whose value is :meth:`FailedEvent.to_dict` as JSON
and whose key is the record id; its headers repeat the failure (error type,
error, handler, attempts, original partition and offset) so tools that only see
headers can still tell why it is there.  A dead letter larger than
``max_record_bytes`` is cut to fit (its traceback and error first, then its
payload, kept as size, sha256 and the reason; see
:mod:`~eventbus.kafka.dlq_record`): a record too large for the broker
would never be written, and its partition would never commit past it.

Kafka cannot delete single records, so removing, claiming and releasing are
records too: *markers*, with the same key, in the same partition, an
``eventbus-dlq-op`` header and a small JSON value (never null: a null value is a
tombstone to compaction).  Each process folds the DLQ topics once into memory
(:mod:`~eventbus.kafka.dlq_view`), in offset order per partition,
and keeps the fold up to date; reads catch up with the end of the topics and
never reread the history.  A claim older than ``claim_timeout`` seconds (by
the marker's timestamp) is void, so a record claimed by a replay that died comes
back by itself.  Two replays claiming the same record at the same instant can
both win (Kafka offers no compare-and-set): the event is then delivered twice,
which at-least-once handlers tolerate.

**The DLQ topics must keep their records.**  Create them before the first dead
letter (brokers otherwise create them with their defaults) with::

    cleanup.policy=delete  retention.ms=-1  retention.bytes=-1

A compacted topic keeps only the newest record per key, which for a claimed or
released dead letter is its marker: the dead letter is gone.  A finite
``retention.ms`` or ``retention.bytes`` deletes dead letters that nobody
replayed, silently.  The store checks the configuration of each DLQ topic once
per process (when the backend starts, when it first writes to one, when it
starts reading one) and logs a WARNING naming the topic and the setting
(:mod:`~eventbus.kafka.dlq_topics`).

Example::

    store = KafkaDeadLetterStore(KafkaConfig("localhost:9092"))
    for failed in store.find(20, topic="order.paid"):
        print(failed.id, failed.error_type, failed.error)
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from eventbus.config import DEFAULT_DLQ_TOPIC_SUFFIX, DEFAULT_KAFKA_IDEMPOTENCE
from eventbus.dlq.audit_log import AuditLog
from eventbus.dlq.records import FailedEvent, newest
from eventbus.dlq.store import DEFAULT_PEEK_LIMIT
from eventbus.exceptions import BackendError, ConfigurationError, ShutdownError
from eventbus.kafka.audit import KafkaAuditLog
from eventbus.kafka.config import KafkaConfig
from eventbus.kafka.dlq_fold import HEADER_OP as HEADER_OP  # re-exported: tools read it
from eventbus.kafka.dlq_fold import DeadLetterFold
from eventbus.kafka.dlq_record import (
    DEFAULT_MAX_RECORD_BYTES,
    DROP_HINT,
    DROP_HINT_LOWERED,
    MIN_RECORD_BYTES,
    Fitted,
    fit_dead_letter,
    too_large,
)
from eventbus.kafka.dlq_record import (
    HEADER_ATTEMPTS as HEADER_ATTEMPTS,  # re-exported: tools read them
)
from eventbus.kafka.dlq_record import HEADER_CUT as HEADER_CUT
from eventbus.kafka.dlq_record import HEADER_ERROR as HEADER_ERROR
from eventbus.kafka.dlq_record import HEADER_ERROR_TYPE as HEADER_ERROR_TYPE
from eventbus.kafka.dlq_record import HEADER_HANDLER as HEADER_HANDLER
from eventbus.kafka.dlq_record import HEADER_ORIGINAL_OFFSET as HEADER_ORIGINAL_OFFSET
from eventbus.kafka.dlq_record import HEADER_ORIGINAL_PARTITION as HEADER_ORIGINAL_PARTITION
from eventbus.kafka.dlq_record import HEADER_ORIGINAL_TOPIC as HEADER_ORIGINAL_TOPIC
from eventbus.kafka.dlq_record import HEADER_PAYLOAD_DROPPED as HEADER_PAYLOAD_DROPPED
from eventbus.kafka.dlq_record import dead_letter_headers as dead_letter_headers
from eventbus.kafka.dlq_record import dead_letter_value as dead_letter_value
from eventbus.kafka.dlq_topics import TopicCheck
from eventbus.kafka.dlq_view import DeadLetterView

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer

logger = logging.getLogger(__name__)

#: Seconds a claim hides a record from other replays.
DEFAULT_CLAIM_TIMEOUT = 60.0
#: Seconds a blocking read or marker write may take before BackendError.
DEFAULT_OPERATION_TIMEOUT = 15.0
#: First and last pause, in seconds, between attempts to write a dead letter.
WRITE_BACKOFF_MIN = 0.1
WRITE_BACKOFF_MAX = 5.0


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


class KafkaDeadLetterStore:
    """A :class:`~eventbus.dlq.store.DeadLetterStore` over DLQ topics ``<topic><topic_suffix>``.

    Inside a running :class:`~eventbus.kafka.backend.KafkaBackend`, :meth:`add`
    hands the record to the backend's producer without blocking the event loop and
    keeps retrying until the broker acknowledges it; the bridge commits the failed
    event's offset only after that (:meth:`take_write`).  Everything else (and
    ``add`` outside a running backend) runs on the store's view (one thread, one
    consumer and one producer per store, started on first use, see
    :mod:`~eventbus.kafka.dlq_view`) and blocks: call it from a thread,
    or use the ``bus.dlq.a*`` methods.  :meth:`close` ends the view.

    Parameters:
      config: Connection settings (TLS/SASL included).
      topic_suffix: Appended to an event's topic to name its DLQ topic.
      claim_timeout: Seconds a claim by a replay hides a record.
      operation_timeout: Seconds a blocking read or write may take.
      topics: ``topics()`` names the event topics whose DLQ topics are read (the
        Kafka backend passes its bus's subscribed topics); None, or an empty list:
        every topic ending with ``topic_suffix``.
      idempotence: Whether the store's own producer is idempotent (see
        :class:`~eventbus.kafka.backend.KafkaBackend`).
      skip_shutdown_errors: Drop records of handlers cancelled by shutdown
        (``ShutdownError``): the Kafka backend leaves their offset uncommitted, so
        the event is delivered again instead.
      max_record_bytes: Largest DLQ record written, in bytes (the producers'
        ``max_request_size``); larger dead letters are cut to fit.  When the broker
        refuses a record as too large all the same (a smaller ``message.max.bytes``
        or ``max.message.bytes``), the store halves its limit for that topic, down
        to :data:`~eventbus.kafka.dlq_record.MIN_RECORD_BYTES`, and
        writes the record again, cut further.
      audit: The console's audit trail of actions on these dead letters (the
        :class:`~eventbus.dlq.audit_log.AuditedStore` protocol); default: a
        :class:`~eventbus.kafka.audit.KafkaAuditLog` on
        :data:`~eventbus.kafka.audit.DEFAULT_AUDIT_TOPIC`.
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
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        audit: AuditLog | None = None,
    ) -> None:
        if max_record_bytes < MIN_RECORD_BYTES:
            raise ConfigurationError(
                f"max_record_bytes={max_record_bytes}: a dead-letter record needs room for "
                f"its ids, error and attempt log; use at least {MIN_RECORD_BYTES} bytes"
            )
        self.config = config
        self.topic_suffix = topic_suffix
        self.claim_timeout = claim_timeout
        self.operation_timeout = operation_timeout
        self.skip_shutdown_errors = skip_shutdown_errors
        self.idempotence = idempotence
        self.topics = topics
        self.max_record_bytes = max_record_bytes
        #: The audit trail of the console's actions on these dead letters.
        self.audit: AuditLog = audit if audit is not None else KafkaAuditLog(config)
        self._limits: dict[str, int] = {}  # DLQ topic -> limit learned from the broker
        self._producer: AIOKafkaProducer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._writes: dict[str, asyncio.Task[None]] = {}
        self._failing: dict[str, WriteFailure] = {}
        self.topic_check = TopicCheck(config, operation_timeout)
        self._closing = False
        self._view = DeadLetterView(
            config,
            self._wanted,
            topic_suffix,
            idempotence=idempotence,
            timeout=operation_timeout,
            new_topics=self.topic_check.check,
        )

    def dlq_topic(self, topic: str) -> str:
        """The DLQ topic of events of ``topic``."""
        return f"{topic}{self.topic_suffix}"

    def _wanted(self) -> set[str] | None:
        names = self.topics() if self.topics is not None else []
        return {self.dlq_topic(t) for t in names} if names else None

    @property
    def records_read(self) -> int:
        """DLQ records this process has read since its view started (each once)."""
        return self._view.fold.records_read

    def close(self) -> None:
        """End the view: its thread, consumer and producer (a later call starts it
        again, reading the history once more)."""
        self._view.close()

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
        self.topic_check.cancel()
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
        topic = self.dlq_topic(record.topic)
        self._view.call(lambda: self._add_fitted(record, topic))

    async def _add_fitted(self, record: FailedEvent, topic: str) -> None:
        while True:
            fitted = self._fit(record, topic)
            try:
                await self._view.add(fitted.record, topic, fitted.value, fitted.headers)
                return
            except Exception as exc:
                if not (too_large(exc) and self._shrink(topic, fitted, exc)):
                    raise

    def take_write(self, record_id: str) -> asyncio.Task[None] | None:
        """The pending write of the record ``record_id`` added on the loop, if any."""
        return self._writes.get(record_id)

    async def write(self, record: FailedEvent) -> None:
        """Write ``record`` through the attached producer, retrying until acknowledged.

        Raises:
          BackendError: The store was detached (the backend stopped) before the
            broker acknowledged the record.
        """
        topic = self.dlq_topic(record.topic)
        delay = WRITE_BACKOFF_MIN
        try:
            while True:
                producer = self._producer
                if producer is None or self._closing:
                    raise BackendError(
                        f"dead letter {record.id} not written: the backend stopped",
                        backend="kafka",
                    )
                fitted = self._fit(record, topic)
                try:
                    send = producer.send_and_wait(
                        topic, value=fitted.value, key=record.id.encode(), headers=fitted.headers
                    )
                    await asyncio.wait_for(send, self.operation_timeout)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if too_large(exc) and self._shrink(topic, fitted, exc):
                        continue  # at once, cut to the smaller limit
                    # Anything else (the broker away, a timeout) may pass: retry as is.
                    self._failed(record.id, topic, exc)
                    logger.error(
                        "Could not write dead letter %s to %s (%s); retrying in %.1fs.",
                        record.id,
                        topic,
                        exc,
                        delay,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, WRITE_BACKOFF_MAX)
        finally:
            self._failing.pop(record.id, None)
        self.topic_check.check_soon([topic])

    def limit(self, topic: str) -> int:
        """The size limit of dead-letter records written to the DLQ topic ``topic``,
        in bytes: ``max_record_bytes``, or less once the broker refused a record."""
        return self._limits.get(topic, self.max_record_bytes)

    def _fit(self, record: FailedEvent, topic: str) -> Fitted:
        limit = self.limit(topic)
        hint = DROP_HINT_LOWERED if topic in self._limits else DROP_HINT
        fitted = fit_dead_letter(record, limit, hint)
        if fitted.cut:
            logger.warning(
                "Dead letter %s of handler %s is over the %d-byte record limit of %s: "
                "%s cut to fit%s.",
                record.id,
                record.handler,
                limit,
                topic,
                ", ".join(fitted.cut),
                f" ({fitted.dropped})" if fitted.dropped else "",
            )
        return fitted

    def _shrink(self, topic: str, fitted: Fitted, exc: Exception) -> bool:
        """Lower the record limit of ``topic`` after the producer or the broker
        refused ``fitted`` as too large; False when it is at its floor already."""
        limit = self.limit(topic)
        smaller = max(MIN_RECORD_BYTES, min(limit, fitted.size) // 2)
        if smaller >= limit:
            logger.error(
                "Dead letter %s (%d bytes) refused as too large by %s (%s), even cut to "
                "%d bytes: raise the topic's max.message.bytes (or the broker's "
                "message.max.bytes) to at least %d; retrying meanwhile.",
                fitted.record.id,
                fitted.size,
                topic,
                exc,
                limit,
                self.max_record_bytes,
            )
            return False
        self._limits[topic] = smaller
        logger.warning(
            "Dead letter %s (%d bytes) refused as too large by %s (%s): dead letters "
            "to it are cut to %d bytes from now on.",
            fitted.record.id,
            fitted.size,
            topic,
            exc,
            smaller,
        )
        return True

    def _failed(self, record_id: str, topic: str, exc: Exception) -> None:
        failure = self._failing.get(record_id)
        self._failing[record_id] = WriteFailure(
            record_id=record_id,
            topic=topic,
            since=failure.since if failure is not None else time.monotonic(),
            attempts=failure.attempts + 1 if failure is not None else 1,
            error=f"{type(exc).__name__}: {exc}",
        )

    def failing_writes(self) -> list[WriteFailure]:
        """Dead letters whose write failed at least once and is still being retried
        (their partitions cannot commit past them), oldest first."""
        return sorted(self._failing.values(), key=lambda failure: failure.since)

    # -- reading and markers (blocking, on the view) -----------------------------------

    def _visible(self, fold: DeadLetterFold) -> list[FailedEvent]:
        return fold.visible(time.time(), self.claim_timeout)

    def find(
        self,
        limit: int | None = DEFAULT_PEEK_LIMIT,
        *,
        topic: str | None = None,
        handler: str | None = None,
        error_type: str | None = None,
    ) -> list[FailedEvent]:
        """Matching records, newest last; at most ``limit`` (the newest), None for all."""

        async def run() -> list[FailedEvent]:
            records = self._visible(await self._view.catch_up())
            return newest([r for r in records if r.matches(topic, handler, error_type)], limit)

        return self._view.call(run)

    def peek(self, limit: int = DEFAULT_PEEK_LIMIT) -> list[FailedEvent]:
        """The ``limit`` newest records, oldest first."""
        return self.find(limit)

    def get(self, record_id: str) -> FailedEvent | None:
        """The record ``record_id``, or None (also while a replay holds it)."""

        async def run() -> FailedEvent | None:
            entry = (await self._view.catch_up()).entry(record_id)
            if entry is None or not entry.visible(time.time(), self.claim_timeout):
                return None
            return entry.record

        return self._view.call(run)

    def get_many(self, ids: list[str]) -> list[FailedEvent | None]:
        """:meth:`get` of each of ``ids``, after one catch-up (dry runs read thousands)."""

        async def run() -> list[FailedEvent | None]:
            fold = await self._view.catch_up()
            now = time.time()
            found: list[FailedEvent | None] = []
            for record_id in ids:
                entry = fold.entry(record_id)
                visible = entry is not None and entry.visible(now, self.claim_timeout)
                found.append(entry.record if visible and entry is not None else None)
            return found

        return self._view.call(run)

    def size(self) -> int:
        """How many records there are."""

        async def run() -> int:
            return (await self._view.catch_up()).count(time.time(), self.claim_timeout)

        return self._view.call(run)

    def _marked(self, record_id: str, op: Any, *, visible_only: bool) -> FailedEvent | None:
        async def run() -> FailedEvent | None:
            entry = (await self._view.catch_up()).entry(record_id)
            if entry is None:
                return None
            if visible_only and not entry.visible(time.time(), self.claim_timeout):
                return None
            await self._view.mark(entry, op)
            return entry.record

        return self._view.call(run)

    def remove(self, record_id: str) -> FailedEvent | None:
        """Remove and return the record ``record_id``."""
        return self._marked(record_id, "remove", visible_only=True)

    def clear(self) -> None:
        """Remove every record."""

        async def run() -> None:
            fold = await self._view.catch_up()
            now = time.time()
            entries = [e for e in fold.entries() if e.visible(now, self.claim_timeout)]
            await asyncio.gather(*(self._view.mark(e, "remove") for e in entries))

        self._view.call(run)

    def claim(self, record_id: str) -> FailedEvent | None:
        """Hide the record from other replays for ``claim_timeout`` seconds and return it."""
        return self._marked(record_id, "claim", visible_only=True)

    def release(self, record: FailedEvent) -> None:
        """Make a claimed record visible again (its replay failed)."""
        self._marked(record.id, "release", visible_only=False)

    def complete(self, record_id: str) -> None:
        """Delete a claimed record whose replay was enqueued."""
        self._marked(record_id, "remove", visible_only=False)

    def send(self, topic: str, value: bytes, key: bytes | None, headers: list[Any]) -> None:
        """Write one record to ``topic`` through the view's producer (blocking):
        the Kafka backend replays dead letters with it."""
        self._view.call(lambda: self._view.send(topic, value, key, headers))


def _consume_result(task: asyncio.Task[None]) -> None:
    # The bridge awaits writes it depends on; this only silences "never retrieved".
    if not task.cancelled():
        task.exception()
