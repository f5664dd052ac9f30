"""The Redis backend (``EVENTBUS_BACKEND=redis``): durable fan-out to worker processes.

The web process publishes; ``dramatiq eventbus.actors`` worker processes run the
handlers.  Each handler of a topic gets its own dramatiq message, so a failing
handler is retried alone, and nothing is lost when either side dies::

    bus = EventBus(backend=RedisBackend(url="redis://localhost:6379/0"))

    # in another shell (or the Procfile's ``worker`` process):
    #   EVENTBUS_BACKEND=redis EVENTBUS_HANDLERS=myapp.handlers dramatiq eventbus.actors

How it differs from dramatiq's own ``RedisBroker`` (same Worker, same middleware):

* **Latency.**  An idle consumer blocks in ``BLMOVE`` on its queue and wakes the
  moment a message lands, instead of polling with a backoff that grows to a
  second (dramatiq: p99 ~740 ms at 2 events/s).  One blocked command per queue
  per ``dramatiq_worker_timeout`` (1 s) is all an idle worker sends.
* **Recovery.**  Each worker process beats every :attr:`RedisBackend.heartbeat_interval`
  seconds from its own thread (so a handler running for an hour does not make its
  worker look dead), and every beat also puts back the in-flight messages of
  workers silent for :attr:`RedisBackend.heartbeat_timeout`.  A SIGKILLed worker's
  events are handled again within ``redelivery_timeout`` (30 s by default), not
  after dramatiq's probabilistic maintenance pass (minutes to hours).
* **Publishing** is one round trip per event (``RPUSH`` of every handler's message,
  in ``MULTI``/``EXEC`` when they span several queues) on a small non-blocking
  client (:mod:`eventbus.backends.resp`), bounded by ``publish_timeout``.
* **Bad input** (bytes that are not a message, an unknown actor, an argument list
  that is not one envelope) is dead-lettered with the reason; the worker goes on.
* **Dead letters** live in Redis (:class:`~eventbus.dlq_redis.RedisDeadLetterStore`),
  so the web process reads what workers wrote.  A rejected message is deleted
  from its queue once its dead letter is written: there is no ``.XQ`` copy.

See :mod:`eventbus.backends.redis_scripts` for the key layout.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import threading
import time
import uuid
import weakref
from collections import Counter, deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import dramatiq
import redis
from dramatiq import Consumer, Message, Middleware
from dramatiq.broker import MessageProxy
from dramatiq.errors import ActorNotFound, ConnectionClosed, DecodeError
from dramatiq.middleware import TimeLimit
from pydantic_core import to_json

from ..config import (
    DEFAULT_REDIS_MAX_CONNECTIONS,
    DEFAULT_REDIS_NAMESPACE,
    DEFAULT_REDIS_PUBLISH_TIMEOUT,
    DEFAULT_REDIS_REDELIVERY_TIMEOUT,
    DEFAULT_REDIS_URL,
)
from ..exceptions import BackendError, ConfigurationError, EventDecodeError, PublishError
from ..health import HealthResult, HealthStatus
from ..middleware import DeadLetters, keys
from ..middleware.event_loop import DaemonAsyncIO
from . import redis_scripts as lua
from .base import Backend, CachedHooksBroker
from .resp import RespClient, RespConnectionError, RespError

if TYPE_CHECKING:
    from ..config import EventBusSettings
    from ..dlq import DeadLetterStore
    from ..registry import HandlerSpec

logger = logging.getLogger(__name__)

#: Share of ``redelivery_timeout`` after which a silent worker is declared dead.
HEARTBEAT_TIMEOUT_SHARE = 2 / 3
#: Heartbeats (and recovery passes) per ``heartbeat_timeout``: a live worker must
#: miss this many beats in a row to be declared dead.
BEATS_PER_TIMEOUT = 5
#: Most messages one fetch takes (and most delayed messages one fetch promotes).
MAX_FETCH = 500
#: Seconds under which a BLMOVE answer means messages were already waiting.
BACKLOG_HINT = 0.001
#: Dead workers recovered per pass, at most.
MAX_DEAD_PER_PASS = 16
#: Seconds a worker-side Redis call may wait on the socket (beyond a block).
WORKER_SOCKET_TIMEOUT = 10.0
#: Seconds between connection attempts of a consumer while Redis is unreachable.
RECONNECT_DELAYS = (0.1, 0.25, 0.5, 1.0, 2.0)
#: Seconds between ``drain()`` polls.
DRAIN_POLL_INTERVAL = 0.01
#: Payloads per ``RPUSH`` when publishing a large batch.
PUSH_CHUNK = 1000
#: Actor name given to the dead letter of bytes that are not a dramatiq message.
UNDECODABLE_ACTOR = "<undecodable>"


class InvalidMessage(EventDecodeError):
    """A queued message cannot be run: not a dramatiq message, or not an event envelope."""


class _RedisMessage(MessageProxy):
    """A message taken from Redis; ``raw`` is its exact bytes in the in-flight list."""

    def __init__(self, message: Message[Any], raw: bytes) -> None:
        super().__init__(message)
        self.raw = raw


class ReliableRedisBroker(CachedHooksBroker):
    """A dramatiq broker on Redis lists with blocking fetches, heartbeats from a
    dedicated thread and deterministic recovery of dead workers' messages.

    Normally built by :class:`RedisBackend`; use it directly only to run
    non-eventbus dramatiq actors on the same queues.

    Parameters:
      client: A synchronous redis-py client (workers and retries use it).
      middleware: The dramatiq middleware.
      namespace: Prefix of every key.
      heartbeat_timeout: Seconds of silence after which a worker is dead.
      heartbeat_interval: Seconds between heartbeats and recovery passes.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        middleware: list[Middleware],
        namespace: str = DEFAULT_REDIS_NAMESPACE,
        heartbeat_timeout: float = DEFAULT_REDIS_REDELIVERY_TIMEOUT * HEARTBEAT_TIMEOUT_SHARE,
        heartbeat_interval: float | None = None,
    ) -> None:
        super().__init__(middleware=middleware)
        self.client = client
        self.namespace = namespace
        self.heartbeat_timeout = heartbeat_timeout
        self.heartbeat_interval = heartbeat_interval or heartbeat_timeout / BEATS_PER_TIMEOUT
        #: This process's worker id (unique per broker instance).
        self.worker_id = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self.queues: set[str] = set()
        self.consumed: set[str] = set()
        self._fetch = client.register_script(lua.FETCH)
        self._schedule = client.register_script(lua.SCHEDULE)
        self._beat = client.register_script(lua.BEAT)
        self._release = client.register_script(lua.RELEASE)
        self._reclaim = client.register_script(lua.RECLAIM)
        self._heartbeat: _Heartbeat | None = None
        self._lock = threading.Lock()
        self._beat_lock = threading.Lock()
        self.add_middleware(_WorkerLifecycle())

    # -- dramatiq Broker API ----------------------------------------------------------

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 1000) -> Consumer:
        """A consumer of ``queue_name`` taking up to ``prefetch`` messages ahead and
        blocking at most ``timeout`` ms per call when the queue is empty."""
        with self._lock:
            self.consumed.add(queue_name)
            if self._heartbeat is None:
                self._heartbeat = _Heartbeat(self)
                self._heartbeat.start()
        try:
            self.beat()  # register the queue before taking anything from it
        except redis.RedisError as exc:
            raise _closed(exc) from None
        return _RedisConsumer(self, queue_name, prefetch, timeout)

    def declare_queue(self, queue_name: str) -> None:
        """Declare a queue (idempotent).  Delayed messages need no consumer of their
        own: they wait in Redis, not in a worker's memory."""
        if queue_name not in self.queues:
            self.emit_before("declare_queue", queue_name)
            self.queues.add(queue_name)
            self.emit_after("declare_queue", queue_name)

    def get_declared_queues(self) -> set[str]:
        """The queues declared on this broker."""
        return self.queues.copy()

    def enqueue(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        """Enqueue ``message`` now, or ``delay`` milliseconds from now (retries)."""
        queue = message.queue_name
        self.emit_before("enqueue", message, delay)
        payload = encode_message(message)
        try:
            if delay:
                self._schedule(
                    keys=[self.delayed_key(queue), self.ready_key(queue)],
                    args=[int(delay), payload],
                )
            else:
                self.client.rpush(self.ready_key(queue), payload)
        except redis.RedisError as exc:
            raise _closed(exc) from None
        self.emit_after("enqueue", message, delay)
        return message

    def flush(self, queue_name: str) -> None:
        """Drop every ready and delayed message of ``queue_name``."""
        self.client.delete(self.ready_key(queue_name), self.delayed_key(queue_name))

    def flush_all(self) -> None:
        """Drop every ready and delayed message of every declared queue."""
        for queue in self.queues:
            self.flush(queue)

    def join(self, queue_name: str, *, timeout: int | None = None) -> None:
        """Wait until ``queue_name`` has nothing ready, delayed or in flight (tests)."""
        script = self.client.register_script(lua.PENDING)
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        while int(script(args=[self.namespace, queue_name])):
            if deadline is not None and time.monotonic() > deadline:
                raise dramatiq.errors.QueueJoinTimeout(queue_name)  # type: ignore[no-untyped-call]
            time.sleep(DRAIN_POLL_INTERVAL)

    def close(self) -> None:
        """Stop heartbeating, put back anything still held, and unregister."""
        self.release()
        self.client.close()

    # -- keys, heartbeats, recovery ---------------------------------------------------

    def ready_key(self, queue: str) -> str:
        return lua.ready_key(self.namespace, queue)

    def delayed_key(self, queue: str) -> str:
        return lua.delayed_key(self.namespace, queue)

    def inflight_key(self, queue: str) -> str:
        return lua.inflight_key(self.namespace, self.worker_id, queue)

    def beat(self) -> int:
        """Send one heartbeat and run one recovery pass; returns messages put back."""
        with self._beat_lock:  # concurrent beats must not register a stale queue list
            moved = int(
                self._beat(
                    args=[
                        self.namespace,
                        self.worker_id,
                        ",".join(sorted(self.consumed)),
                        int(self.heartbeat_timeout * 1000),
                        MAX_DEAD_PER_PASS,
                    ]
                )
            )
        if moved:
            logger.warning("Redelivered %d in-flight event(s) of dead worker(s).", moved)
        return moved

    def release(self) -> None:
        """Stop heartbeats; put this worker's unacked messages back and unregister."""
        with self._lock:
            heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is None:
            return
        heartbeat.stop()
        try:
            moved = int(self._release(args=[self.namespace, self.worker_id]))
        except redis.RedisError as exc:
            logger.warning("Could not unregister worker %s: %s", self.worker_id, exc)
            return
        if moved:
            logger.info("Put back %d unfinished event(s) at shutdown.", moved)

    def dead_letter(self, message: Message[Any], error: BaseException) -> bool:
        """Record ``message`` as a dead letter through the DeadLetters middleware."""
        recorders = [m for m in self.middleware if isinstance(m, DeadLetters)]
        for recorder in recorders:
            recorder.record(message, error)
        return bool(recorders)


class _Heartbeat(threading.Thread):
    """Beats for its broker every ``heartbeat_interval`` seconds until stopped."""

    def __init__(self, broker: ReliableRedisBroker) -> None:
        super().__init__(name="eventbus-heartbeat", daemon=True)
        self.broker = broker
        self._stopped = threading.Event()

    def run(self) -> None:
        failing = False
        while not self._stopped.wait(self.broker.heartbeat_interval):
            try:
                self.broker.beat()
            except Exception as exc:
                if not failing:
                    logger.warning("Heartbeat to Redis failed (will retry): %s", exc)
                failing = True
                continue
            if failing:
                logger.info("Heartbeat to Redis restored.")
                failing = False

    def stop(self) -> None:
        self._stopped.set()
        self.join(timeout=WORKER_SOCKET_TIMEOUT)


class _WorkerLifecycle(Middleware):
    """Releases the worker's hold on its messages once dramatiq's Worker stopped."""

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if isinstance(broker, ReliableRedisBroker):
            broker.release()


class _RedisConsumer(Consumer):
    """Takes messages of one queue: batches when busy, a blocking BLMOVE when idle."""

    def __init__(
        self, broker: ReliableRedisBroker, queue_name: str, prefetch: int, timeout: int
    ) -> None:
        self.broker = broker
        self.client = broker.client
        self.queue_name = queue_name
        self.prefetch = max(1, prefetch)
        self.timeout = max(0.01, timeout / 1000)
        self.ready = broker.ready_key(queue_name)
        self.delayed = broker.delayed_key(queue_name)
        self.inflight = broker.inflight_key(queue_name)
        self.cache: deque[bytes] = deque()
        self.outstanding = 0
        #: The raw messages handed to dramatiq and not acked, nacked or requeued yet.
        self.held: Counter[bytes] = Counter()
        self.acked = threading.Condition()
        self.must_fetch = True
        self.next_due: float = -1.0
        self.failures = 0
        self.must_reclaim = False

    # Called from worker threads.
    def ack(self, message: MessageProxy) -> None:
        self._remove(message)

    def nack(self, message: MessageProxy) -> None:
        # The DeadLetters middleware has recorded it in our own store already.
        self._remove(message)

    def _remove(self, message: MessageProxy) -> None:
        raw = getattr(message, "raw", None)
        try:
            if raw is not None:
                _command(self.client, "LREM", self.inflight, 1, raw)
        except redis.RedisError as exc:
            raise _closed(exc) from None
        self._done(1, [raw] if raw is not None else [])

    def _done(self, count: int, raws: list[bytes]) -> None:
        with self.acked:
            self.outstanding = max(0, self.outstanding - count)
            for raw in raws:
                left = self.held[raw] - 1
                if left > 0:
                    self.held[raw] = left
                else:
                    del self.held[raw]
            self.acked.notify()

    def requeue(self, messages: Iterable[MessageProxy]) -> None:
        raws = [raw for m in messages if (raw := getattr(m, "raw", None)) is not None]
        self._put_back(raws)
        self._done(len(raws), raws)

    def _put_back(self, raws: list[bytes]) -> None:
        if not raws:
            return
        try:
            with self.client.pipeline(transaction=True) as pipe:
                for raw in raws:
                    pipe.lrem(self.inflight, 1, raw)  # type: ignore[arg-type]
                pipe.lpush(self.ready, *reversed(raws))
                pipe.execute()
        except redis.RedisError as exc:
            raise _closed(exc) from None

    def close(self) -> None:
        cached, self.cache = list(self.cache), deque()
        try:
            self._put_back(cached)
        except ConnectionClosed:
            logger.warning(
                "Could not put back %d prefetched event(s) of queue %s; they come back "
                "when this worker's heartbeat expires.",
                len(cached),
                self.queue_name,
            )

    # Called from the consumer thread.
    def __next__(self) -> MessageProxy | None:
        try:
            message = self._next()
        except redis.RedisError as exc:
            delay = RECONNECT_DELAYS[min(self.failures, len(RECONNECT_DELAYS) - 1)]
            if self.failures == 0:
                logger.warning("Lost Redis on queue %s (%s); reconnecting.", self.queue_name, exc)
            self.failures += 1
            self.must_fetch = True
            # A command that moves messages into our in-flight list (BLMOVE, the
            # fetch script) may have run on the server with its reply lost.
            self.must_reclaim = True
            time.sleep(delay)
            return None
        if self.failures:
            logger.info("Redis is back; consuming queue %s again.", self.queue_name)
            self.failures = 0
        return message

    def _reclaim(self) -> None:
        """Put back the messages of our in-flight list that this consumer never
        received: taken by a command whose reply was lost with the connection, they
        would otherwise wait there, unhandled, for as long as this worker lives."""
        listed: list[bytes] = _command(self.client, "LRANGE", self.inflight, 0, -1)
        with self.acked:
            known = self.held + Counter(self.cache)
        unknown = []
        for raw in listed:
            if known[raw] > 0:
                known[raw] -= 1
            else:
                unknown.append(raw)
        if unknown:
            # Atomic per message: one acked meanwhile is gone from the list and stays gone.
            moved = int(self.broker._reclaim(keys=[self.inflight, self.ready], args=unknown))
            if moved:
                logger.warning(
                    "Put back %d event(s) of queue %s taken by a fetch whose reply was "
                    "lost with the connection.",
                    moved,
                    self.queue_name,
                )

    def _next(self) -> MessageProxy | None:
        if self.must_reclaim:
            self._reclaim()
            self.must_reclaim = False
        while True:
            while self.cache:
                message = self._decode(self.cache.popleft())
                if message is not None:
                    return message
            with self.acked:
                if self.outstanding >= self.prefetch:
                    self.acked.wait(self.timeout)
                    return None
                room = min(self.prefetch - self.outstanding, MAX_FETCH)
            if self.must_fetch:
                reply = self.broker._fetch(
                    keys=[self.ready, self.delayed, self.inflight], args=[room, MAX_FETCH]
                )
                self.next_due = float(reply.pop())
                if reply:
                    self.cache.extend(reply)
                    continue
                self.must_fetch = False
            block = self.timeout
            if self.next_due >= 0:
                block = min(block, max(self.next_due / 1000, 0.001))
            asked = time.perf_counter()
            raw = _command(self.client, "BLMOVE", self.ready, self.inflight, "LEFT", "RIGHT", block)
            # Answered at once: a backlog, fetch the rest in a batch next.  Answered
            # after waiting: a trickle, block again rather than run an empty fetch.
            self.must_fetch = time.perf_counter() - asked < BACKLOG_HINT
            if raw is None:
                # Timed out: fetch (promoting due retries) only if some are scheduled.
                self.must_fetch = self.next_due >= 0
                return None
            if raw == b"":  # wake-up token: a delayed message became the earliest
                _command(self.client, "LREM", self.inflight, 1, b"")
                self.must_fetch = True
                continue
            return self._decode(raw)

    def _decode(self, raw: bytes) -> MessageProxy | None:
        try:
            message = Message.decode(raw)
        except DecodeError as exc:
            cause = exc.__cause__ or exc
            self._reject_raw(raw, InvalidMessage(f"not a dramatiq message: {cause}"))
            return None
        shape = message_problem(message, self.queue_name)
        if shape is not None:  # its fields cannot be trusted: record the raw bytes
            self._reject_raw(raw, InvalidMessage(shape))
            return None
        try:
            problem = self._check(message)
        except ActorNotFound as exc:
            self._reject(message, raw, exc)
            return None
        if problem is not None:
            self._reject(message, raw, InvalidMessage(problem))
            return None
        with self.acked:
            self.outstanding += 1
            self.held[raw] += 1
        return _RedisMessage(message, raw)

    def _check(self, message: Message[Any]) -> str | None:
        actor = self.broker.get_actor(message.actor_name)
        if keys.HANDLER not in actor.options:
            return None  # a plain dramatiq actor: its arguments are its own business
        if len(message.args) != 1 or message.kwargs:
            return "an eventbus message carries exactly one argument, the event envelope"
        return None

    def _reject_raw(self, raw: bytes, error: Exception) -> None:
        text = raw.decode("utf-8", errors="replace")
        message: Message[Any] = Message(
            queue_name=self.queue_name,
            actor_name=UNDECODABLE_ACTOR,
            args=(text,),
            kwargs={},
            options={},
            message_id=uuid.uuid4().hex,
        )
        self._reject(message, raw, error)

    def _reject(self, message: Message[Any], raw: bytes, error: Exception) -> None:
        logger.error(
            "Dead-lettering a malformed message on queue %s: %s: %s",
            self.queue_name,
            type(error).__name__,
            error,
        )
        try:
            recorded = self.broker.dead_letter(message, error)
        except redis.RedisError:
            raise  # Redis went away: the message is put back once it is reachable
        except Exception:
            if message.actor_name != UNDECODABLE_ACTOR:
                logger.exception("Could not write the dead letter; recording the raw message.")
                self._reject_raw(raw, error)
                return
            logger.exception("Could not write the dead letter; the message stays in flight.")
            return
        if not recorded:
            logger.error("No DeadLetters middleware: the malformed message is dropped.")
        _command(self.client, "LREM", self.inflight, 1, raw)


#: Message fields and the JSON types they must have.
_FIELD_TYPES: tuple[tuple[str, type | tuple[type, ...], str], ...] = (
    ("queue_name", str, "a string"),
    ("actor_name", str, "a string"),
    ("args", (list, tuple), "an array"),
    ("kwargs", dict, "an object"),
    ("options", dict, "an object"),
    ("message_id", str, "a string"),
    ("message_timestamp", (int, float), "a number"),
)
#: Message options read by eventbus or dramatiq middleware, and their types.
_OPTION_TYPES: dict[str, tuple[type | tuple[type, ...], str]] = {
    keys.TOPIC: (str, "a string"),
    keys.CORRELATION_ID: (str, "a string"),
    keys.TRACE_ID: (str, "a string"),
    keys.PARENT_SPAN_ID: (str, "a string"),
    keys.REPLAY_OF: (str, "a string"),
    keys.TRACE_CONTEXT: (dict, "an object"),
    keys.ATTEMPTS: (int, "an integer"),
    keys.FIRST_FAILED_AT: ((int, float), "a number"),
    "eta": ((int, float, type(None)), "a number"),
    "time_limit": ((int, float, type(None)), "a number"),
}
#: Epoch milliseconds of the end of year 9999 (the largest datetime).
_MAX_EPOCH_MS = 253_402_300_799_000


def message_problem(message: Message[Any], queue: str) -> str | None:
    """Why ``message``, taken from ``queue``, cannot be run, judged by its shape.

    Dramatiq decodes any JSON object with the right keys into a Message without
    checking types, and a worker thread dies on some wrong ones (a ``queue_name``
    it does not consume, a truthy ``throws``); a dead-letter record cannot be
    written for others (a ``message_id`` that is not a string).
    """
    for name, kinds, what in _FIELD_TYPES:
        value = getattr(message, name)
        if isinstance(value, bool) or not isinstance(value, kinds):
            return f"{name} must be {what}, not {type(value).__name__}"
    if message.queue_name != queue:
        return f"a message of queue {message.queue_name!r:.80} found on queue {queue!r}"
    try:
        message.message_id.encode()
    except UnicodeEncodeError:
        return "message_id is not valid UTF-8"
    options = message.options
    for key, (kinds, what) in _OPTION_TYPES.items():
        if key not in options:
            continue
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, kinds):
            return f"option {key} must be {what}, not {type(value).__name__}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"option {key} must be a finite number"
    if options.get(keys.ATTEMPTS, 0) < 0:
        return f"option {keys.ATTEMPTS} must be >= 0"
    if not 0 <= options.get(keys.FIRST_FAILED_AT, 0) <= _MAX_EPOCH_MS:
        return f"option {keys.FIRST_FAILED_AT} is not a time"
    context = options.get(keys.TRACE_CONTEXT, {})
    if not all(isinstance(v, str) for v in context.values()):
        return f"option {keys.TRACE_CONTEXT} must map names to strings"
    if options.get("throws"):
        return "option throws cannot be set in JSON (dramatiq expects exception classes)"
    return None


