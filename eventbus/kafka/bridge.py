"""The Kafka bridge: one consumer per worker process, feeding the handlers' actors.

Records of the subscribed topics are decoded and turned into one dramatiq message
per handler on the process's :class:`~eventbus.backends.embedded.EmbeddedBroker`, so
the whole middleware chain (retries with backoff, dead letters, time limits,
metrics, tracing) runs as in the other backends.

**Offsets and budget** are kept by a
:class:`~eventbus.kafka.partitions.PartitionLedger` (pure bookkeeping;
its module states the rules and invariants); this module does the I/O it
decides.  A record is *finished* once every handler message made from it
succeeded or was dead-lettered (the dead letter acknowledged by the broker); a
partition commits one past its longest finished prefix, so a slow or retrying
record holds back the commit of every later record of its partition, never the
other way round.  Offsets are committed after a fetch when something finished
and :data:`COMMIT_INTERVAL` seconds passed since the last commit, on revoke, and
at shutdown; never automatically.

At most ``max_in_flight`` records are dispatched and not yet committable, shared
by the partitions that have had records within :data:`PAUSE_AFTER` seconds.  A
partition alone uses the whole budget; one that is busy when others get records
fetches no more until it is back under its share.  A full partition is simply
not fetched (records fetched past its share wait in the bridge, one fetch at
most).  One that is full and has committed nothing for :data:`PAUSE_AFTER`
seconds (a stuck handler, an ordered key waiting, a dead letter that cannot be
written) is *paused alone*: its records stop counting against the budget, the
other partitions share all of it, and it resumes once it is under its share
again.  So a stuck partition holds at most what it took, and the others wait for
it at most :data:`PAUSE_AFTER` seconds (when it took the whole budget while they
were idle), never longer.

**Rebalances.**  When partitions are revoked, the bridge stops dispatching their
records, waits up to ``revoke_timeout`` seconds for their in-flight handlers,
commits what finished, then lets them go.  Messages of a released partition that
have not started yet (queued, waiting for a retry, or behind an ordered key) are
skipped: the partition's new owner receives those records again.  Handlers
still running past the bound finish, but their record is not committed here,
so it is delivered again elsewhere (at least once, never lost).

**Ordered handlers.**  For a handler declared ``ordered=True``, messages of
records with the same key wait for each other: the next starts once the
previous succeeded or was dead-lettered, retries included.

**Poison records** (no value, not JSON, nested too deeply, not an envelope,
invalid fields, an event type this process does not know unless
``accept_unknown_types`` or every handler of the topic declares its own event
class (each validates the fields into its class, as on every backend), or
anything else that raises while the record is decoded) go to the DLQ topic with
the reason and count as finished: they never stall their partition and never
restart the consumer.  A poison value that nests more than
:data:`~eventbus.events.MAX_DEPTH` levels is kept as text.

**Errors.**  When the consumer fails, the bridge drops its in-flight state (those
records are delivered again), closes the consumer and reconnects with an
exponential backoff; health reports it unhealthy meanwhile.

One concept past ~500 lines: the consumer loop, the rebalance callbacks and the
completion of handler messages act on one shared state (the ledger, the
deliveries, the ordered-key chains) from one task, and splitting them would
spread its invariants over modules; the pure rules are
:mod:`eventbus.kafka.partitions` and the decoding of records
:mod:`eventbus.kafka.records`.
"""

from __future__ import annotations

from eventbus.extras import requires_extra

with requires_extra("kafka", __name__):
    from aiokafka import ConsumerRebalanceListener
    from aiokafka.errors import IllegalStateError

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from dramatiq import Actor, Message, Middleware
from dramatiq.middleware import SkipMessage

