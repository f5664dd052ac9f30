"""The Kafka backend (``EVENTBUS_BACKEND=kafka``): events are Kafka records.

``publish`` writes **one record per event** to the topic named by ``event.topic``
(not one message per handler): the key is :meth:`BaseEvent.partition_key`, the
value the JSON envelope, and headers carry the event type, the correlation id
and the W3C ``traceparent`` of the publish span.  Producers wait for ``acks``
(``all`` by default) and a publish that the brokers do not acknowledge within
``publish_timeout`` seconds raises :class:`~eventbus.exceptions.PublishError`
(the record was not confirmed; it may still arrive later).

Handlers run where the events are consumed: in worker processes (``dramatiq
eventbus.actors myapp.handlers`` or ``python -m eventbus.kafka.backend
myapp.handlers``), each running one consumer in the group ``group_id`` (default:
the service name), and in the web process only with ``EVENTBUS_CONSUME=true``
(:mod:`eventbus.kafka.bridge` explains offsets, rebalances, ordering and
poison records).

Delivery is at least once: a record is committed only after every handler of it
and of every earlier record of its partition finished (succeeded, or
dead-lettered to ``<topic><EVENTBUS_DLQ_TOPIC_SUFFIX>``); a crash or a rebalance
past ``revoke_timeout`` delivers the uncommitted records again.

Example::

    backend = KafkaBackend(
        bootstrap_servers="localhost:9092",
        group_id="my-service",
        auto_offset_reset="earliest",
        session_timeout_ms=30000,
        enable_auto_commit=False,
    )
    bus = EventBus(backend=backend)
"""

from __future__ import annotations

from eventbus.extras import requires_extra

with requires_extra("kafka", __name__):
    import aiokafka  # noqa: F401  (checked here: the bridge and clients need it)

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Any

import dramatiq
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError, NodeNotReadyError
from dramatiq import Middleware
from pydantic_core import to_json

from eventbus.backends.base import Backend, HostedBus, Operations, OutgoingEvent, StopWorker
from eventbus.backends.embedded import EmbeddedBroker
from eventbus.config import (
    DEFAULT_DLQ_TOPIC_SUFFIX,
    DEFAULT_KAFKA_AUTO_OFFSET_RESET,
    DEFAULT_KAFKA_BOOTSTRAP_SERVERS,
    DEFAULT_KAFKA_HEARTBEAT_INTERVAL_MS,
    DEFAULT_KAFKA_IDEMPOTENCE,
    DEFAULT_KAFKA_MAX_IN_FLIGHT,
    DEFAULT_KAFKA_PUBLISH_TIMEOUT,
    DEFAULT_KAFKA_REVOKE_TIMEOUT,
    DEFAULT_KAFKA_SESSION_TIMEOUT_MS,
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_SCHEMA_CHECK,
    DEFAULT_WORKER_THREADS,
    EventBusSettings,
    SchemaCheckMode,
)
from eventbus.contracts.live import LiveSchemaCheck, SubscriberSchema
from eventbus.dispatch import Dispatcher
from eventbus.exceptions import BackendError, ConfigurationError, PublishError
from eventbus.health import HealthResult, HealthStatus, dispatcher_liveness
from eventbus.kafka.bridge import BridgeMiddleware, KafkaBridge
from eventbus.kafka.config import (
    HEADER_CORRELATION_ID,
    HEADER_REPLAY_HANDLER,
    HEADER_REPLAY_OF,
    HEADER_REPLAY_SERVICE,
    KafkaConfig,
)
from eventbus.kafka.dlq import KafkaDeadLetterStore
from eventbus.kafka.lag import LagReader
from eventbus.kafka.partitioner import Murmur2Partitioner
from eventbus.kafka.records import POISON_HANDLER, RecordHeaders, dead_letter_address
from eventbus.kafka.schemas import (
    DEFAULT_SCHEMA_TOPIC,
    READ_TIMEOUT,
    SchemaTopicView,
    by_topic,
    read_schemas,
    store_schemas,
)
from eventbus.middleware.metrics import Metrics
from eventbus.redact import redact_url
from eventbus.routing import Router, Subscriptions

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer, TopicPartition

    from eventbus.dlq.records import FailedEvent
    from eventbus.dlq.store import DeadLetterStore

logger = logging.getLogger(__name__)
#: Schema check messages: the same logger as the module that stores the schemas.
schema_logger = logging.getLogger("eventbus.kafka.schemas")

#: Seconds a health check waits for the brokers' metadata.
HEALTH_TIMEOUT = 3.0
#: Seconds without a fetch before the bridge reports unhealthy (at least this,
#: or the session timeout when longer).
STALE_POLL = 10.0
#: Seconds between checks of the group's committed offsets in ``drain()``.
DRAIN_INTERVAL = 0.05


