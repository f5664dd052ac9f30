"""The Redis backend (``EVENTBUS_BACKEND=redis``): durable fan-out to worker processes.

The web process publishes; ``dramatiq eventbus.actors`` worker processes run the
handlers.  The subscriptions live in Redis: each worker writes those of its
handlers when it boots, and they outlive it.  ``publish`` hands Redis the event
once; a script fans it out to every subscription of its topic (of every
service), all or none, in one round trip, so a publisher needs the event
classes only, never the handlers::

    bus = EventBus(backend=RedisBackend(url="redis://localhost:6379/0"))

    # in another shell (or the Procfile's ``worker`` process):
    #   EVENTBUS_BACKEND=redis dramatiq eventbus.actors myapp.handlers

Each handler of a topic gets its own message, so a failing handler is retried
alone, and nothing is lost when either side dies: events published while no
worker runs wait in Redis for every subscription.  A *service*
(``EVENTBUS_SERVICE``) scopes subscriptions and queues (``<service>.<queue>``):
two services on one Redis each get every event of the topics they subscribe to.

The worker side (blocking fetches, heartbeats, recovery of dead workers' events
within ``redelivery_timeout``) is :mod:`eventbus.redis.broker`; the key
layout and scripts are :mod:`eventbus.redis.scripts`; subscriptions are
:mod:`eventbus.redis.subscriptions`.
"""

from __future__ import annotations

from eventbus.extras import requires_extra

with requires_extra("redis", __name__):
    import redis

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

import dramatiq
from dramatiq import Middleware
from dramatiq.middleware import TimeLimit
from pydantic_core import from_json, to_json

import eventbus.redis.memory as memory
import eventbus.redis.scripts as lua
import eventbus.redis.subscriptions as subs
from eventbus.backends.base import (
    WORKER_STOP_MARGIN,
    Backend,
    HostedBus,
    Operations,
    OutgoingEvent,
    StopWorker,
    replay_message,
)
from eventbus.config import (
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_REDIS_MAX_CONNECTIONS,
    DEFAULT_REDIS_MIN_REPLICAS,
    DEFAULT_REDIS_NAMESPACE,
    DEFAULT_REDIS_PUBLISH_TIMEOUT,
    DEFAULT_REDIS_REDELIVERY_TIMEOUT,
    DEFAULT_REDIS_REPLICA_FSYNC,
    DEFAULT_REDIS_REPLICA_TIMEOUT,
    DEFAULT_REDIS_UNROUTED_MAX_BYTES,
    DEFAULT_REDIS_UNROUTED_MAX_EVENTS,
    DEFAULT_REDIS_UNROUTED_RETENTION,
    DEFAULT_REDIS_UNROUTED_WARMUP,
    DEFAULT_REDIS_URL,
    DEFAULT_REDIS_WORKER,
    DEFAULT_SCHEMA_CHECK,
    DEFAULT_WORKER_THREADS,
    SchemaCheckMode,
)
from eventbus.exceptions import BackendError, ConfigurationError, PublishError, UnroutedError
from eventbus.health import HealthResult, HealthStatus
from eventbus.middleware.event_loop import DaemonAsyncIO
from eventbus.middleware.metrics import Metrics
from eventbus.redact import redact_url
from eventbus.redis.broker import (
    BEATS_PER_TIMEOUT,
    HEARTBEAT_TIMEOUT_SHARE,
    WORKER_SOCKET_TIMEOUT,
    ReliableRedisBroker,
)
from eventbus.redis.checks import (
    check_at_boot,
    published_topics,
    published_topics_key,
    suspect_topics,
)
from eventbus.redis.limits import ConcurrencyLimits
from eventbus.redis.messages import InvalidMessage, encode_message, message_problem
from eventbus.redis.resp import (
    Command,
    PrimaryNotFound,
    RespClient,
    RespConnectionError,
    RespError,
    RespReplyLost,
)
from eventbus.redis.schemas import PublishCheck, read_schemas
from eventbus.redis.scripts import service_of
from eventbus.redis.sentinel import is_sentinel_url, parse_sentinel_url, sentinel_client
from eventbus.redis.worker import RedisWorkerLoop, worker_queues
from eventbus.routing import Router, Subscriptions

if TYPE_CHECKING:
    from eventbus.config import EventBusSettings
    from eventbus.dlq.records import FailedEvent
    from eventbus.dlq.store import DeadLetterStore
    from eventbus.registry import HandlerSpec

__all__ = [
    "InvalidMessage",
    "RedisBackend",
    "ReliableRedisBroker",
    "encode_message",
    "message_problem",
]

logger = logging.getLogger(__name__)

#: Seconds between ``drain()`` polls.
DRAIN_POLL_INTERVAL = 0.01
#: Bytes of events one script call carries at most (8 MiB).  A larger publish is
#: sent in chunks of at most this size to a staging list and committed by one
#: small call, still all or none: each call finishes well within the publish
#: timeout, however many megabytes ``publish_many`` is given.
MAX_CALL_BYTES = 8 * 1024 * 1024
#: Milliseconds a staged (chunked) publish may wait for its commit before Redis
#: deletes it: leftovers of a publish that failed midway do not stay.
STAGE_TTL_MS = 300_000
#: Bytes counted per event on top of its envelope, options and topic (entry id,
#: framing).
EVENT_OVERHEAD_BYTES = 64
#: Seconds between two warnings about unrouted events dropped from the same topic.
DROP_WARNING_INTERVAL = 60.0
#: First Redis version with ``WAITAOF`` (the replicas' fsync), as (major, minor).
WAITAOF_VERSION = (7, 2)
#: Seconds health reports ``redis.unrouted`` degraded after events were dropped
#: from the unrouted window (an hour: any probe interval sees it).
DROP_HEALTH_SECONDS = 3600.0
#: Seconds since a replica's last acknowledgement (``lag`` in ``INFO replication``)
#: after which health no longer counts it in sync (replicas acknowledge every second).
REPLICA_HEALTH_MAX_LAG = 3