class RedisBackend(Backend):
    """Durable delivery through Redis to ``dramatiq eventbus.actors`` workers.

    Parameters:
      url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` or ``unix://``.
      max_connections: Connections the publishing client may open per event loop.
      namespace: Prefix of every Redis key; buses sharing it share queues.
      redelivery_timeout: Seconds within which the in-flight events of a worker
        that died (SIGKILL, OOM, lost host) are handed to another worker.  A live
        worker is never declared dead, however long its handlers run.
      publish_timeout: Seconds ``publish`` may take (connect included) before it
        raises :class:`~eventbus.exceptions.PublishError`.

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
    ) -> None:
        if redelivery_timeout <= 0 or publish_timeout <= 0:
            raise ConfigurationError("redelivery_timeout and publish_timeout must be > 0")
        if not namespace or ":" in namespace:
            raise ConfigurationError(f"invalid Redis namespace {namespace!r}")
        try:
            RespClient.from_url(url)
        except ValueError as exc:
            raise ConfigurationError(f"invalid EVENTBUS_REDIS_URL {url!r}: {exc}") from None
        self.url = url
        self.max_connections = max_connections
        self.namespace = namespace
        self.redelivery_timeout = redelivery_timeout
        self.publish_timeout = publish_timeout
        #: Seconds of silence after which a worker is declared dead.
        self.heartbeat_timeout = redelivery_timeout * HEARTBEAT_TIMEOUT_SHARE
        #: Seconds between a worker's heartbeats (and recovery passes).
        self.heartbeat_interval = self.heartbeat_timeout / BEATS_PER_TIMEOUT
        self.broker: ReliableRedisBroker | None = None
        self._sync_client: redis.Redis | None = None
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, RespClient] = (
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

    def bind(self, middleware: list[Middleware]) -> dramatiq.Broker:
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
        return self.broker

    def _require_broker(self) -> ReliableRedisBroker:
        if self.broker is None:
            raise BackendError("backend not bound to a bus", backend=self.name)
        return self.broker

    async def start(self) -> None:
        self._require_broker()
        try:
            await self._client().call("PING")
        except (RespConnectionError, RespError) as exc:
            logger.warning(
                "Redis is not reachable yet (%s); publishing will fail until it is.", exc
            )

    async def stop(self, timeout: float) -> None:
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.close()

    async def enqueue(self, messages: list[Message[Any]]) -> None:
        broker = self._require_broker()
        before = broker._hooks_for("before_enqueue")
        after = broker._hooks_for("after_enqueue")
        if before:
            for message in messages:
                broker.emit_before("enqueue", message, None)
        by_queue: dict[str, list[bytes]] = {}
        for message in messages:
            payloads = by_queue.get(message.queue_name)
            if payloads is None:
                payloads = by_queue[message.queue_name] = []
            payloads.append(encode_message(message))
        commands: list[tuple[Any, ...]] = []
        for queue, payloads in by_queue.items():
            key = lua.ready_key(self.namespace, queue)
            for i in range(0, len(payloads), PUSH_CHUNK):
                commands.append(("RPUSH", key, *payloads[i : i + PUSH_CHUNK]))
        # One RPUSH is atomic by itself; several (queues or chunks) go in MULTI/EXEC.
        transaction = len(commands) > 1
        if transaction:
            commands = [("MULTI",), *commands, ("EXEC",)]
        try:
            replies = await self._client().execute(commands)
        except RespConnectionError as exc:
            raise PublishError(f"could not publish to Redis: {exc}") from exc
        result = replies[-1] if transaction else replies[0]
        if result is None or isinstance(result, RespError) or transaction:
            _check_transaction(replies, result)
        if after:
            for message in messages:
                broker.emit_after("enqueue", message, None)

    async def pending(self) -> int:
        """Messages of this bus's queues that are ready, delayed or in flight."""
        queues = sorted(self._require_broker().get_declared_queues())
        if not queues:
            return 0
        return int(await self._script(lua.PENDING, [self.namespace, *queues]))

    async def drain(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = await self.pending()
            if not left:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{left} event deliveries still pending after {timeout:g}s")
            await asyncio.sleep(DRAIN_POLL_INTERVAL)

    async def health(self) -> list[HealthResult]:
        broker_name, workers_name = self.name, f"{self.name}.workers"
        try:
            started = time.perf_counter()
            await self._client().call("PING")
            rtt = (time.perf_counter() - started) * 1000
            alive = await self._script(
                lua.LIVE_WORKERS, [self.namespace, int(self.heartbeat_timeout * 1000)]
            )
        except (RespConnectionError, RespError) as exc:
            return [
                HealthResult(broker_name, HealthStatus.UNHEALTHY, f"unreachable: {exc}"),
                HealthResult(workers_name, HealthStatus.UNHEALTHY, "unknown: Redis unreachable"),
            ]
        results = [HealthResult(broker_name, HealthStatus.HEALTHY, f"ping {rtt:.1f} ms")]
        served: set[str] = set()
        for queues in alive:
            served.update(q for q in queues.decode().split(",") if q)
        needed = self._require_broker().get_declared_queues()
        missing = sorted(needed - served)
        if missing:
            detail = (
                f"no live worker consumes {', '.join(missing)} ({len(alive)} worker(s) alive); "
                "events wait in Redis until one starts"
            )
            results.append(HealthResult(workers_name, HealthStatus.DEGRADED, detail))
        else:
            results.append(
                HealthResult(workers_name, HealthStatus.HEALTHY, f"{len(alive)} worker(s) alive")
            )
        return results

    def dead_letter_store(self, settings: EventBusSettings) -> DeadLetterStore | None:
        from ..dlq_redis import RedisDeadLetterStore

        return RedisDeadLetterStore(
            self.sync_client, namespace=self.namespace, max_size=settings.dlq_max_size
        )

    def actor_options(self, spec: HandlerSpec) -> dict[str, Any]:
        if spec.time_limit is None:
            return {}
        return {"time_limit": int(spec.time_limit * 1000)}


def encode_message(message: Message[Any]) -> bytes:
    """The JSON of ``message``, as ``Message.decode`` reads it.

    Same document as dramatiq's ``message.encode()`` (its JSONEncoder), built ~4x
    faster: no dataclass walk, and pydantic-core's serializer instead of ``json``.
    """
    return to_json(
        {
            "queue_name": message.queue_name,
            "actor_name": message.actor_name,
            "args": message.args,
            "kwargs": message.kwargs,
            "options": message.options,
            "message_id": message.message_id,
            "message_timestamp": message.message_timestamp,
        }
    )


def _command(client: redis.Redis, *args: Any) -> Any:
    # redis-py's stubs type members as str; ours are the exact bytes of a message.
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _closed(exc: BaseException) -> ConnectionClosed:
    return ConnectionClosed(exc)  # type: ignore[no-untyped-call]


def _check_transaction(replies: list[Any], result: Any) -> None:
    """Raise PublishError when Redis refused a command or aborted the transaction."""
    errors = [r for r in replies if isinstance(r, RespError)]
    if isinstance(result, list):
        errors += [r for r in result if isinstance(r, RespError)]
    if errors:
        raise PublishError(f"Redis refused the event: {errors[0]}")
    if result is None:
        raise PublishError("Redis aborted the transaction; nothing was enqueued")


_SHA_CACHE: dict[str, str] = {}


def _sha1(script: str) -> str:
    sha = _SHA_CACHE.get(script)
    if sha is None:
        import hashlib

        sha = _SHA_CACHE[script] = hashlib.sha1(script.encode()).hexdigest()
    return sha