class KafkaBackend(Backend):
    """Publishes events to Kafka and runs their handlers from a consumer group.

    Parameters:
      bootstrap_servers: ``host:port[,host:port...]`` of the brokers.
      group_id: Consumer group of this service's workers (one per service: every
        service with its own group receives every event); default: the bus's
        service name (``EVENTBUS_SERVICE``, else the handlers' top-level package).
      auto_offset_reset: Where a group without committed offsets starts reading:
        ``earliest`` (default; nothing published before the first worker started
        is missed) or ``latest``.
      session_timeout_ms: Milliseconds without heartbeats before the group evicts
        a consumer and hands its partitions to the others.
      heartbeat_interval_ms: Milliseconds between heartbeats (about a third of the
        session timeout, or less).
      enable_auto_commit: Must stay False: offsets are committed only once the
        records' handlers finished.  True raises ConfigurationError.
      acks: ``"all"`` (default: every in-sync replica has the record), ``1`` or ``0``.
      idempotence: Idempotent producer (default on): a send retried after a lost
        acknowledgement is written once, and a partition's records keep their
        order across retries.  Needs ``acks="all"`` and brokers that support it
        (Apache Kafka does; Tansu does not: start then fails with a
        BackendError naming ``EVENTBUS_KAFKA_IDEMPOTENCE``).  Off, a retried send
        may be written twice; handlers are at-least-once anyway.
      publish_timeout: Seconds a publish waits for the acknowledgement before
        PublishError.
      max_in_flight: Records fetched and not yet committable before fetching pauses.
      revoke_timeout: Seconds the handlers of revoked partitions get to finish.
      accept_unknown_types: Deliver events whose type this process does not define
        as :class:`~eventbus.events.UnknownEvent` instead of dead-lettering them.
      dlq_topic_suffix: DLQ topic of a topic ``t`` is ``t + dlq_topic_suffix``.
      max_concurrency, worker_threads: As for the embedded backend: async handlers
        running at once, threads for sync handlers.
      schema_check: What a publish does when a live subscriber's stored schema
        would reject the event class (``EVENTBUS_SCHEMA_CHECK``; see
        :mod:`eventbus.kafka.schemas`): ``"off"``, ``"warn"`` (log once per class
        and subscriber, count each event) or ``"error"`` (raise
        :class:`~eventbus.contracts.live.SchemaMismatchError`, nothing published).
      schema_topic: The topic where workers store their typed handlers' schemas
        and publishers read them (:data:`~eventbus.kafka.schemas.DEFAULT_SCHEMA_TOPIC`).
      config: A ready :class:`KafkaConfig`; otherwise built from
        ``bootstrap_servers`` and ``client_options`` (``security_protocol``,
        ``sasl_mechanism``, ``sasl_username``, ``sasl_password``, ``ssl_cafile``,
        ``ssl_certfile``, ``ssl_keyfile``, ``ssl_password``, ``ssl_context``,
        ``client_id``), which reach the producer, the consumer and every other
        client alike.
    """

    name = "kafka"
    messaging_system = "kafka"

    def __init__(
        self,
        bootstrap_servers: str = DEFAULT_KAFKA_BOOTSTRAP_SERVERS,
        group_id: str | None = None,
        auto_offset_reset: str = DEFAULT_KAFKA_AUTO_OFFSET_RESET,
        session_timeout_ms: int = DEFAULT_KAFKA_SESSION_TIMEOUT_MS,
        heartbeat_interval_ms: int = DEFAULT_KAFKA_HEARTBEAT_INTERVAL_MS,
        enable_auto_commit: bool = False,
        *,
        acks: str | int = "all",
        idempotence: bool = DEFAULT_KAFKA_IDEMPOTENCE,
        publish_timeout: float = DEFAULT_KAFKA_PUBLISH_TIMEOUT,
        max_in_flight: int = DEFAULT_KAFKA_MAX_IN_FLIGHT,
        revoke_timeout: float = DEFAULT_KAFKA_REVOKE_TIMEOUT,
        accept_unknown_types: bool = False,
        dlq_topic_suffix: str = DEFAULT_DLQ_TOPIC_SUFFIX,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        worker_threads: int = DEFAULT_WORKER_THREADS,
        schema_check: SchemaCheckMode = DEFAULT_SCHEMA_CHECK,
        schema_topic: str = DEFAULT_SCHEMA_TOPIC,
        config: KafkaConfig | None = None,
        security_protocol: str = "PLAINTEXT",
        sasl_mechanism: str | None = None,
        sasl_username: str | None = None,
        sasl_password: str | None = None,
        ssl_cafile: str | None = None,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
        ssl_password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        client_id: str = "eventbus",
    ) -> None:
        if enable_auto_commit:
            raise ConfigurationError(
                "enable_auto_commit=True would commit offsets of events whose handlers "
                "have not finished; the Kafka backend commits them itself"
            )
        if auto_offset_reset not in ("earliest", "latest"):
            raise ConfigurationError(
                f"auto_offset_reset={auto_offset_reset!r}: use 'earliest' or 'latest'"
            )
        if str(acks) not in ("all", "-1", "0", "1"):
            raise ConfigurationError(f"acks={acks!r}: use 'all', 1 or 0")
        if idempotence and str(acks) not in ("all", "-1"):
            raise ConfigurationError(
                f"acks={acks!r} with an idempotent producer: idempotence needs acks=all; "
                "set EVENTBUS_KAFKA_IDEMPOTENCE=false (idempotence=False) to use acks "
                f"{acks}"
            )
        if heartbeat_interval_ms >= session_timeout_ms:
            raise ConfigurationError(
                f"heartbeat_interval_ms ({heartbeat_interval_ms}) must be below "
                f"session_timeout_ms ({session_timeout_ms})"
            )
        if group_id is not None and not group_id:
            raise ConfigurationError("group_id is empty")
        if schema_check not in ("off", "warn", "error"):
            raise ConfigurationError(
                f"invalid schema_check {schema_check!r}: off, warn or error (EVENTBUS_SCHEMA_CHECK)"
            )
        self.config = config or KafkaConfig(
            bootstrap_servers,
            client_id=client_id,
            security_protocol=security_protocol,
            sasl_mechanism=sasl_mechanism,
            sasl_username=sasl_username,
            sasl_password=sasl_password,
            ssl_cafile=ssl_cafile,
            ssl_certfile=ssl_certfile,
            ssl_keyfile=ssl_keyfile,
            ssl_password=ssl_password,
            ssl_context=ssl_context,
        )
        self.group_id = group_id
        self.auto_offset_reset = auto_offset_reset
        self.session_timeout_ms = session_timeout_ms
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.acks: str | int = "all" if str(acks) in ("all", "-1") else int(acks)
        self.idempotence = idempotence
        self.publish_timeout = publish_timeout
        self.max_in_flight = max_in_flight
        self.revoke_timeout = revoke_timeout
        self.accept_unknown_types = accept_unknown_types
        self.max_concurrency = max_concurrency
        self.worker_threads = worker_threads
        self.dead_letters = KafkaDeadLetterStore(
            self.config, dlq_topic_suffix, skip_shutdown_errors=True, idempotence=idempotence
        )
        self.broker: EmbeddedBroker | None = None
        self.router: Router | None = None
        self.dispatcher: Dispatcher | None = None
        self.bridge: KafkaBridge | None = None
        self.producer: AIOKafkaProducer | None = None
        self.consume = False
        self._bridge_middleware = BridgeMiddleware()
        self._produced: dict[TopicPartition, int] = {}
        self._lag_reader = LagReader(self.config, timeout=HEALTH_TIMEOUT)
        #: The check of published classes against live subscriber schemas
        #: (``EVENTBUS_SCHEMA_CHECK``; :mod:`eventbus.kafka.schemas`).
        self.schema_check = LiveSchemaCheck(schema_check, log=schema_logger)
        self.schema_topic = schema_topic
        self._schema_view = SchemaTopicView(self.config, schema_topic)
        #: Monotonic time before which ``warn`` publishes unchecked (the schema topic
        #: was unreadable: a slow broker does not slow every publish down).
        self._schema_skip_until = 0.0

    @classmethod
    def from_settings(cls, settings: EventBusSettings) -> KafkaBackend:
        """The backend the ``EVENTBUS_KAFKA_*`` (and DLQ, concurrency) settings describe."""
        return cls(
            group_id=settings.kafka_group_id,
            auto_offset_reset=settings.kafka_auto_offset_reset,
            session_timeout_ms=settings.kafka_session_timeout_ms,
            heartbeat_interval_ms=settings.kafka_heartbeat_interval_ms,
            acks=settings.kafka_acks,
            idempotence=settings.kafka_idempotence,
            publish_timeout=settings.kafka_publish_timeout,
            max_in_flight=settings.kafka_max_in_flight,
            revoke_timeout=settings.kafka_revoke_timeout,
            accept_unknown_types=settings.kafka_accept_unknown_types,
            dlq_topic_suffix=settings.dlq_topic_suffix,
            max_concurrency=settings.max_concurrency,
            worker_threads=settings.worker_threads,
            schema_check=settings.schema_check,
            config=KafkaConfig.from_settings(settings),
        )

    # -- wiring --------------------------------------------------------------------

    def bind(self, middleware: list[Middleware], subscriptions: Subscriptions) -> dramatiq.Broker:
        if self.broker is None:
            self.broker = EmbeddedBroker([self._bridge_middleware, *middleware])
            self.router = Router(subscriptions, self.broker, subscriptions.queue_of)
            self.subscriptions = subscriptions
            self.dead_letters.topics = lambda: subscriptions.topics
            for item in middleware:  # the bus's collector counts schema mismatches
                if isinstance(item, Metrics):
                    self.schema_check.metrics = item.collector
        return self.broker

    def _topics(self) -> list[str]:
        return self.router.topics() if self.router is not None else []

    def dead_letter_store(self, settings: EventBusSettings) -> DeadLetterStore | None:
        return self.dead_letters

    def dead_letters_out_of_reach(self) -> None:
        return None  # in the DLQ topics: every process with the brokers' address reads them

    def subscriptions_home(self) -> str:
        return (
            f"each service's subscriptions are its consumer group on the brokers at "
            f"{self.address()} (EVENTBUS_KAFKA_GROUP_ID, default the service name), fed by "
            "the handlers its workers run: see them with Kafka's tools "
            "(kafka-consumer-groups --describe --group SERVICE)"
        )

    def address(self) -> str:
        """The bootstrap servers, any password hidden."""
        return redact_url(self.config.bootstrap_servers)

    def unreachable(self, exc: BaseException) -> bool:
        return super().unreachable(exc) or isinstance(
            exc, KafkaConnectionError | KafkaTimeoutError | NodeNotReadyError
        )

    def _require_broker(self) -> EmbeddedBroker:
        if self.broker is None:
            raise BackendError("backend not bound to a bus", backend=self.name)
        return self.broker

    # -- lifecycle -----------------------------------------------------------------

    async def start(self, consume: bool) -> None:
        """Connect the producer, start the dispatcher and (with ``consume``) the bridge.

        Raises:
          BackendError: No broker answered within ``publish_timeout`` seconds.
        """
        broker = self._require_broker()
        if self.producer is not None:
            return
        loop = asyncio.get_running_loop()
        producer = self.config.producer(
            acks=self.acks,
            enable_idempotence=self.idempotence,
            request_timeout_ms=int(self.publish_timeout * 1000),
            partitioner=Murmur2Partitioner(),
        )
        try:
            await asyncio.wait_for(producer.start(), self.publish_timeout)
        except Exception as exc:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise BackendError(self._start_error(exc), backend=self.name) from exc
        self.producer = producer
        self.dead_letters.attach(producer, loop)
        self.dead_letters.topic_check.check_soon(
            [self.dead_letters.dlq_topic(t) for t in self._topics()]
        )
        self._lag_reader.attach(loop)
        self.dispatcher = Dispatcher(
            broker, loop, max_concurrency=self.max_concurrency, worker_threads=self.worker_threads
        )
        broker.dispatcher = self.dispatcher
        self.consume = consume
        if self.group_id is None:
            self.group_id = self.subscriptions.service
        if consume:
            assert self.router is not None
            self.bridge = KafkaBridge(
                self.config,
                self.group_id,
                broker,
                self._bridge_middleware,
                self.router.actors,
                self.router.topics,
                self.dead_letters,
                auto_offset_reset=self.auto_offset_reset,
                session_timeout_ms=self.session_timeout_ms,
                heartbeat_interval_ms=self.heartbeat_interval_ms,
                max_in_flight=self.max_in_flight,
                revoke_timeout=self.revoke_timeout,
                accept_unknown_types=self.accept_unknown_types,
                service=self.subscriptions.service,
            )
            self.bridge.start()
            await self._store_schemas()

    async def _store_schemas(self) -> None:
        """Write this worker's typed handlers' schemas to the schema topic, and
        tombstones for its service's handlers gone (:func:`~eventbus.kafka.schemas.store_schemas`).
        A failure is logged: the handlers run anyway, unchecked by publishers."""
        assert self.router is not None and self.producer is not None
        service = self.subscriptions.service
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                written, removed = await store_schemas(
                    self.config,
                    self.producer,
                    self.schema_topic,
                    service,
                    self.router.subscriptions.handlers(),
                    READ_TIMEOUT,
                )
        except Exception as exc:
            schema_logger.warning(
                "Could not store the handlers' schemas in %s (%s: %s): publishers cannot "
                "check their event classes against them until a worker of %s does.",
                self.schema_topic,
                type(exc).__name__,
                exc,
                service,
            )
            return
        if written or removed:
            schema_logger.info(
                "Stored %d handler schema(s) of %s in %s, removed %d.",
                written,
                service,
                self.schema_topic,
                removed,
            )

    def _start_error(self, exc: BaseException) -> str:
        """What a producer that failed to start means, and what to do about it."""
        reason = f"{type(exc).__name__}: {exc}"
        if self.idempotence and not isinstance(exc, KafkaConnectionError | TimeoutError):
            # The brokers answered but refused a producer id (InitProducerId).
            return (
                f"Kafka at {self.config.bootstrap_servers} refused an idempotent producer "
                f"({reason}); brokers without idempotence support need "
                "EVENTBUS_KAFKA_IDEMPOTENCE=false (KafkaBackend(idempotence=False))"
            )
        return f"cannot reach Kafka at {self.config.bootstrap_servers}: {reason}"

    async def stop(self, timeout: float) -> None:
        """Stop fetching, let in-flight handlers finish within ``timeout`` seconds,
        commit what finished, leave the group and close the producer.

        Records whose handlers did not finish stay uncommitted: the group delivers
        them again.
        """
        deadline = time.monotonic() + timeout
        bridge, self.bridge = self.bridge, None
        dispatcher, self.dispatcher = self.dispatcher, None
        if bridge is not None:
            await bridge.pause()
        if dispatcher is not None:
            undelivered = await dispatcher.stop(max(0.0, deadline - time.monotonic()))
            if undelivered:
                logger.info(
                    "%d handler message(s) not run before shutdown; their records stay "
                    "uncommitted and are delivered again.",
                    len(undelivered),
                )
        producer, self.producer = self.producer, None
        await self._lag_reader.close()
        await self._schema_view.close()
        await self.dead_letters.detach(max(0.0, deadline - time.monotonic()))
        await asyncio.to_thread(self.dead_letters.close)
        if bridge is not None:
            await bridge.close()
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), max(1.0, deadline - time.monotonic()))

    # -- publishing ----------------------------------------------------------------

    def _require_producer(self) -> AIOKafkaProducer:
        if self.producer is None:
            raise PublishError("the Kafka backend is not started")
        return self.producer

    @staticmethod
    def record_headers(outgoing: OutgoingEvent) -> list[tuple[str, bytes]]:
        """The headers of an event's record: type, id, correlation id and the trace
        context (the tracer's propagation fields, else a ``traceparent`` built from
        the publish span's ids when they are W3C ids)."""
        return RecordHeaders().of(outgoing)

    def delay_refusal(self) -> str:
        return (
            "the Kafka backend cannot delay an event (publish(..., delay=...) or eta=): "
            "a Kafka topic delivers its records in order, as soon as they are written. "
            "Publish it when it is due (from a scheduler of your own), or use the Redis "
            "backend, which holds delayed events in Redis"
        )

    async def publish(self, events: list[OutgoingEvent], *, strict: bool = False) -> set[str]:
        """Send one record per event, then wait once for all acknowledgements.

        Kafka keeps every record in its topic whoever subscribes, so no publish is
        unrouted here (``strict`` has no effect): a consumer group created later
        reads it from the earliest offset.

        Raises:
          PublishError: Not started; the brokers did not acknowledge every record
            within ``publish_timeout`` seconds (some may still arrive); or the
            producer or the brokers refused a record (the message names the event;
            the publish's other records may have been written).
        """
        producer = self._require_producer()
        if any(outgoing.deliver_at is not None for outgoing in events):
            # An outbox row written with a delay under another backend's settings.
            raise PublishError(self.delay_refusal() + "; nothing was published")
        if self.schema_check.mode != "off" and time.monotonic() >= self._schema_skip_until:
            await self._check_schemas(events)  # a dict lookup per event, once checked

        headers = RecordHeaders()
        send = producer.send
        futures: list[asyncio.Future[Any]] = []
        append = futures.append
        sent: list[Any]
        try:
            async with asyncio.timeout(self.publish_timeout):  # no extra task, unlike wait_for
                # Every record joins its batch before any acknowledgement is awaited;
                # then one wait for all of them.
                for outgoing in events:
                    append(
                        await send(
                            outgoing.event.topic,
                            value=outgoing.envelope,
                            key=outgoing.event.partition_key().encode(),
                            headers=headers.of(outgoing),
                        )
                    )
                if len(futures) == 1:
                    try:
                        sent = [await futures[0]]
                    except KafkaError as exc:  # this record's own failure, named below
                        sent = [exc]
                else:
                    sent = await asyncio.gather(*futures, return_exceptions=True)
        except TimeoutError:
            raise PublishError(
                f"Kafka at {self.config.bootstrap_servers} did not acknowledge "
                f"{len(events)} event(s) within {self.publish_timeout:g}s"
            ) from None
        except Exception as exc:
            if len(futures) < len(events):  # the producer refused this record outright
                raise self._refused([(events[len(futures)], exc)], len(futures)) from exc
            raise PublishError(f"Kafka refused the event(s): {type(exc).__name__}: {exc}") from exc
        failed = [(o, r) for o, r in zip(events, sent, strict=True) if isinstance(r, BaseException)]
        if failed:
            self._note_produced(r for r in sent if not isinstance(r, BaseException))
            raise self._refused(failed, len(events) - len(failed))
        self._note_produced(sent)
        return set()

    def _refused(
        self, failed: list[tuple[OutgoingEvent, BaseException]], others: int
    ) -> PublishError:
        """The error of a publish whose record(s) ``failed`` Kafka refused, naming the
        first of them; ``others``: how many other records of the publish were sent
        (and may have been written)."""
        outgoing, exc = failed[0]
        event = outgoing.event
        more = f" and {len(failed) - 1} other event(s)" if len(failed) > 1 else ""
        sent = f"; {others} other event(s) of this publish were sent" if others else ""
        error = PublishError(
            f"Kafka at {self.config.bootstrap_servers} refused event {event.event_id} "
            f"({event.event_type}, topic {event.topic!r}){more}: {type(exc).__name__}: "
            f"{exc}{sent}"
        )
        error.__cause__ = exc
        return error

    def _note_produced(self, sent: Iterable[Any]) -> None:
        """Remember the last offset produced to each partition (what ``drain`` awaits)."""
        produced = self._produced
        for metadata in sent:
            tp = metadata.topic_partition
            if metadata.offset > produced.get(tp, -1):
                produced[tp] = metadata.offset

    async def _check_schemas(self, events: list[OutgoingEvent]) -> None:
        """Check the events' classes against the schemas their topics' live
        subscribers stored (:class:`~eventbus.contracts.live.LiveSchemaCheck`): the
        schema topic is read (caught up to its end) only for a class and topic
        without a fresh verdict, for at most
        :data:`~eventbus.kafka.schemas.READ_TIMEOUT` seconds (or ``publish_timeout``
        when shorter).  Unreadable: ``error`` refuses the publish, ``warn``
        publishes unchecked for :data:`~eventbus.contracts.live.CACHE_TTL` seconds."""

        async def read(topics: list[str]) -> dict[str, list[SubscriberSchema]]:
            async with asyncio.timeout(min(READ_TIMEOUT, self.publish_timeout)):
                schemas = await self._schema_view.catch_up()
            return by_topic(schemas.values(), topics)

        try:
            await self.schema_check.check_with((o.event for o in events), read)
        except (KafkaError, OSError, TimeoutError) as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if self.schema_check.mode == "error":  # refusing what cannot be checked
                raise PublishError(
                    f"could not read the subscribers' schemas from {self.schema_topic} on "
                    f"Kafka at {self.address()}: {reason}; nothing was published "
                    "(EVENTBUS_SCHEMA_CHECK=error)"
                ) from exc
            # warn: the check is advice; the publish goes on and, if Kafka is really
            # unreachable, fails with its own error.
            self._schema_skip_until = time.monotonic() + self.schema_check.ttl
            schema_logger.debug(
                "Schema check skipped: the subscribers' schemas unreadable (%s)", reason
            )

    def live_schemas(self, topics: Collection[str]) -> list[SubscriberSchema]:
        """The schemas the live subscribers of ``topics`` stored in the schema topic
        (blocking: reads it to its end once; what ``eventbus schema check --live``
        checks against)."""
        view = asyncio.run(
            asyncio.wait_for(read_schemas(self.config, self.schema_topic), READ_TIMEOUT)
        )
        return [s for sub in by_topic(view.schemas.values(), topics).values() for s in sub]

    def replay(self, record: FailedEvent, handler: str | None = None) -> None:
        """Publish a dead letter's event again, for the handler that failed on it only
        (or for ``handler``, another handler of the topic in the same service: the
        new name of a renamed one).

        The record goes to the event's topic with the service and the handler its
        dead-letter id names (``eventbus-replay-service``,
        ``eventbus-replay-handler``): every service's group reads it, the workers of
        that service run that one handler (a poison record's: every handler of the
        topic), the others let it pass.  A worker of that service without such a
        handler writes the dead letter back with the reason: a replay never loses
        it.  Blocking: it writes through the dead-letter store's producer.

        Raises:
          BackendError: No topic or envelope, or a poison record's dead letter from
            before dead letters named their service (no handler can be addressed;
            the record is kept).
        """
        refusal = self._refusal(record, handler)
        if refusal is not None:
            raise BackendError(f"cannot replay this dead letter: {refusal}", backend=self.name)
        envelope = record.envelope
        assert isinstance(envelope, dict)
        address = dead_letter_address(record)
        headers = [
            (HEADER_CORRELATION_ID, record.correlation_id.encode()),
            (HEADER_REPLAY_OF, record.id.encode()),
        ]
        if address is not None:
            service, named = address
            headers.append((HEADER_REPLAY_SERVICE, service.encode()))
            target = handler or named
            if target != POISON_HANDLER:
                headers.append((HEADER_REPLAY_HANDLER, target.encode()))
        else:  # an older handler failure: its handler name alone addresses it
            headers.append((HEADER_REPLAY_HANDLER, (handler or record.handler).encode()))
        event = envelope.get("event")
        key = str(event.get("event_id", "")) if isinstance(event, dict) else ""
        self.dead_letters.send(record.topic, to_json(envelope), key.encode() or None, headers)

    def replay_refusal(self, record: FailedEvent, handler: str | None = None) -> str | None:
        """Why :meth:`replay` would refuse ``record``, or why the service's workers
        would write it back (``ReplayRefused``: this process runs the record's
        service and has no such handler); None when it would be handled."""
        refusal = self._refusal(record, handler)
        if refusal is not None:
            return refusal
        targets = self.replay_targets(record)
        name = handler or record.handler
        if targets is not None and name != POISON_HANDLER and name not in targets:
            return (
                f"handler {name!r} does not subscribe to topic {record.topic!r} in this "
                "service (renamed or removed?): its workers would write the dead letter "
                "back as ReplayRefused"
            )
        return None

    def _refusal(self, record: FailedEvent, handler: str | None) -> str | None:
        """Why :meth:`replay` refuses ``record`` outright (it sends nothing)."""
        if not record.topic or not isinstance(record.envelope, dict):
            return "no topic or envelope"
        address = dead_letter_address(record)
        if address is None and record.handler == POISON_HANDLER and handler is None:
            return (
                "it was set aside before any handler saw it, and it does not name the "
                "service whose workers did (dead letters written before ids named service "
                "and handler); kept. Use replay_edited with the event, or publish the "
                "event again"
            )
        return None

    def replay_targets(self, record: FailedEvent) -> list[str] | None:
        """The handlers of the record's topic in this process, when this process is
        of the record's service (the group has no list other processes can read);
        else None (also when this process has none: it cannot tell)."""
        address = dead_letter_address(record)
        if self.router is None or self.subscriptions is None:
            return None
        if address is not None and address[0] != self.subscriptions.service:
            return None
        names = sorted({actor.actor_name for actor in self.router.actors(record.topic)})
        return names or None

    # -- waiting and health ------------------------------------------------------------

    async def drain(self, timeout: float | None = None) -> None:
        """Return once the group committed every record this process published to a
        topic the bus subscribes (handled or dead-lettered, by any worker).

        Records published to topics without a local subscription are not waited
        for.  Raises TimeoutError after ``timeout`` seconds.
        """
        subscribed = set(self._topics())
        targets = {tp: off + 1 for tp, off in self._produced.items() if tp.topic in subscribed}
        if not targets:
            return
        admin = self.config.admin(request_timeout_ms=int(self.publish_timeout * 1000))
        await admin.start()
        try:
            async with asyncio.timeout(timeout):
                while targets:
                    committed = await admin.list_consumer_group_offsets(
                        self.group_id, partitions=list(targets)
                    )
                    for tp, meta in committed.items():
                        if tp in targets and meta.offset >= targets[tp]:
                            del targets[tp]
                    if targets:
                        await asyncio.sleep(DRAIN_INTERVAL)
        except TimeoutError:
            raise TimeoutError(
                f"{len(targets)} partition(s) still have uncommitted events after {timeout:g}s"
            ) from None
        finally:
            await admin.close()

    def backlog(self) -> dict[str, int]:
        """The consumer group's lag per ``"<topic>:<partition>"`` of the subscribed
        topics: records not yet handled (or handled, not yet committed) by any
        worker of the service.

        Cached for :data:`~eventbus.kafka.lag.BACKLOG_TTL` seconds; never
        blocks the event loop (on its thread it answers from the cache), and waits
        at most :data:`~eventbus.kafka.lag.BACKLOG_WAIT` seconds elsewhere.
        """
        group = self.group_id
        if group is None:
            return {}
        return self._lag_reader.read(group, self._topics)

    async def operations(self) -> Operations:
        """The service's consumer group: its members, their partitions and the lag
        per partition of this process's handlers' topics (see
        :mod:`eventbus.kafka.operations`)."""
        from eventbus.kafka.operations import read_operations

        if self.router is None:
            raise BackendError("backend not bound to a bus", backend=self.name)
        service = self.router.subscriptions.service
        return await read_operations(
            self.config,
            self.group_id or service,
            service,
            self.router.subscriptions.handlers(),
            self.address(),
        )

    def liveness(self) -> list[HealthResult]:
        """The dispatcher and, when this process consumes, the bridge's consumer task."""
        results = [dispatcher_liveness(self.name, self.dispatcher)]
        if self.consume:
            name = f"{self.name}-bridge"
            bridge = self.bridge
            task = bridge.task if bridge is not None else None
            if task is None:
                results.append(HealthResult(name, HealthStatus.UNHEALTHY, "not started"))
            elif task.done():
                reason = "cancelled" if task.cancelled() else repr(task.exception())
                detail = f"consumer task ended: {reason}"
                results.append(HealthResult(name, HealthStatus.UNHEALTHY, detail))
            else:
                results.append(HealthResult(name, HealthStatus.HEALTHY, "consumer task running"))
        return results

    def boot_worker_process(
        self, bus: HostedBus, worker: dramatiq.Worker | None = None
    ) -> StopWorker:
        """Run the bridge for ``bus`` on its own event loop and thread.

        Under ``dramatiq eventbus.actors`` the dramatiq Worker runs over the
        embedded broker, whose ``enqueue`` hands each message to this backend's
        dispatcher: handlers run on the bridge's loop (async ones) and in its
        thread pool of ``EVENTBUS_WORKER_THREADS`` (sync ones), with at most
        ``EVENTBUS_MAX_CONCURRENCY`` at once.  dramatiq's own ``--threads`` have no
        queue to consume and stay idle; ``--processes`` gives one consumer group
        member per process.  The bridge commits a record's offset once every
        handler of it finished, which a dramatiq worker thread could not promise.
        """
        from eventbus.kafka.worker import start_worker_thread

        logger.info(
            "Kafka: handlers run on the bridge's dispatcher (at most %d at once, %d threads "
            "for sync handlers: EVENTBUS_MAX_CONCURRENCY, EVENTBUS_WORKER_THREADS); "
            "dramatiq's --threads stay idle, each --processes is one consumer group member.",
            self.max_concurrency,
            self.worker_threads,
        )
        return start_worker_thread(bus)

    async def health(self) -> list[HealthResult]:
        """Producer reachability (``kafka``) and bridge liveness (``kafka-bridge``)."""
        return [await self._producer_health(), *self._bridge_health_list(await self._lag())]

    async def _producer_health(self) -> HealthResult:
        producer = self.producer
        if producer is None:
            return HealthResult(self.name, HealthStatus.UNHEALTHY, "not started")
        try:
            cluster = await asyncio.wait_for(producer.client.fetch_all_metadata(), HEALTH_TIMEOUT)
        except Exception as exc:
            return HealthResult(
                self.name,
                HealthStatus.UNHEALTHY,
                f"brokers unreachable: {type(exc).__name__}: {exc}",
            )
        brokers = len(cluster.brokers())
        return HealthResult(self.name, HealthStatus.HEALTHY, f"{brokers} broker(s) reachable")

    async def _lag(self) -> int | None:
        bridge = self.bridge
        if bridge is None:
            return None
        try:
            return await asyncio.wait_for(bridge.lag(), HEALTH_TIMEOUT)
        except Exception:
            return None

    def _bridge_health_list(self, lag: int | None) -> list[HealthResult]:
        name = f"{self.name}-bridge"
        if not self.consume:
            return []
        bridge = self.bridge
        if bridge is None or bridge.task is None:
            return [HealthResult(name, HealthStatus.UNHEALTHY, "not started")]
        task = bridge.task
        if task.done():
            reason = "cancelled" if task.cancelled() else repr(task.exception())
            return [HealthResult(name, HealthStatus.UNHEALTHY, f"consumer task ended: {reason}")]
        if bridge.error is not None:
            detail = f"reconnecting after {bridge.error} ({bridge.reconnects} reconnect(s))"
            return [HealthResult(name, HealthStatus.UNHEALTHY, detail)]
        if not self._topics():
            return [HealthResult(name, HealthStatus.HEALTHY, "idle: no subscribed topics")]
        now = time.monotonic()
        age = now - bridge.last_poll if bridge.last_poll else None
        stale = max(STALE_POLL, self.session_timeout_ms / 1000)
        parts = [
            f"group {self.group_id}",
            f"{len(bridge.assignment)} partition(s) assigned",
            f"last poll {age:.1f}s ago" if age is not None else "no poll yet",
            f"{bridge.in_flight} record(s) in flight",
        ]
        paused = bridge.paused
        if paused:
            parts.append(f"{len(paused)} partition(s) paused (handlers stuck)")
        if lag is not None:
            parts.append(f"lag {lag}")
        detail = ", ".join(parts)
        if age is not None and age > stale:
            return [HealthResult(name, HealthStatus.UNHEALTHY, f"consumer stalled: {detail}")]
        failing = self.dead_letters.failing_writes()
        if failing:
            first = failing[0]
            more = f" (and {len(failing) - 1} more)" if len(failing) > 1 else ""
            problem = (
                f"dead letter {first.record_id} to {first.topic} not written after "
                f"{first.attempts} attempt(s) in {now - first.since:.0f}s{more}: "
                f"{first.error}; its partition cannot commit past it"
            )
            return [HealthResult(name, HealthStatus.DEGRADED, f"{problem}; {detail}")]
        return [HealthResult(name, HealthStatus.HEALTHY, detail)]


__all__ = ["KafkaBackend"]