import eventbus.keys as keys
from eventbus.backends.base import handler_message
from eventbus.events import BaseEvent, UnknownEvent
from eventbus.exceptions import ShutdownError
from eventbus.kafka.config import (
    HEADER_REPLAY_HANDLER,
    HEADER_REPLAY_OF,
    HEADER_REPLAY_SERVICE,
    KafkaConfig,
)
from eventbus.kafka.partitions import (
    COMMIT_INTERVAL,
    PAUSE_AFTER,
    Dispatched,
    Partition,
    PartitionLedger,
)
from eventbus.kafka.records import (
    POISON_HANDLER,
    Poison,
    dead_letter_id,
    decode_record,
    poison_dead_letter,
    record_options,
    refused_replay,
)
from eventbus.middleware.dead_letters import DEAD_LETTER_ID
from eventbus.middleware.retries import unrecorded

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
    from dramatiq import Broker
    from dramatiq.broker import MessageProxy

    from eventbus.backends.embedded import EmbeddedBroker
    from eventbus.dlq.records import FailedEvent
    from eventbus.kafka.dlq import KafkaDeadLetterStore

logger = logging.getLogger(__name__)

#: Milliseconds one fetch waits for records.
POLL_TIMEOUT_MS = 200
#: Milliseconds the broker may hold a fetch request open waiting for records.
FETCH_MAX_WAIT_MS = 20
#: Seconds between checks for newly subscribed topics while none is subscribed.
IDLE_INTERVAL = 0.2
#: First and last pause, in seconds, before reconnecting a failed consumer.
RECONNECT_BACKOFF_MIN = 0.5
RECONNECT_BACKOFF_MAX = 30.0
#: Seconds closing a consumer may take.
CLOSE_TIMEOUT = 5.0


#: The bookkeeping of one partition, and of one record handed to the handlers.
_Partition: TypeAlias = "Partition[TopicPartition, ConsumerRecord]"
_Record: TypeAlias = "Dispatched[TopicPartition, ConsumerRecord]"


@dataclass(eq=False)
class _Delivery:
    record: _Record
    #: The id of the handler's dead letter, should it fail (its pending write's key).
    dead_letter: str
    chain: tuple[str, bytes] | None = None


class BridgeMiddleware(Middleware):
    """Tells the bridge when a handler message is finished, and skips stale ones.

    It must be the *first* middleware of the broker: its ``before_process_message``
    then runs first (a message of a released partition is skipped before any span
    starts) and its ``after_*`` hooks last (after Retries decided and DeadLetters
    wrote).
    """

    def __init__(self) -> None:
        self.bridge: KafkaBridge | None = None

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        bridge = self.bridge
        if bridge is not None and bridge.is_stale(message.message_id):
            raise SkipMessage("its partition was released")

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        bridge = self.bridge
        if bridge is None or unrecorded(message):
            # Unrecorded: neither its retry nor its dead letter is written; the
            # dispatcher runs it again, and its record stays uncommitted meanwhile.
            return
        if exception is None:
            bridge.finished(message.message_id, failed=False)
        elif isinstance(exception, ShutdownError):
            bridge.abandoned(message.message_id)  # redelivered, not committed
        elif message.failed:
            bridge.finished(message.message_id, failed=True)

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        if self.bridge is not None:
            self.bridge.finished(message.message_id, failed=False)


