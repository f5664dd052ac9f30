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
within ``redelivery_timeout``) is :mod:`eventbus.backends.redis_broker`; the key
layout and scripts are :mod:`eventbus.backends.redis_scripts`; subscriptions are
:mod:`eventbus.backends.redis_subscriptions`.
"""

from __future__ import annotations

from ..extras import requires_extra

with requires_extra("redis", __name__):
    import redis

import asyncio
import hashlib
import logging
import os
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import dramatiq
from dramatiq import Middleware
from dramatiq.middleware import TimeLimit
from pydantic_core import to_json

from ..config import (
    DEFAULT_REDIS_MAX_CONNECTIONS,
    DEFAULT_REDIS_NAMESPACE,
    DEFAULT_REDIS_PUBLISH_TIMEOUT,
    DEFAULT_REDIS_REDELIVERY_TIMEOUT,
    DEFAULT_REDIS_URL,
    DEFAULT_WORKER_THREADS,
)
from ..exceptions import BackendError, ConfigurationError, PublishError, UnroutedError
from ..health import HealthResult, HealthStatus
from ..middleware.event_loop import DaemonAsyncIO
from ..routing import Router, Subscriptions
from . import redis_scripts as lua
from . import redis_subscriptions as subs
from .base import Backend, OutgoingEvent, replay_message
from .redis_broker import (
    BEATS_PER_TIMEOUT,
    HEARTBEAT_TIMEOUT_SHARE,
    WORKER_SOCKET_TIMEOUT,
    ReliableRedisBroker,
    service_of,
)
from .redis_messages import InvalidMessage, encode_message, message_problem
from .resp import RespClient, RespConnectionError, RespError

if TYPE_CHECKING:
    from ..config import EventBusSettings
    from ..dlq import DeadLetterStore, FailedEvent
    from ..registry import HandlerSpec

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
    ) -> None:
        if redelivery_timeout <= 0 or publish_timeout <= 0:
            raise ConfigurationError("redelivery_timeout and publish_timeout must be > 0")
        if not namespace or ":" in namespace or "{" in namespace:
            raise ConfigurationError(f"invalid Redis namespace {namespace!r}")
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
        )

    # -- clients ----------------------------------------------------------------------

    @property
    def sync_client(self) -> redis.Redis:
        """The synchronous client of workers, retries and the dead-letter store."""
        if self._sync_client is None:
            self._sync_client = redis.Redis.from_url(
                self.url,
                socket_timeout=WORKER_SOCKET_TIMEOUT,
                socket_connect_timeout=self.publish_timeout,
                socket_keepalive=True,
                health_check_interval=30,
            )
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
        client = self._client()
        sha = _sha1(script)
        reply = (await client.execute([("EVALSHA", sha, 0, *args)]))[0]
        if isinstance(reply, RespError) and str(reply).startswith("NOSCRIPT"):
            reply = (await client.execute([("EVAL", script, 0, *args)]))[0]
        if isinstance(reply, RespError):
            raise reply
        return reply

    # -- Backend hooks ----------------------------------------------------------------

    def bind(self, middleware: list[Middleware], subscriptions: Subscriptions) -> dramatiq.Broker:
        if self.broker is None:
            worker_middleware: list[Middleware] = [
                DaemonAsyncIO(),
                TimeLimit(time_limit=float("inf")),
            ]
            self.broker = ReliableRedisBroker(
                self.sync_client,
                middleware=[*middleware, *worker_middleware],
                namespace=self.namespace,
                heartbeat_timeout=self.heartbeat_timeout,
                heartbeat_interval=self.heartbeat_interval,
            )
            self.subscriptions = subscriptions
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
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.close()

    async def publish(self, events: list[OutgoingEvent], *, strict: bool = False) -> set[str]:
        """Hand ``events`` to the fan-out script (see the class docstring).

        Concurrent callers are grouped: while one script call is in flight on this
        event loop, the events of other callers wait and go together in the next
        call (group commit), so 64 concurrent publishers cost a few round trips,
        not 64, and a lone caller never waits for a batch to fill.
        """
        args: list[Any] = []
        for outgoing in events:
            args.append(outgoing.event.topic)
            args.append(outgoing.envelope)
            args.append(to_json(outgoing.options))
            args.append(os.urandom(8).hex())
        topics = {outgoing.event.topic for outgoing in events}
        if strict:
            return await self._fan_out(args, strict=True)
        group = self._groups.get(asyncio.get_running_loop())
        if group is None:
            group = self._groups[asyncio.get_running_loop()] = _Group()
        if group.busy:
            waiter: asyncio.Future[set[str]] = asyncio.get_running_loop().create_future()
            group.args.extend(args)
            group.waiters.append((waiter, topics))
            return await waiter
        group.busy = True
        try:
            return await self._fan_out(args)
        finally:
            self._next_round(group)

    def _next_round(self, group: _Group) -> None:
        if not group.waiters:
            group.busy = False
            return
        args, waiters = group.args, group.waiters
        group.args, group.waiters = [], []
        task = asyncio.get_running_loop().create_task(self._round(group, args, waiters))
        group.tasks.add(task)
        task.add_done_callback(group.tasks.discard)

    async def _round(
        self,
        group: _Group,
        args: list[Any],
        waiters: list[tuple[asyncio.Future[set[str]], set[str]]],
    ) -> None:
        try:
            unrouted = await self._fan_out(args)
        except Exception as exc:
            for waiter, _ in waiters:
                if not waiter.done():
                    waiter.set_exception(PublishError(str(exc)))
        else:
            for waiter, topics in waiters:
                if not waiter.done():
                    waiter.set_result(unrouted & topics)
        finally:
            self._next_round(group)

    async def _fan_out(self, args: list[Any], *, strict: bool = False) -> set[str]:
        head: list[Any] = [self.namespace, "1" if strict else "0", int(time.time() * 1000)]
        try:
            reply = await self._script(lua.PUBLISH, head + args)
        except RespConnectionError as exc:
            raise PublishError(f"could not publish to Redis: {exc}") from exc
        except RespError as exc:
            raise PublishError(f"Redis refused the event(s): {exc}") from exc
        unrouted = {topic.decode() for topic in reply[1:]}
        if reply[0] == 0:
            raise UnroutedError(
                f"no subscription handles topic(s) {', '.join(sorted(unrouted))} in Redis; "
                "nothing was published",
                sorted(unrouted),
            )
        return unrouted

    def replay(self, record: FailedEvent) -> None:
        broker = self._require_broker()
        service = service_of(record.queue)
        field = lua.subscription_field(service, record.topic, record.handler)
        if not self.sync_client.hexists(f"{self.namespace}:subs", field):
            raise BackendError(
                f"handler {record.handler!r} has no subscription to {record.topic!r} in "
                f"service {service!r} (removed?); dead letter {record.id} stays",
                backend=self.name,
            )
        broker.enqueue(replay_message(record, record.queue))

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

    async def health(self) -> list[HealthResult]:
        broker_name, workers_name = self.name, f"{self.name}.workers"
        try:
            started = time.perf_counter()
            await self._client().call("PING")
            rtt = (time.perf_counter() - started) * 1000
            rows = await asyncio.to_thread(self.subscription_list)
        except (RespConnectionError, RespError, redis.RedisError) as exc:
            return [
                HealthResult(broker_name, HealthStatus.UNHEALTHY, f"unreachable: {exc}"),
                HealthResult(workers_name, HealthStatus.UNHEALTHY, "unknown: Redis unreachable"),
            ]
        results = [HealthResult(broker_name, HealthStatus.HEALTHY, f"ping {rtt:.1f} ms")]
        failed = self.broker.failed if self.broker is not None else None
        if self.worker is not None and failed is not None:
            results.append(
                HealthResult(f"{self.name}.worker", HealthStatus.UNHEALTHY, f"stopped: {failed}")
            )
        stranded = [s for s in rows if s.backlog and not s.live_workers]
        if stranded:
            listed = ", ".join(
                f"{s.handler} ({s.service}, {s.backlog} waiting)" for s in stranded[:5]
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
        return results

    def backlog(self) -> dict[str, int]:
        """Events waiting per queue (ready, delayed and parked; blocking)."""
        out: dict[str, int] = {}
        for row in self.subscription_list():
            out[row.queue] = out.get(row.queue, row.waiting) + row.parked
        return out

    def dead_letter_store(self, settings: EventBusSettings) -> DeadLetterStore | None:
        from ..dlq_redis import RedisDeadLetterStore

        return RedisDeadLetterStore(
            self.sync_client,
            namespace=self.namespace,
            max_size=settings.dlq_max_size,
            max_bytes=settings.dlq_max_bytes,
        )


class _Group:
    """Publishes waiting for the script call in flight on one event loop."""

    __slots__ = ("args", "busy", "tasks", "waiters")

    def __init__(self) -> None:
        self.busy = False
        self.args: list[Any] = []
        self.waiters: list[tuple[asyncio.Future[set[str]], set[str]]] = []
        self.tasks: set[asyncio.Task[None]] = set()


_SHA_CACHE: dict[str, str] = {}


def _sha1(script: str) -> str:
    sha = _SHA_CACHE.get(script)
    if sha is None:
        sha = _SHA_CACHE[script] = hashlib.sha1(script.encode()).hexdigest()
    return sha