class RedisBackend(Backend):
    """Durable delivery through Redis to ``dramatiq eventbus.actors`` workers.

    Parameters:
      url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` or ``unix://``.
      max_connections: Connections the publishing client may open per event loop.
      namespace: Prefix of every Redis key; buses sharing it share subscriptions.
      redelivery_timeout: Seconds within which the in-flight events of a worker
        that died (SIGKILL, OOM, lost host) are handed to another worker.  A live
        worker is never declared dead, however long its handlers run.
      publish_timeout: Seconds ``publish`` may take (connect included) before it
        raises :class:`~eventbus.exceptions.PublishError`.
      worker_threads: Threads of the dramatiq Worker this backend runs when a bus
        consumes in its own process (``EVENTBUS_CONSUME=true``).
      worker: How ``dramatiq eventbus.actors`` runs handlers: ``"loop"`` (the
        default) on one event loop that also takes the events from Redis
        (:mod:`eventbus.redis.worker`), ``"threads"`` on dramatiq's worker threads.
      max_concurrency: With ``worker="loop"``: handlers running at once per worker
        process, at most ``--threads`` (as on dramatiq's worker: ``-t 1`` handles the
        events of a queue one at a time, in order).
      unrouted_retention: Seconds an event published to a topic without a
        subscription is kept for the subscription written next (0: dropped at
        once, counted).  See ``docs/redis.md``, "Unrouted events".
      unrouted_max_events, unrouted_max_bytes: Most events and bytes kept per
        topic for subscriptions not written yet; the oldest are dropped first.
      unrouted_warmup: Seconds after a topic's first subscription during which all
        of its events are kept for the other services' subscriptions written next.
      min_replicas: Replicas that must acknowledge each publish before it returns
        (Redis ``WAIT``, in the same round trip as the fan-out); fewer within
        ``replica_timeout`` seconds raise :class:`~eventbus.exceptions.PublishError`
        (the events are on the primary: they may still be delivered).  0: the
        primary's answer is enough.  See ``docs/redis.md``, "Replica acknowledgements".
      replica_timeout: Seconds to wait for them; under ``publish_timeout``.
      replica_fsync: Wait until the replicas wrote the events to their append-only
        file (``WAITAOF``, Redis 7.2+) rather than until they received them.
      schema_check: What a publish does when a live subscriber's stored schema
        would reject its event class (checked once per class and topic, see
        :mod:`eventbus.redis.schemas`): ``"off"``, ``"warn"`` (log once per class
        and subscriber, count each event) or ``"error"`` (raise
        :class:`~eventbus.contracts.live.SchemaMismatchError`, nothing published).

    Example::

        bus = EventBus(backend=RedisBackend(url="redis://localhost:6379/0"))
    """

    name = "redis"

    def __init__(
        self,
        url: str = DEFAULT_REDIS_URL,
        *,
        max_connections: int = DEFAULT_REDIS_MAX_CONNECTIONS,
        namespace: str = DEFAULT_REDIS_NAMESPACE,
        redelivery_timeout: float = DEFAULT_REDIS_REDELIVERY_TIMEOUT,
        publish_timeout: float = DEFAULT_REDIS_PUBLISH_TIMEOUT,
        worker_threads: int = DEFAULT_WORKER_THREADS,
        unrouted_retention: float = DEFAULT_REDIS_UNROUTED_RETENTION,
        unrouted_max_events: int = DEFAULT_REDIS_UNROUTED_MAX_EVENTS,
        unrouted_max_bytes: int = DEFAULT_REDIS_UNROUTED_MAX_BYTES,
        unrouted_warmup: float = DEFAULT_REDIS_UNROUTED_WARMUP,
        min_replicas: int = DEFAULT_REDIS_MIN_REPLICAS,
        replica_timeout: float = DEFAULT_REDIS_REPLICA_TIMEOUT,
        replica_fsync: bool = DEFAULT_REDIS_REPLICA_FSYNC,
        schema_check: SchemaCheckMode = DEFAULT_SCHEMA_CHECK,
        worker: Literal["loop", "threads"] = DEFAULT_REDIS_WORKER,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    ) -> None:
        if worker not in ("loop", "threads"):
            raise ConfigurationError(
                f"invalid worker {worker!r}: loop or threads (EVENTBUS_REDIS_WORKER)"
            )
        #: How ``dramatiq eventbus.actors`` runs handlers (``EVENTBUS_REDIS_WORKER``).
        self.worker_mode = worker
        self.max_concurrency = max_concurrency
        #: The unrouted window (see ``docs/redis.md``).
        self.retention = subs.UnroutedRetention(
            unrouted_retention, unrouted_max_events, unrouted_max_bytes, unrouted_warmup
        )
        self._drops_warned: dict[str, float] = {}
        if redelivery_timeout <= 0 or publish_timeout <= 0:
            raise ConfigurationError("redelivery_timeout and publish_timeout must be > 0")
        if min_replicas < 0 or (min_replicas and not 0 < replica_timeout < publish_timeout):
            raise ConfigurationError(
                f"min_replicas={min_replicas}, replica_timeout={replica_timeout:g}: "
                "min_replicas must be >= 0 and replica_timeout > 0 and under "
                f"publish_timeout={publish_timeout:g} (the replicas' wait is part of the "
                "publish call)"
            )
        if (
            not namespace
            or ":" in namespace
            or "{" in namespace
            or namespace != "".join(namespace.split())
        ):
            raise ConfigurationError(
                f"invalid Redis namespace {namespace!r}: no ':', '{{' or whitespace"
            )
        #: The bounds of the unrouted window, as the publish script reads them.
        self._window_arg = " ".join(str(n) for n in self.retention.args()[:3]).encode()
        try:
            RespClient.from_url(url)
        except ValueError as exc:
            raise ConfigurationError(f"invalid EVENTBUS_REDIS_URL: {exc}") from None
        self.url = url
        self.max_connections = max_connections
        self.namespace = namespace
        self.redelivery_timeout = redelivery_timeout
        self.publish_timeout = publish_timeout
        self.worker_threads = worker_threads
        self.min_replicas = min_replicas
        self.replica_timeout = replica_timeout
        self.replica_fsync = replica_fsync
        if schema_check not in ("off", "warn", "error"):
            raise ConfigurationError(
                f"invalid schema_check {schema_check!r}: off, warn or error (EVENTBUS_SCHEMA_CHECK)"
            )
        #: The check of published classes against live subscriber schemas
        #: (``EVENTBUS_SCHEMA_CHECK``; :mod:`eventbus.redis.schemas`).
        self.schema_check = PublishCheck(namespace, schema_check)
        #: The command sent after each fan-out call (``WAIT``/``WAITAOF``), once known.
        self._replica_wait: Command | None = None
        #: Topics this process noted in ``{ns}:ptopics`` (published topics, for the
        #: mistyped-topic check of :mod:`eventbus.redis.checks`).
        self._noted_topics: set[str] = set()
        self._noting: set[asyncio.Task[None]] = set()
        #: Seconds of silence after which a worker is declared dead.
        self.heartbeat_timeout = redelivery_timeout * HEARTBEAT_TIMEOUT_SHARE
        #: Seconds between a worker's heartbeats (and recovery passes).
        self.heartbeat_interval = self.heartbeat_timeout / BEATS_PER_TIMEOUT
        #: Start a dramatiq Worker when the bus consumes in this process.  The
        #: worker entry point (``dramatiq eventbus.actors``) turns it off: the
        #: dramatiq CLI runs the Worker there.
        self.runs_worker = True
        self.broker: ReliableRedisBroker | None = None
        self.router: Router | None = None
        self.subscriptions: Subscriptions | None = None
        self.worker: dramatiq.Worker | None = None
        self._sync_client: redis.Redis | None = None
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, RespClient] = (
            weakref.WeakKeyDictionary()
        )
        self._groups: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Group] = (
            weakref.WeakKeyDictionary()
        )

    @classmethod
    def from_settings(cls, settings: EventBusSettings) -> RedisBackend:
        """The backend the ``EVENTBUS_REDIS_*`` settings describe."""
        return cls(
            url=settings.redis_url,
            max_connections=settings.redis_max_connections,
            namespace=settings.redis_namespace,
            redelivery_timeout=settings.redis_redelivery_timeout,
            publish_timeout=settings.redis_publish_timeout,
            worker_threads=settings.worker_threads,
            unrouted_retention=settings.redis_unrouted_retention,
            unrouted_max_events=settings.redis_unrouted_max_events,
            unrouted_max_bytes=settings.redis_unrouted_max_bytes,
            unrouted_warmup=settings.redis_unrouted_warmup,
            min_replicas=settings.redis_min_replicas,
            replica_timeout=settings.redis_replica_timeout,
            replica_fsync=settings.redis_replica_fsync,
            schema_check=settings.schema_check,
            worker=settings.redis_worker,
            max_concurrency=settings.max_concurrency,
        )

    # -- clients ----------------------------------------------------------------------

    @property
    def sync_client(self) -> redis.Redis:
        """The synchronous client of workers, retries and the dead-letter store."""
        if self._sync_client is None:
            options: dict[str, Any] = {
                "socket_timeout": WORKER_SOCKET_TIMEOUT,
                "socket_connect_timeout": self.publish_timeout,
                "health_check_interval": 30,
            }
            if not self.url.startswith("unix:"):
                # TCP only: redis-py's Unix socket connection refuses the option.
                options["socket_keepalive"] = True
            if is_sentinel_url(self.url):
                # Asks the sentinels on every new connection; a demoted primary's
                # READONLY closes the connection, so the next command finds the new one.
                self._sync_client = sentinel_client(parse_sentinel_url(self.url), **options)
            else:
                self._sync_client = redis.Redis.from_url(self.url, **options)
        return self._sync_client

    def _client(self) -> RespClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = RespClient.from_url(
                self.url, timeout=self.publish_timeout, max_connections=self.max_connections
            )
            self._clients[loop] = client
        return client

    async def _script(self, script: str, args: list[Any]) -> Any:
        return (await self._script_then(script, args))[0]

    async def _script_then(
        self, script: str, args: list[Any], then: tuple[Command, ...] = ()
    ) -> list[Any]:
        """Run ``script``, and the commands ``then`` right after it in the same write
        (one round trip); returns the script's reply followed by theirs (error
        replies of ``then`` as RespError instances)."""
        client = self._client()
        sha = _sha1(script)
        replies = await client.execute([("EVALSHA", sha, 0, *args), *then])
        if isinstance(replies[0], RespError) and str(replies[0]).startswith("NOSCRIPT"):
            replies = await client.execute([("EVAL", script, 0, *args), *then])
        if isinstance(replies[0], RespError):
            raise replies[0]
        return replies

    # -- Backend hooks ----------------------------------------------------------------

    def bind(self, middleware: list[Middleware], subscriptions: Subscriptions) -> dramatiq.Broker:
        if self.broker is None:
            worker_middleware: list[Middleware] = [
                DaemonAsyncIO(),
                TimeLimit(time_limit=float("inf")),
            ]
            self.broker = ReliableRedisBroker(
                self.sync_client,
                # Limits first: an event without a free slot is put back before any
                # other middleware counts or traces an attempt.
                middleware=[ConcurrencyLimits(), *middleware, *worker_middleware],
                namespace=self.namespace,
                heartbeat_timeout=self.heartbeat_timeout,
                heartbeat_interval=self.heartbeat_interval,
                retention=self.retention,
            )
            self.subscriptions = subscriptions
            for item in middleware:  # the bus's collector counts schema mismatches
                if isinstance(item, Metrics):
                    self.schema_check.metrics = item.collector
            self.router = Router(subscriptions, self.broker, self._queue_of, self._actor_options)
        return self.broker

    def _queue_of(self, spec: HandlerSpec) -> str:
        assert self.subscriptions is not None
        return f"{self.subscriptions.service}.{self.subscriptions.queue_of(spec)}"

    @staticmethod
    def _actor_options(spec: HandlerSpec) -> dict[str, Any]:
        if spec.time_limit is None:
            return {}
        return {"time_limit": int(spec.time_limit * 1000)}

    def _require_broker(self) -> ReliableRedisBroker:
        if self.broker is None:
            raise BackendError("backend not bound to a bus", backend=self.name)
        return self.broker

    def register_subscriptions(self) -> list[str]:
        """Declare the bus's handlers on the broker and write their subscriptions to
        Redis (idempotent; blocking).  Returns the subscription names."""
        broker = self._require_broker()
        assert self.router is not None and self.subscriptions is not None
        self.router.declare()
        return broker.write_subscriptions(self.subscriptions.service)

    async def start(self, consume: bool) -> None:
        broker = self._require_broker()
        try:
            await self._client().call("PING")
        except (RespConnectionError, RespError) as exc:
            if not consume:
                logger.warning(
                    "Redis is not reachable yet (%s); publishing will fail until it is.", exc
                )
        else:  # an eviction policy that would drop queued events: say so now
            await memory.check_policy(self._client(), self.address())
        if self.min_replicas and self.replica_fsync:
            # A server without WAITAOF fails the start (ConfigurationError); one not
            # reachable yet is asked at the first publish.
            with contextlib.suppress(PublishError):
                self._replica_wait = await self._replica_command_of_server()
        if not consume:
            return
        try:
            fields = await asyncio.to_thread(self.register_subscriptions)
        except redis.RedisError as exc:
            raise BackendError(
                f"cannot write subscriptions to Redis: {exc}", backend=self.name
            ) from exc
        logger.info(
            "Subscribed %d handler(s) as service %s.",
            len(fields),
            self.subscriptions.service if self.subscriptions else "?",
        )
        if self.subscriptions is not None:  # warn about subscriptions nobody serves
            await asyncio.to_thread(
                check_at_boot,
                broker.client,
                self.namespace,
                self.subscriptions.service,
                fields,
                broker.heartbeat_timeout,
            )
        if self.runs_worker and self.worker is None and fields:
            worker = dramatiq.Worker(broker, worker_threads=self.worker_threads)
            broker.emit_after("process_boot")  # only the dramatiq CLI emits it otherwise
            await asyncio.to_thread(worker.start)
            self.worker = worker

    async def stop(self, timeout: float) -> None:
        worker, self.worker = self.worker, None
        if worker is not None:
            await asyncio.to_thread(worker.stop, int(timeout * 1000))
            if self.broker is not None:
                self.broker.release()
        for task in list(self._noting):  # a topic note still in flight: not needed now
            task.cancel()
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.close()

    async def publish(self, events: list[OutgoingEvent], *, strict: bool = False) -> set[str]:
        """Hand ``events`` to the fan-out script (see the class docstring).

        Concurrent callers are grouped: while one script call is in flight on this
        event loop, the events of other callers wait and go together in the next
        call (group commit), so 64 concurrent publishers cost a few round trips,
        not 64, and a lone caller never waits for a batch to fill.  When Redis
        refuses a grouped call (a corrupt key of one topic's subscription), each
        caller's events are tried on their own: only the callers of the bad topic
        fail.  A call over :data:`MAX_CALL_BYTES` is sent in bounded chunks and
        committed at once (all or none).

        Raises:
          PublishError: Nothing was published (Redis unreachable, or it refused
            the events: the message says why); or the request was sent and no
            answer came in time: the message then says the events *may* have been
            published (publishing them again can deliver them twice).
            With ``min_replicas``, fewer replicas acknowledged the call in time:
            the message says the events are on the primary and may still be
            delivered (at least once).
          UnroutedError: ``strict`` and a topic has no subscription; nothing published.
        """
        args: list[Any] = []
        size = 0
        now_ms = int(time.time() * 1000)
        for outgoing in events:
            envelope = outgoing.envelope
            _check_envelope(envelope, outgoing)
            options = to_json(outgoing.options)
            topic = outgoing.event.topic
            args.append(topic)
            args.append(envelope)
            args.append(options)
            delay = outgoing.delay_ms(now_ms)
            # "<base>@<ms>": the script puts it in the delayed sets (Redis clock).
            args.append(f"{os.urandom(8).hex()}@{delay}" if delay else os.urandom(8).hex())
            size += len(envelope) + len(options) + len(topic) + EVENT_OVERHEAD_BYTES
        if self.schema_check.mode != "off":  # a dict lookup per event, once checked
            await self._check_schemas(events)
        topics = {outgoing.event.topic for outgoing in events}
        if not topics <= self._noted_topics:  # once per topic per process, off the path
            self._note_topics(topics - self._noted_topics)
        if strict:
            return await self._fan_out(args, size, strict=True)
        group = self._groups.get(asyncio.get_running_loop())
        if group is None:
            group = self._groups[asyncio.get_running_loop()] = _Group()
        if group.busy:
            waiter: asyncio.Future[set[str]] = asyncio.get_running_loop().create_future()
            group.args.extend(args)
            group.size += size
            group.waiters.append(_Waiter(waiter, topics, args, size))
            return await waiter
        group.busy = True
        try:
            return await self._fan_out(args, size)
        finally:
            self._next_round(group)

    async def _check_schemas(self, events: list[OutgoingEvent]) -> None:
        """Check the events' classes against the schemas their topics' live
        subscribers stored (:class:`~eventbus.redis.schemas.PublishCheck`): Redis is
        asked only for a class and topic without a fresh verdict."""

        async def call(*command: Any) -> Any:
            return await self._client().call(*command)

        try:
            await self.schema_check.check((o.event for o in events), self._script, call)
        except (RespConnectionError, RespError, OSError, TimeoutError) as exc:
            if self.schema_check.mode == "error":  # refusing what cannot be checked
                raise PublishError(
                    f"could not read the subscribers' schemas from Redis: {exc}; nothing "
                    "was published (EVENTBUS_SCHEMA_CHECK=error)"
                ) from exc
            # warn: the check is advice; the publish goes on and, if Redis is really
            # unreachable, fails with its own error (which says what may have happened).
            logger.debug("Schema check skipped: the subscribers' schemas unreadable (%s)", exc)

    def _note_topics(self, topics: set[str]) -> None:
        """Record, in the background, that this process publishes to ``topics`` (one
        HSET per topic per process, ever; publish never waits for it): what tells a
        mistyped subscription topic from a real one (:mod:`eventbus.redis.checks`).
        Best effort: a failure is retried at the next publish of the topic."""
        self._noted_topics |= topics
        args: list[Any] = [published_topics_key(self.namespace)]
        for topic in sorted(topics):
            args += [topic, str(int(time.time() * 1000))]

        async def note() -> None:
            try:
                await asyncio.wait_for(self._client().call("HSET", *args), self.publish_timeout)
            except (RespError, RespConnectionError, OSError, TimeoutError) as exc:
                self._noted_topics -= topics
                logger.debug("Could not note the published topics %s: %s", sorted(topics), exc)

        task = asyncio.get_running_loop().create_task(note())
        self._noting.add(task)
        task.add_done_callback(self._noting.discard)

    def _next_round(self, group: _Group) -> None:
        if not group.waiters:
            group.busy = False
            return
        args, size, waiters = group.args, group.size, group.waiters
        group.args, group.size, group.waiters = [], 0, []
        task = asyncio.get_running_loop().create_task(self._round(group, args, size, waiters))
        group.tasks.add(task)
        task.add_done_callback(group.tasks.discard)

    async def _round(
        self, group: _Group, args: list[Any], size: int, waiters: list[_Waiter]
    ) -> None:
        try:
            unrouted = await self._fan_out(args, size)
        except _Refused:
            # Nothing of the round was written (the script checks every key before
            # its first write): find whose events Redis refuses, caller by caller.
            for waiter in waiters:
                try:
                    mine = await self._fan_out(waiter.args, waiter.size)
                except PublishError as exc:
                    waiter.fail(exc)
                else:
                    waiter.succeed(mine & waiter.topics)
        except PublishError as exc:
            for waiter in waiters:
                waiter.fail(exc)
        except BaseException as exc:
            failure = PublishError(
                f"publishing was interrupted ({type(exc).__name__}) after the event(s) "
                "were handed to Redis: they may have been published"
            )
            for waiter in waiters:
                waiter.fail(failure)
            raise
        else:
            for waiter in waiters:
                waiter.succeed(unrouted & waiter.topics)
        finally:
            self._next_round(group)

    async def _fan_out(self, args: list[Any], size: int, *, strict: bool = False) -> set[str]:
        stage = ""
        if size > MAX_CALL_BYTES:
            stage = await self._stage(args)
            args = []
        head: list[Any] = [
            self.namespace,
            "1" if strict else "0",
            int(time.time() * 1000),
            stage,
            self._window_arg,
        ]
        then = (await self._replica_command(),) if self.min_replicas else ()
        try:
            reply, *waited = await self._script_then(lua.PUBLISH, head + args, then)
        except RespReplyLost as exc:
            raise PublishError(
                f"could not publish to Redis: {exc}. The request was sent, so the event(s) "
                "may have been published: publishing them again can deliver them twice "
                "(handlers see the same event id)"
            ) from exc
        except RespConnectionError as exc:
            raise PublishError(f"could not publish to Redis: {exc}; nothing was published") from exc
        except RespError as exc:
            if stage:  # nothing of it was published: free its staged chunks now
                await memory.forget(self._client(), stage)
            raise _Refused(memory.refusal(exc)) from exc
        count = reply[1]
        unrouted = {topic.decode() for topic in reply[2 : 2 + count]}
        if reply[0] == 0:
            raise UnroutedError(
                f"no subscription handles topic(s) {', '.join(sorted(unrouted))} in Redis; "
                "nothing was published",
                sorted(unrouted),
            )
        if len(reply) > 2 + count:
            self._dropped(reply[2 + count :])
        if waited:
            self._check_replicas(waited[0])
        return unrouted

    async def _replica_command(self) -> Command:
        """``WAIT n ms``, or ``WAITAOF 0 n ms`` when the replicas' fsync is asked for
        and the server has it (its version is read once, at start or here)."""
        if self._replica_wait is None:
            try:
                self._replica_wait = await self._replica_command_of_server()
            except ConfigurationError as exc:
                raise PublishError(f"{exc}; nothing was published") from None
        return self._replica_wait

    async def _replica_command_of_server(self) -> Command:
        """The replicas' wait command for the server; raises ConfigurationError when
        ``replica_fsync`` is asked of a server without ``WAITAOF``, PublishError when
        the server cannot be asked."""
        ms = max(1, math.ceil(self.replica_timeout * 1000))
        if not self.replica_fsync:
            return ("WAIT", self.min_replicas, ms)
        try:
            info = await self._client().call("INFO", "server")
        except (RespConnectionError, RespError) as exc:
            raise PublishError(
                f"could not read the Redis server's version: {exc}; nothing was published"
            ) from exc
        version = _server_version(info)
        if version is None or version[:2] < WAITAOF_VERSION:
            shown = ".".join(map(str, version)) if version else "an unknown version"
            raise ConfigurationError(
                f"EVENTBUS_REDIS_REPLICA_FSYNC=true needs Redis "
                f"{'.'.join(map(str, WAITAOF_VERSION))} or later (WAITAOF); the server at "
                f"{self.address()} runs {shown}: upgrade it, or set "
                "EVENTBUS_REDIS_REPLICA_FSYNC=false to wait for the replicas' receipt (WAIT)"
            )
        return ("WAITAOF", 0, self.min_replicas, ms)

    def _check_replicas(self, reply: Any) -> None:
        """Raise PublishError unless ``min_replicas`` replicas acknowledged the call
        (``WAIT`` answers their count, ``WAITAOF`` [local fsyncs, replica fsyncs])."""
        what = "received" if not self.replica_fsync else "wrote to disk"
        if isinstance(reply, RespError):
            problem = f"Redis could not count the replicas that {what} them: {reply}"
        else:
            acked = int(reply[1] if isinstance(reply, list) else reply)
            if acked >= self.min_replicas:
                return
            problem = (
                f"only {acked} replica(s) {what} them within {self.replica_timeout:g}s, "
                f"{self.min_replicas} required (EVENTBUS_REDIS_MIN_REPLICAS)"
            )
        raise PublishError(
            f"the event(s) were written on the Redis primary but {problem}: they may still "
            "be delivered (at least once), or be lost if the primary fails before its "
            "replicas have them. Publishing them again can deliver them twice (handlers "
            "see the same event id); check the replicas (INFO replication)"
        )

    async def _stage(self, args: list[Any]) -> str:
        """Send the events of ``args`` (4 items each) in chunks of at most
        :data:`MAX_CALL_BYTES` to a staging list; returns its key.  Nothing is
        published until the commit call."""
        stage = f"{self.namespace}:stage:{uuid.uuid4().hex}"
        client = self._client()
        chunk: list[Any] = []
        chunk_size = 0
        for i in range(0, len(args), 4):
            event = args[i : i + 4]
            event_size = sum(len(part) for part in event) + EVENT_OVERHEAD_BYTES
            if chunk and chunk_size + event_size > MAX_CALL_BYTES:
                await self._push_chunk(client, stage, chunk)
                chunk, chunk_size = [], 0
            chunk.extend(event)
            chunk_size += event_size
        await self._push_chunk(client, stage, chunk)
        return stage

    @staticmethod
    async def _push_chunk(client: RespClient, stage: str, chunk: list[Any]) -> None:
        try:
            replies = await client.execute(
                [("RPUSH", stage, *chunk), ("PEXPIRE", stage, STAGE_TTL_MS)]
            )
        except RespConnectionError as exc:
            raise PublishError(
                f"could not publish to Redis: {exc}; nothing was published (only a part "
                "was staged, and Redis deletes it)"
            ) from exc
        for reply in replies:
            if isinstance(reply, RespError):
                await memory.forget(client, stage)  # the chunks staged before it, at once
                raise PublishError(f"{memory.refusal(reply)}; nothing was published")

    def _dropped(self, pairs: list[Any]) -> None:
        """Warn (at most once a minute per topic) about events the publish script
        dropped from the unrouted window."""
        now = time.monotonic()
        due = []
        for i in range(0, len(pairs) - 1, 2):
            topic = pairs[i].decode()
            last = self._drops_warned.get(topic)
            if last is None or now - last >= DROP_WARNING_INTERVAL:
                self._drops_warned[topic] = now
                due += [pairs[i], pairs[i + 1]]
        if due:
            subs.log_dropped(due, self.retention)

    def replay(self, record: FailedEvent, handler: str | None = None) -> None:
        """Enqueue ``record``'s event for its handler (or ``handler``, another
        handler of its topic in its service: a renamed one), retries reset.

        Raises:
          BackendError: That handler has no subscription to the topic in the
            service (removed, or not deployed yet); the record stays.
        """
        broker = self._require_broker()
        queue, refusal = self._replay_queue(record, handler)
        if queue is None:
            raise BackendError(f"{refusal}; the dead letter stays", backend=self.name)
        broker.enqueue(replay_message(record, queue, handler))

    def replay_refusal(self, record: FailedEvent, handler: str | None = None) -> str | None:
        return self._replay_queue(record, handler)[1] or None

    def replay_refusals(
        self, records: Sequence[FailedEvent], handler: str | None = None
    ) -> list[str | None]:
        """One HEXISTS per distinct (service, topic, handler) of ``records``, pipelined."""
        fields = {
            r.id: lua.subscription_field(service_of(r.queue), r.topic, handler or r.handler)
            for r in records
        }
        distinct = sorted(set(fields.values()))
        with self.sync_client.pipeline(transaction=False) as pipe:
            for field in distinct:
                pipe.hexists(f"{self.namespace}:subs", field)
            found = dict(zip(distinct, pipe.execute(), strict=True))
        reasons: dict[str, str | None] = {}  # one message per missing subscription
        for r in records:
            field = fields[r.id]
            if field not in reasons:
                reasons[field] = None if found[field] else self.replay_refusal(r, handler)
        return [reasons[fields[r.id]] for r in records]

    def _replay_queue(self, record: FailedEvent, handler: str | None) -> tuple[str | None, str]:
        """The queue a replay of ``record`` to ``handler`` goes to, or None and why not."""
        service = service_of(record.queue)
        name = handler or record.handler
        field = lua.subscription_field(service, record.topic, name)
        raw = self.sync_client.hget(f"{self.namespace}:subs", field)
        if raw is None:
            return None, (
                f"handler {name!r} has no subscription to {record.topic!r} in service "
                f"{service!r} (removed{', or renamed' if handler is None else ''}?)"
            )
        if handler is None:
            return record.queue, ""
        return str(json.loads(raw)["queue"]), ""

    def replay_targets(self, record: FailedEvent) -> list[str] | None:
        prefix = lua.subscription_field(service_of(record.queue), record.topic, "").encode()
        fields = cast(list[bytes], self.sync_client.hkeys(f"{self.namespace}:subs"))
        names = (f[len(prefix) :] for f in fields if f.startswith(prefix))
        return sorted(n.decode() for n in names if b"|" not in n)  # not a topic "a|b"

    async def pending(self) -> int:
        """Events not handled yet in every subscription's queue: ready, delayed,
        parked or in flight."""
        return int(await self._script(lua.PENDING, [self.namespace]))

    async def drain(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = await self.pending()
            if not left:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{left} event deliveries still pending after {timeout:g}s")
            await asyncio.sleep(DRAIN_POLL_INTERVAL)

    def subscription_list(self) -> list[subs.Subscription]:
        """Every subscription in this namespace, with backlog and live workers (blocking)."""
        return subs.list_subscriptions(self.sync_client, self.namespace, self.heartbeat_timeout)

    def stored_schemas(self, hashes: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The event schemas subscriptions stored, by hash (one ``HMGET``)."""
        return read_schemas(self.sync_client, self.namespace, hashes)

    def subscription_warnings(self) -> list[str]:
        """Subscribed topics that look mistyped (see :mod:`eventbus.redis.checks`)."""
        rows = subs.list_subscriptions(self.sync_client, self.namespace, self.heartbeat_timeout)
        published = published_topics(self.sync_client, self.namespace)
        return [suspect.message() for suspect in suspect_topics(rows, published)]

    def remove_subscription(
        self, service: str, topic: str, handler: str, dead_letters: DeadLetterStore | None
    ) -> int | None:
        """Remove a subscription from this namespace and dead-letter the events
        waiting for it (blocking; see :func:`eventbus.redis.subscriptions.remove_subscription`).
        Returns how many, or None when there was no such subscription."""
        return subs.remove_subscription(
            self.sync_client, self.namespace, service, topic, handler, dead_letters
        )

    def subscriptions_home(self) -> str:
        return f"in Redis at {self.address()}, namespace {self.namespace}"

    def address(self) -> str:
        """The Redis URL, password hidden."""
        return redact_url(self.url)

    def unreachable(self, exc: BaseException) -> bool:
        return super().unreachable(exc) or isinstance(
            exc, redis.ConnectionError | redis.TimeoutError
        )

    def liveness(self) -> list[HealthResult]:
        """The in-process worker (``EVENTBUS_CONSUME=true``), if this process runs one."""
        if self.worker is None:
            return [HealthResult(self.name, HealthStatus.HEALTHY, "no worker in this process")]
        name = f"{self.name}.worker"
        failed = self.broker.failed if self.broker is not None else None
        if failed is not None:
            return [HealthResult(name, HealthStatus.UNHEALTHY, f"stopped: {failed}")]
        return [HealthResult(name, HealthStatus.HEALTHY, "worker running")]

    def prepare_worker_process(self, on_failure: Callable[[str], None]) -> None:
        """The dramatiq CLI runs the Worker (its ``--threads`` consume the handlers'
        queues); a worker thread that died makes this process stop gracefully
        through ``on_failure``, so that its supervisor restarts it."""
        self.runs_worker = False
        self._require_broker().on_failure = on_failure

    def boot_worker_process(
        self, bus: HostedBus, worker: dramatiq.Worker | None = None
    ) -> StopWorker | None:
        """Start consuming in a ``dramatiq eventbus.actors`` process.

        With ``worker="loop"`` (the default) the handlers' queues are consumed by a
        :class:`~eventbus.redis.worker.RedisWorkerLoop` (handlers on one event
        loop, sync ones in ``--threads`` threads) and dramatiq's Worker starts no
        consumer; with ``worker="threads"`` its ``--threads`` consume them.
        """
        super().boot_worker_process(bus, worker)  # subscribes and declares the actors
        if self.worker_mode != "loop" or worker is None:
            return None
        broker = self._require_broker()
        queues = worker_queues(broker, worker)
        if not queues:
            return None
        loop = RedisWorkerLoop(
            broker,
            queues,
            clients=functools.partial(RespClient.from_url, self.url),
            prefetch=worker.queue_prefetch,
            timeout_ms=worker.worker_timeout,
            # --threads bounds the handlers at once, as on dramatiq's worker: with -t 1
            # events of a queue are handled one at a time, in queue order.
            max_concurrency=min(self.max_concurrency, worker.worker_threads),
            worker_threads=worker.worker_threads,
        )
        loop.start()

        def stop(timeout: float) -> None:
            margin = min(WORKER_STOP_MARGIN, timeout)
            loop.stop(timeout - margin, margin)

        return stop

    async def health(self) -> list[HealthResult]:
        """``redis`` (a PING), ``redis.workers`` (degraded while events wait with no
        live worker to take them) and, for an hour after unrouted events were
        dropped from the window, ``redis.unrouted`` (degraded)."""
        broker_name, workers_name = self.name, f"{self.name}.workers"
        try:
            started = time.perf_counter()
            await self._client().call("PING")
            rtt = (time.perf_counter() - started) * 1000
            rows, window = await asyncio.to_thread(self._health_reads)
        except (RespConnectionError, RespError, redis.RedisError) as exc:
            if is_sentinel_url(self.url) and not isinstance(exc, PrimaryNotFound | RespError):
                # The sentinels answer, but the primary they name does not: a failover
                # (seconds) until they promote a replica; publishes fail meanwhile.
                detail = (
                    f"the primary cannot be reached (a failover in progress?): {exc}; "
                    "publishes fail until the sentinels name a reachable primary"
                )
                return [
                    HealthResult(broker_name, HealthStatus.DEGRADED, detail),
                    HealthResult(workers_name, HealthStatus.DEGRADED, "unknown: no primary"),
                ]
            return [
                HealthResult(broker_name, HealthStatus.UNHEALTHY, f"unreachable: {exc}"),
                HealthResult(workers_name, HealthStatus.UNHEALTHY, "unknown: Redis unreachable"),
            ]
        detail = f"ping {rtt:.1f} ms"
        if window.waiting:
            total = sum(window.waiting.values())
            detail += (
                f"; {total} event(s) of {_listed(window.waiting)} kept for subscriptions not "
                f"written yet (up to {self.retention.seconds:g}s)"
            )
        results = [HealthResult(broker_name, HealthStatus.HEALTHY, detail)]
        if self.min_replicas:  # redis.replicas
            results.append(await self._replica_health())
        results += await memory.memory_health(self._client(), self.name)  # redis.memory
        failed = self.broker.failed if self.broker is not None else None
        if self.worker is not None and failed is not None:
            results.append(
                HealthResult(f"{self.name}.worker", HealthStatus.UNHEALTHY, f"stopped: {failed}")
            )
        # A queue some live worker consumes is drained by it (events of handlers it
        # lacks get parked, and show as parked).  Anything else waiting, whatever
        # the backlog counter says, waits for a worker that does not exist.
        consumed = {s.queue for s in rows if s.live_workers}
        stranded = []
        for s in rows:
            if s.live_workers:
                continue
            waiting = max(s.backlog, s.parked, 0 if s.queue in consumed else s.waiting)
            if waiting:
                stranded.append((s, waiting))
        if stranded:
            listed = ", ".join(
                f"{s.handler} ({s.service}, {waiting} waiting)" for s, waiting in stranded[:5]
            )
            more = f" and {len(stranded) - 5} more" if len(stranded) > 5 else ""
            detail = (
                f"no live worker has {listed}{more}; the events wait in Redis until one "
                "starts (or `eventbus subscriptions remove` dead-letters them)"
            )
            results.append(HealthResult(workers_name, HealthStatus.DEGRADED, detail))
        else:
            live = sum(1 for s in rows if s.live_workers)
            results.append(
                HealthResult(
                    workers_name,
                    HealthStatus.HEALTHY,
                    f"{len(rows)} subscription(s), {live} with a live worker",
                )
            )
        last = window.last_drop
        if last is not None and time.time() - last.timestamp() < DROP_HEALTH_SECONDS:
            total = sum(window.dropped.values())
            detail = (
                f"{total} unrouted event(s) dropped without reaching a subscription "
                f"({_listed(window.dropped)}), the last at {last:%Y-%m-%d %H:%M:%S} UTC: no "
                "subscription was written within the window. Start the workers (or run "
                "`eventbus subscriptions sync MODULES`) before publishing, or raise "
                "EVENTBUS_REDIS_UNROUTED_RETENTION / _MAX_EVENTS / _MAX_BYTES"
            )
            results.append(HealthResult(f"{self.name}.unrouted", HealthStatus.DEGRADED, detail))
        return results

    async def _replica_health(self) -> HealthResult:
        """``redis.replicas``: degraded while the primary has fewer connected, in-sync
        replicas than ``min_replicas`` (every publish then fails: the replicas'
        acknowledgements cannot come).  Degraded, not unhealthy: taking the web
        processes out of service would not bring a replica back."""
        name = f"{self.name}.replicas"
        try:
            info = await self._client().call("INFO", "replication")
        except (RespConnectionError, RespError) as exc:
            return HealthResult(name, HealthStatus.DEGRADED, f"cannot read INFO replication: {exc}")
        connected, in_sync = _replicas_in_sync(info, REPLICA_HEALTH_MAX_LAG)
        if in_sync >= self.min_replicas:
            return HealthResult(
                name,
                HealthStatus.HEALTHY,
                f"{in_sync} replica(s) in sync, {self.min_replicas} required",
            )
        detail = (
            f"EVENTBUS_REDIS_MIN_REPLICAS={self.min_replicas} but the primary has "
            f"{in_sync} connected, in-sync replica(s) ({connected} connected; in sync: "
            f"online, acknowledged within {REPLICA_HEALTH_MAX_LAG}s): every publish fails "
            "with PublishError after EVENTBUS_REDIS_REPLICA_TIMEOUT="
            f"{self.replica_timeout:g}s (its events are on the primary and may still be "
            "delivered). Bring the replicas back (INFO replication), or lower "
            "EVENTBUS_REDIS_MIN_REPLICAS"
        )
        return HealthResult(name, HealthStatus.DEGRADED, detail)

    async def operations(self) -> Operations:
        """Live workers (host, pid, heartbeat age, queues, in-flight events, code
        fingerprints), subscriptions (backlog, parked, oldest waiting event) and the
        unrouted window (see :mod:`eventbus.redis.operations`)."""
        from eventbus.redis.operations import read_operations

        return await asyncio.to_thread(
            read_operations,
            self.sync_client,
            self.namespace,
            self.heartbeat_timeout,
            self.address(),
        )

    def _health_reads(self) -> tuple[list[subs.Subscription], subs.UnroutedStats]:
        return self.subscription_list(), subs.unrouted_stats(self.sync_client, self.namespace)

    def backlog(self) -> dict[str, int]:
        """Events waiting per queue (ready, delayed and parked; blocking)."""
        out: dict[str, int] = {}
        for row in self.subscription_list():
            out[row.queue] = out.get(row.queue, row.waiting) + row.parked
        return out

    def dead_letters_out_of_reach(self) -> None:
        return None  # in Redis: every process with the URL and namespace reaches them

    def dead_letter_store(self, settings: EventBusSettings) -> DeadLetterStore | None:
        from eventbus.redis.dlq import RedisDeadLetterStore

        return RedisDeadLetterStore(
            self.sync_client,
            namespace=self.namespace,
            max_size=settings.dlq_max_size,
            max_bytes=settings.dlq_max_bytes,
        )


class _Refused(PublishError):
    """Redis refused a fan-out call (a script error): nothing of it was written."""

    def __init__(self, message: str) -> None:
        super().__init__(f"{message}; nothing was published")


class _Waiter:
    """One caller's events in a group commit, and its future."""

    __slots__ = ("args", "future", "size", "topics")

    def __init__(
        self, future: asyncio.Future[set[str]], topics: set[str], args: list[Any], size: int
    ) -> None:
        self.future = future
        self.topics = topics
        self.args = args
        self.size = size

    def succeed(self, unrouted: set[str]) -> None:
        if not self.future.done():
            self.future.set_result(unrouted)

    def fail(self, exc: PublishError) -> None:
        if not self.future.done():
            self.future.set_exception(PublishError(str(exc)))


class _Group:
    """Publishes waiting for the script call in flight on one event loop."""

    __slots__ = ("args", "busy", "size", "tasks", "waiters")

    def __init__(self) -> None:
        self.busy = False
        self.args: list[Any] = []
        self.size = 0
        self.waiters: list[_Waiter] = []
        self.tasks: set[asyncio.Task[None]] = set()


def _listed(counts: dict[str, int], most: int = 5) -> str:
    """``topic: n, ...`` for the ``most`` largest counts, and how many more."""
    top = sorted(counts.items(), key=lambda item: -item[1])
    text = ", ".join(f"{topic}: {n}" for topic, n in top[:most])
    return text + (f" and {len(top) - most} more topic(s)" if len(top) > most else "")


def _check_envelope(envelope: bytes, outgoing: OutgoingEvent) -> None:
    """Refuse envelope bytes that are not one JSON object.

    The script splices them into each message's JSON; bytes read from elsewhere
    (the outbox table) that closed the argument list could add message fields (run
    another actor).  ~1 µs for a typical event, ~0.1 ms per MiB.
    """
    try:
        value = from_json(envelope, allow_inf_nan=False, cache_strings=False)
    except ValueError as exc:
        problem = str(exc)
    else:
        if isinstance(value, dict):
            return
        problem = f"a JSON {type(value).__name__}"
    raise PublishError(
        f"the envelope of event {outgoing.event.event_id} (topic {outgoing.event.topic}) is "
        f"not one JSON object ({problem}); nothing of this call was published"
    )


def _replicas_in_sync(info: bytes, max_lag: int) -> tuple[int, int]:
    """``(connected, in sync)`` replicas of an ``INFO replication`` reply: in sync
    means ``state=online`` (not in a full resync) and ``lag`` (seconds since its last
    acknowledgement) at most ``max_lag``."""
    connected = in_sync = 0
    for line in info.decode(errors="replace").splitlines():
        if line.startswith("connected_slaves:"):
            connected = int(line.split(":", 1)[1])
            continue
        key, _, value = line.partition(":")
        if not (key.startswith("slave") and key[5:].isdigit()):
            continue
        fields = {}
        for part in value.strip().split(","):
            field, _, field_value = part.partition("=")
            fields[field] = field_value
        lag = fields.get("lag", "")
        if fields.get("state") == "online" and lag.isdigit() and int(lag) <= max_lag:
            in_sync += 1
    return connected, in_sync


def _server_version(info: bytes) -> tuple[int, ...] | None:
    """``redis_version`` of an ``INFO server`` reply, as numbers (None if absent)."""
    for line in info.decode(errors="replace").splitlines():
        if line.startswith("redis_version:"):
            try:
                return tuple(int(part) for part in line.split(":", 1)[1].strip().split("."))
            except ValueError:
                return None
    return None


_SHA_CACHE: dict[str, str] = {}


def _sha1(script: str) -> str:
    sha = _SHA_CACHE.get(script)
    if sha is None:
        sha = _SHA_CACHE[script] = hashlib.sha1(script.encode()).hexdigest()
    return sha