class KafkaBridge:
    """Consumes the subscribed topics in one consumer group and runs their handlers.

    Parameters:
      config: Connection settings.
      group_id: The consumer group (one per service).
      broker: The embedded broker whose actors run the handlers.
      middleware: The broker's :class:`BridgeMiddleware`.
      route: ``route(topic)``: the actors of the topic's handlers.
      topics: ``topics()``: the subscribed topics.
      dead_letters: Where poison records go (their topic plus the DLQ suffix).
      auto_offset_reset: Where a group without committed offsets starts.
      session_timeout_ms, heartbeat_interval_ms: Group membership timing.
      max_in_flight: Records dispatched and not yet committable, shared by the
        partitions that have records in flight (see the module docstring).
      revoke_timeout: Seconds revoked partitions' handlers get to finish.
      accept_unknown_types: Deliver events of types this process does not know as
        :class:`~eventbus.events.UnknownEvent` instead of dead-lettering them.
      fetch_max_wait_ms: Longest time the broker may hold a fetch while waiting for
        records (bounds publish-to-handler latency on brokers that answer a fetch
        only when the wait ends).
      service: The service these workers belong to (default: ``group_id``): named
        in dead-letter ids (``<topic>:<partition>:<offset>:<service>:<handler>``);
        a replayed record naming another service is left to that service.
    """

    def __init__(
        self,
        config: KafkaConfig,
        group_id: str,
        broker: EmbeddedBroker,
        middleware: BridgeMiddleware,
        route: Callable[[str], list[Actor[Any, Any]]],
        topics: Callable[[], list[str]],
        dead_letters: KafkaDeadLetterStore,
        *,
        auto_offset_reset: str = "earliest",
        session_timeout_ms: int = 10_000,
        heartbeat_interval_ms: int = 3_000,
        max_in_flight: int = 1_000,
        revoke_timeout: float = 5.0,
        accept_unknown_types: bool = False,
        fetch_max_wait_ms: int = FETCH_MAX_WAIT_MS,
        service: str | None = None,
    ) -> None:
        self.config = config
        self.group_id = group_id
        self.service = service or group_id
        self.broker = broker
        self.middleware = middleware
        self.route = route
        self.topics = topics
        self.dead_letters = dead_letters
        self.auto_offset_reset = auto_offset_reset
        self.session_timeout_ms = session_timeout_ms
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.max_in_flight = max_in_flight
        #: The budget and offsets of the partitions owned (PAUSE_AFTER read now, so
        #: a test can shorten it).
        self.ledger: PartitionLedger[TopicPartition, ConsumerRecord] = PartitionLedger(
            max_in_flight, pause_after=PAUSE_AFTER, commit_interval=COMMIT_INTERVAL
        )
        self.revoke_timeout = revoke_timeout
        self.accept_unknown_types = accept_unknown_types
        self.fetch_max_wait_ms = fetch_max_wait_ms

        self.consumer: AIOKafkaConsumer | None = None
        #: Monotonic time of the last completed fetch (0: none yet).
        self.last_poll = 0.0
        #: The last consumer error, while reconnecting; None when consuming.
        self.error: str | None = None
        self.reconnects = 0
        self._deliveries: dict[str, _Delivery] = {}
        self._chains: dict[tuple[str, bytes], deque[Message[Any]]] = {}
        self._progress = asyncio.Event()  # a record finished
        self._room = asyncio.Event()  # a full partition can be fetched again
        self._stopping = False
        self._consuming = asyncio.Event()
        self._consuming.set()  # set whenever the fetch loop is not running
        self._task: asyncio.Task[None] | None = None
        middleware.bridge = self

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Start consuming in a background task (it waits for subscribed topics)."""
        self._task = asyncio.get_running_loop().create_task(
            self._supervise(), name="eventbus-kafka-bridge"
        )

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The consumer task; done means dead."""
        return self._task

    @property
    def assignment(self) -> list[TopicPartition]:
        """The partitions this process owns now."""
        return self.ledger.keys

    @property
    def in_flight(self) -> int:
        """Records dispatched whose offset is not committable yet."""
        return self.ledger.in_flight

    @property
    def paused(self) -> list[TopicPartition]:
        """The partitions paused because they stayed full (see the budget above)."""
        return self.ledger.paused

    async def pause(self) -> None:
        """Stop fetching and dispatching (the consumer stays in the group)."""
        self._stopping = True
        task = self._task
        if task is not None and not task.done():
            self._progress.set()
            self._room.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._consuming.wait()), CLOSE_TIMEOUT)
            except TimeoutError:
                logger.warning(
                    "The Kafka bridge's fetch loop did not stop within %gs.", CLOSE_TIMEOUT
                )

    async def close(self) -> None:
        """Commit what finished, leave the group and end the consumer task."""
        self._stopping = True
        consumer = self.consumer
        if consumer is not None:
            await self._commit(consumer, self.ledger.partitions)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await _ended(task)
        await self._close_consumer()
        self.middleware.bridge = None

    async def _close_consumer(self) -> None:
        consumer, self.consumer = self.consumer, None
        self.ledger.release(self.ledger.partitions)
        if consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), CLOSE_TIMEOUT)

    async def _supervise(self) -> None:
        delay = RECONNECT_BACKOFF_MIN
        while not self._stopping:
            try:
                topics = sorted(self.topics())
                if not topics:
                    self.last_poll = time.monotonic()
                    await asyncio.sleep(IDLE_INTERVAL)
                    continue
                consumer = self.config.consumer(
                    group_id=self.group_id,
                    enable_auto_commit=False,
                    auto_offset_reset=self.auto_offset_reset,
                    session_timeout_ms=self.session_timeout_ms,
                    heartbeat_interval_ms=self.heartbeat_interval_ms,
                    fetch_max_wait_ms=self.fetch_max_wait_ms,
                )
                self.consumer = consumer
                await consumer.start()
                consumer.subscribe(topics, listener=_Listener(self, consumer))
                self.error = None
                await self._consume(consumer, topics)
                delay = RECONNECT_BACKOFF_MIN
                return  # stopping: close() commits and leaves the group
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                self.reconnects += 1
                logger.error(
                    "Kafka consumer failed (%s); reconnecting in %.1fs.",
                    self.error,
                    delay,
                    exc_info=True,
                )
                await self._close_consumer()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_BACKOFF_MAX)

    async def _consume(self, consumer: AIOKafkaConsumer, topics: list[str]) -> None:
        self._consuming.clear()
        try:
            while not self._stopping:
                current = sorted(self.topics())
                if current != topics and current:
                    topics = current
                    consumer.subscribe(topics, listener=_Listener(self, consumer))
                fetch, room = self._flow(consumer)
                if fetch and room > 0 and len(fetch) == len(self.ledger.keys):
                    batch = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=room)
                elif fetch and room > 0:
                    batch = await self._fetch_some(consumer, fetch, room)
                elif self.ledger.flowing:
                    # Backpressure: the budget is spent, nothing stuck for long: wait
                    # for handlers to finish (polling goes on once they are paused).
                    await self._wait_for_room()
                    await self._commit_due(consumer)
                    continue
                else:
                    # No partition yet (joining the group), or all paused: poll, so
                    # the group does not take this consumer for dead.
                    batch = await consumer.getmany(
                        timeout_ms=POLL_TIMEOUT_MS, max_records=max(1, room)
                    )
                self.last_poll = time.monotonic()
                if self._stopping:
                    break  # not dispatched: delivered again after the restart
                fetched = []
                for tp, records in batch.items():
                    partition = self.ledger.receive(tp, records)
                    if partition is None:
                        continue  # revoked while fetching; its new owner reads it again
                    fetched.append(partition)
                self.ledger.reshare(time.monotonic())
                for partition in fetched:
                    self._drain(partition)
                await self._commit_due(consumer)
        finally:
            self._consuming.set()

    async def _fetch_some(
        self, consumer: AIOKafkaConsumer, fetch: list[TopicPartition], room: int
    ) -> dict[TopicPartition, list[ConsumerRecord]]:
        """Fetch from the partitions with room only, until records come or a full
        partition gets room again (then the next fetch includes it).

        A full partition keeps what aiokafka prefetched for it (pausing would drop
        it), unfetched.
        """
        self._room.clear()
        getter = asyncio.ensure_future(
            consumer.getmany(*fetch, timeout_ms=POLL_TIMEOUT_MS, max_records=room)
        )
        waiter = asyncio.ensure_future(self._room.wait())
        try:
            await asyncio.wait((getter, waiter), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            if not getter.done():
                getter.cancel()  # nothing drained yet: records stay in aiokafka's buffer
            await _ended(getter)
        return getter.result() if not getter.cancelled() else {}

    async def _commit_due(self, consumer: AIOKafkaConsumer) -> None:
        """Commit what finished when the last commit is COMMIT_INTERVAL old."""
        if self.ledger.commit_due(time.monotonic()):
            await self._commit(consumer, self.ledger.partitions)

    async def _wait_for_room(self) -> None:
        """Wait (one poll interval at most) until the budget or a full partition
        has room again, or the bridge stops."""
        self._room.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._room.wait(), POLL_TIMEOUT_MS / 1000)
        self.last_poll = time.monotonic()  # the loop is alive, only waiting on handlers

    def _flow(self, consumer: AIOKafkaConsumer) -> tuple[list[TopicPartition], int]:
        """Dispatch waiting records the budget has room for; return the partitions
        under their share with nothing waiting, and the room left.  Pauses the
        partitions full and stuck for PAUSE_AFTER seconds, resumes paused ones
        that are under their share again."""
        now = time.monotonic()
        self.ledger.reshare(now)
        for part in self.ledger.partitions:
            if part.waiting:
                self._drain(part)
        flow = self.ledger.flow(now)
        for tp in flow.resume:
            with contextlib.suppress(IllegalStateError):  # revoked meanwhile
                consumer.resume(tp)
        for part, stuck_for in flow.pause:
            with contextlib.suppress(IllegalStateError):
                consumer.pause(part.key)
            logger.warning(
                "Kafka bridge paused %s[%d]: %d record(s) in flight, nothing committed "
                "for %.0fs (a handler stuck?); the other partitions go on.",
                part.key.topic,
                part.key.partition,
                len(part.records),
                stuck_for,
            )
        return flow.fetch, flow.room

    def _drain(self, part: _Partition) -> None:
        """Dispatch the partition's waiting records while it has room."""
        if part.draining:
            return  # a record settled while dispatching: the loop below goes on
        part.draining = True
        try:
            while not self._stopping:
                taken = self.ledger.take(part)  # None: no room, or revoked
                if taken is None:
                    break
                self._dispatch(*taken)
        finally:
            part.draining = False

    # -- rebalance -------------------------------------------------------------

    def assigned(self, partitions: set[TopicPartition]) -> None:
        """Start tracking newly assigned partitions."""
        self.ledger.assign(partitions)
        logger.info(
            "Kafka bridge assigned %s",
            ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions),
        )

    async def revoked(self, consumer: AIOKafkaConsumer, partitions: set[TopicPartition]) -> None:
        """Finish (within ``revoke_timeout``) and commit revoked partitions, then let go."""
        parts = self.ledger.detach(partitions)  # none of their records dispatched now
        if not parts:
            return
        deadline = time.monotonic() + self.revoke_timeout
        while not all(part.settled for part in parts):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                busy = sum(part.running for part in parts)
                logger.warning(
                    "%d record(s) of revoked partitions still running after %gs; they "
                    "will be delivered again to the partitions' next owner.",
                    busy,
                    self.revoke_timeout,
                )
                break
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), remaining)
        await self._commit(consumer, parts)
        self.ledger.release(parts)
        logger.info(
            "Kafka bridge released %s",
            ", ".join(f"{p.key.topic}[{p.key.partition}]" for p in parts),
        )

    # -- dispatch ---------------------------------------------------------------

    def _dispatch(self, entry: _Record, record: ConsumerRecord) -> None:
        """Hand ``record`` (counted as ``entry`` by the ledger) to its handlers.

        A replayed record goes to the handler its dead letter names, in the service
        it names (other services' workers let it pass); when this service has no
        such handler, the dead letter is written back with the reason, never lost.
        """
        headers = {k: v for k, v in record.headers or ()}
        actors = self.route(record.topic)
        replay_service = headers.get(HEADER_REPLAY_SERVICE)
        if replay_service is not None and replay_service.decode("utf-8", "replace") != self.service:
            self._settle(entry)  # another service's replay
            return
        replay_to = headers.get(HEADER_REPLAY_HANDLER)
        target = replay_to.decode("utf-8", "replace") if replay_to is not None else None
        if target is not None:
            actors = [actor for actor in actors if actor.actor_name == target]
        try:
            envelope = decode_record(record, self.accept_unknown_types, typed=_typed(actors))
            options = record_options(record, envelope, headers)
        except Exception as exc:  # RecursionError included: no record stops its partition
            reason = str(exc) if isinstance(exc, Poison) else f"{type(exc).__name__}: {exc}"
            fields = exc.field_errors if isinstance(exc, Poison) else []
            entry.remaining = 1
            self._dead_letter_poison(entry, record, headers, reason, fields)
            return
        if not actors and replay_service is not None:
            original = headers.get(HEADER_REPLAY_OF, b"").decode("utf-8", "replace")
            handler = target if target is not None else POISON_HANDLER
            original = original or dead_letter_id(
                record.topic, record.partition, record.offset, self.service, handler
            )
            logger.warning(
                "Replayed record %s[%d]@%d names handler %r of service %r, which this "
                "worker does not have; dead letter %s kept.",
                record.topic,
                record.partition,
                record.offset,
                handler,
                self.service,
                original,
            )
            entry.remaining = 1
            failed = refused_replay(record, headers, envelope, original, self.service, handler)
            self._write_dead_letter(entry, failed)
            return
        if not actors and target is not None:
            logger.warning(
                "Replayed record %s[%d]@%d names handler %r, which this process "
                "does not have; skipped.",
                record.topic,
                record.partition,
                record.offset,
                target,
            )
        if not actors:
            self._settle(entry)
            return
        entry.remaining = len(actors)
        for actor in actors:
            dead_letter = dead_letter_id(
                record.topic, record.partition, record.offset, self.service, actor.actor_name
            )
            message = handler_message(actor, envelope, {**options, DEAD_LETTER_ID: dead_letter})
            spec = actor.options.get(keys.HANDLER)
            chain = None
            if spec is not None and spec.ordered and record.key is not None:
                chain = (actor.actor_name, bytes(record.key))
            self._deliveries[message.message_id] = _Delivery(entry, dead_letter, chain)
            if chain is not None:
                waiting = self._chains.get(chain)
                if waiting is not None:
                    waiting.append(message)
                    continue
                self._chains[chain] = deque()
            self._enqueue(message)

    def _enqueue(self, message: Message[Any]) -> None:
        try:
            self.broker.enqueue(message)
        except Exception:
            # The dispatcher stopped: the record stays uncommitted and comes back.
            logger.warning("Could not dispatch %s; it will be delivered again.", message)
            self.abandoned(message.message_id)

    def _dead_letter_poison(
        self,
        entry: _Record,
        record: ConsumerRecord,
        headers: dict[str, bytes],
        reason: str,
        field_errors: list[dict[str, str]] | None = None,
    ) -> None:
        logger.warning(
            "Poison record %s[%d]@%d dead-lettered: %s",
            record.topic,
            record.partition,
            record.offset,
            reason,
        )
        self._write_dead_letter(
            entry, poison_dead_letter(record, headers, reason, self.service, field_errors)
        )

    def _write_dead_letter(self, entry: _Record, failed: FailedEvent) -> None:
        """Write ``failed``; the record settles once it is written."""
        task = asyncio.get_running_loop().create_task(self.dead_letters.write(failed))
        task.add_done_callback(lambda t: self._after_write(entry, t))

    def _after_write(self, entry: _Record, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is not None:
            return  # not written: the record stays uncommitted and comes back
        self._settle(entry)

    # -- completion --------------------------------------------------------------

    def is_stale(self, message_id: str) -> bool:
        """Whether ``message_id`` belongs to a partition this process released."""
        delivery = self._deliveries.get(message_id)
        return delivery is not None and delivery.record.partition.released

    def finished(self, message_id: str, *, failed: bool) -> None:
        """A handler message succeeded, was skipped, or was dead-lettered."""
        delivery = self._deliveries.pop(message_id, None)
        if delivery is None:
            return
        if delivery.chain is not None:
            self._advance(delivery.chain)
        write = self.dead_letters.take_write(delivery.dead_letter) if failed else None
        if write is None:
            self._settle(delivery.record)
        else:
            write.add_done_callback(lambda t: self._after_write(delivery.record, t))

    def abandoned(self, message_id: str) -> None:
        """A handler message will not finish here (shutdown): leave its record uncommitted."""
        delivery = self._deliveries.pop(message_id, None)
        if delivery is not None and delivery.chain is not None:
            self._advance(delivery.chain)

    def _advance(self, chain: tuple[str, bytes]) -> None:
        waiting = self._chains.get(chain)
        while waiting:
            message = waiting.popleft()
            delivery = self._deliveries.get(message.message_id)
            if delivery is None or delivery.record.partition.released:
                self._deliveries.pop(message.message_id, None)
                continue
            self._enqueue(message)
            return
        self._chains.pop(chain, None)

    def _settle(self, entry: _Record) -> None:
        """One of the record's handler messages finished (or the record itself)."""
        if not self.ledger.settle(entry, time.monotonic()):
            return  # messages of it still running, or its partition released
        self._progress.set()
        part = entry.partition
        if part.waiting:
            self._drain(part)
        if self.ledger.room_freed(part):
            self._room.set()

    async def _commit(self, consumer: AIOKafkaConsumer, parts: list[_Partition]) -> None:
        offsets = self.ledger.offsets(parts, time.monotonic())
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except Exception as exc:
            # The group moved on (rebalance) or the coordinator is away: the records
            # are delivered again from the last commit that went through.
            logger.warning("Offset commit failed: %s: %s", type(exc).__name__, exc)
            self.ledger.commit_failed()
            return
        self.ledger.committed(parts, offsets)

    async def lag(self) -> int | None:
        """Records in the owned partitions past the committed offsets, where known."""
        consumer = self.consumer
        if consumer is None:
            return None
        total = 0
        for part in self.ledger.partitions:
            high = consumer.highwater(part.key)
            if high is None:
                return None
            base = part.committed if part.committed is not None else part.committable
            if base is None:
                position = await consumer.position(part.key)
                base = position - len(part.records) - len(part.waiting)
            total += max(0, high - base)
        return total


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Routes aiokafka's rebalance callbacks to the bridge."""

    def __init__(self, bridge: KafkaBridge, consumer: AIOKafkaConsumer) -> None:
        self.bridge = bridge
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.bridge.revoked(self.consumer, set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.bridge.assigned(set(assigned))


def _typed(actors: list[Actor[Any, Any]]) -> bool:
    """Whether every one of ``actors`` (at least one) validates payloads into its own
    event class (``@on_event(OrderPlaced)``), so the envelope's type name matters
    to none of them."""
    if not actors:
        return False
    for actor in actors:
        spec = actor.options.get(keys.HANDLER)
        cls = getattr(spec, "event_type", None)
        if cls is None or cls is BaseEvent or issubclass(cls, UnknownEvent):
            return False
    return True


async def _ended(task: asyncio.Future[Any]) -> None:
    """Wait for ``task``, which we cancelled, to end; whatever it ends with is its own
    business (a consumer task's last error is logged where it happened), but a
    cancellation of the *calling* task is re-raised, never swallowed."""
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
    except Exception:
        logger.debug("A cancelled Kafka bridge task ended with an error.", exc_info=True)
