"""The worker side of the Redis backend: a dramatiq broker on Redis lists.

How it differs from dramatiq's own ``RedisBroker`` (same Worker, same middleware):

* **Recovery.**  Each worker process beats every ``heartbeat_interval`` seconds
  from its own thread (so a handler running for an hour does not make its worker
  look dead), and every beat also puts back the in-flight entries of workers
  silent for ``heartbeat_timeout``: a SIGKILLed worker's events are handled again
  within the redelivery timeout, not after dramatiq's probabilistic maintenance
  pass (minutes to hours).  The same beat writes the worker's subscriptions again
  if Redis lost them, and takes back the entries parked for its handlers.
* **A worker that cannot work stops.**  A dramatiq worker thread that died, or a
  heartbeat that fails with anything but a Redis error (a bug), fails the worker
  (:meth:`ReliableRedisBroker.fail`): it takes nothing more and stops beating,
  live workers recover what it held, liveness reports it, and ``dramatiq
  eventbus.actors`` exits so that its supervisor restarts it.
* **Its consumers** (:mod:`eventbus.redis.consumer`) block on their queue instead
  of polling, and ack by entry id.
"""

from __future__ import annotations

from eventbus.extras import requires_extra

with requires_extra("redis", __name__):
    import redis

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import dramatiq
from dramatiq import Consumer, Message, Middleware
from dramatiq.broker import MessageProxy

import eventbus.redis.scripts as lua
from eventbus import keys
from eventbus.backends.base import CachedHooksBroker
from eventbus.config import DEFAULT_REDIS_NAMESPACE, DEFAULT_REDIS_REDELIVERY_TIMEOUT
from eventbus.fingerprint import code_fingerprint, eventbus_version
from eventbus.middleware import DeadLetters
from eventbus.redis.consumer import RedisConsumer, RedisMessage, connection_closed
from eventbus.redis.messages import encode_message
from eventbus.redis.schemas import handler_schema
from eventbus.redis.subscriptions import UnroutedRetention, register, sweep_unrouted

logger = logging.getLogger(__name__)

#: Share of the redelivery timeout after which a silent worker is declared dead.
HEARTBEAT_TIMEOUT_SHARE = 2 / 3
#: Heartbeats (and recovery passes) per ``heartbeat_timeout``: a live worker must
#: miss this many beats in a row to be declared dead.
BEATS_PER_TIMEOUT = 5
#: Dead workers recovered per pass, at most.
MAX_DEAD_PER_PASS = 16
#: Seconds a worker-side Redis call may wait on the socket (beyond a block).
WORKER_SOCKET_TIMEOUT = 10.0
#: Seconds between ``join()`` polls.
JOIN_POLL_INTERVAL = 0.01


class ReliableRedisBroker(CachedHooksBroker):
    """A dramatiq broker on Redis lists with blocking fetches, heartbeats from a
    dedicated thread and deterministic recovery of dead workers' messages.

    Normally built by :class:`~eventbus.redis.backend.RedisBackend`.

    Parameters:
      client: A synchronous redis-py client (workers and retries use it).
      middleware: The dramatiq middleware.
      namespace: Prefix of every key.
      heartbeat_timeout: Seconds of silence after which a worker is dead.
      heartbeat_interval: Seconds between heartbeats and recovery passes.
      retention: The unrouted window: the subscriptions this worker writes get the
        events kept for their topic, and its heartbeat sweeps what expired.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        middleware: list[Middleware],
        namespace: str = DEFAULT_REDIS_NAMESPACE,
        heartbeat_timeout: float = DEFAULT_REDIS_REDELIVERY_TIMEOUT * HEARTBEAT_TIMEOUT_SHARE,
        heartbeat_interval: float | None = None,
        retention: UnroutedRetention | None = None,
    ) -> None:
        super().__init__(middleware=middleware)
        self.retention = retention or UnroutedRetention()
        self.client = client
        self.namespace = namespace
        self.heartbeat_timeout = heartbeat_timeout
        self.heartbeat_interval = heartbeat_interval or heartbeat_timeout / BEATS_PER_TIMEOUT
        #: This process's worker id (unique per broker instance).
        self.worker_id = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self.queues: set[str] = set()
        self.consumed: set[str] = set()
        #: The service whose subscriptions this worker serves (set when it subscribes).
        self.service: str | None = None
        #: The subscriptions ("<service>|<topic>|<actor>") this worker serves.
        self.subscriptions: list[str] = []
        #: The code fingerprint of each of them (:mod:`eventbus.fingerprint`).
        self.code: dict[str, str] = {}
        self._description = self._describe()
        self._schedule = client.register_script(lua.SCHEDULE)
        self._beat = client.register_script(lua.BEAT)
        self._release = client.register_script(lua.RELEASE)
        self._heartbeat: _Heartbeat | None = None
        self._beaten = False
        self._beats = 0
        #: Why this worker stopped taking events (a worker thread died), or None.
        self.failed: str | None = None
        #: Called once when :attr:`failed` is set (the worker entry point exits the
        #: process, so that its supervisor restarts it).
        self.on_failure: Callable[[str], None] | None = None
        self._threads: set[threading.Thread] = set()
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
            raise connection_closed(exc) from None
        return RedisConsumer(self, queue_name, prefetch, timeout)

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
        """Enqueue ``message`` now, or ``delay`` milliseconds from now (retries),
        as a new entry of its queue."""
        queue = message.queue_name
        self.emit_before("enqueue", message, delay)
        try:
            self._schedule(
                keys=[
                    lua.delayed_key(self.namespace, queue),
                    lua.ready_key(self.namespace, queue),
                    lua.bodies_key(self.namespace, queue),
                    lua.backlog_key(self.namespace, queue),
                ],
                args=[
                    int(delay or 0),
                    uuid.uuid4().hex,
                    encode_message(message),
                    message.actor_name,
                ],
            )
        except redis.RedisError as exc:
            raise connection_closed(exc) from None
        self.emit_after("enqueue", message, delay)
        return message

    def flush(self, queue_name: str) -> None:
        """Drop every ready and delayed message of ``queue_name``."""
        ns = self.namespace
        self.client.delete(
            lua.ready_key(ns, queue_name),
            lua.delayed_key(ns, queue_name),
            lua.bodies_key(ns, queue_name),
            lua.backlog_key(ns, queue_name),
        )

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
            time.sleep(JOIN_POLL_INTERVAL)

    def close(self) -> None:
        """Stop heartbeating, put back anything still held, and unregister."""
        self.release()
        self.client.close()

    # -- heartbeats, recovery ---------------------------------------------------------

    def write_subscriptions(self, service: str, *, again: bool = False) -> list[str]:
        """Write the subscriptions of this broker's handlers for ``service`` to Redis
        (idempotent); the heartbeat writes them ``again`` if Redis lost them, and
        they then get the events published meanwhile (the unrouted window)."""
        handlers = [
            (actor.options[keys.HANDLER].topic, name, actor.queue_name)
            for name, actor in list(self.actors.items())
            if keys.HANDLER in actor.options
        ]
        schemas = {  # what each typed handler validates into (untyped: none)
            name: schema
            for name, actor in list(self.actors.items())
            if keys.HANDLER in actor.options
            and (schema := handler_schema(actor.options[keys.HANDLER].event_type)) is not None
        }
        self.subscriptions = register(
            self.client,
            self.namespace,
            service,
            handlers,
            retention=self.retention,
            again=again,
            schemas=schemas,
        )
        self.service = service
        specs = {
            lua.subscription_field(service, spec.topic, name): spec
            for name, actor in list(self.actors.items())
            if (spec := actor.options.get(keys.HANDLER)) is not None
        }
        self.code = {
            field: code_fingerprint(specs[field].fn)
            for field in self.subscriptions
            if field in specs
        }
        self._description = self._describe()
        return self.subscriptions

    def _describe(self) -> str:
        """What the heartbeat stores about this worker (``{ns}:winfo``): host, pid,
        eventbus version and the code fingerprint of each subscription."""
        return json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "version": eventbus_version(),
                "code": self.code,
            },
            sort_keys=True,
        )

    def thread_started(self, thread: threading.Thread) -> None:
        """Watch a dramatiq worker thread (see :meth:`check_threads`)."""
        self._threads.add(thread)

    def thread_stopped(self, thread: threading.Thread) -> None:
        """A worker thread stopped as it should."""
        self._threads.discard(thread)

    def check_threads(self) -> str | None:
        """Fail this worker when a dramatiq worker thread died instead of stopping:
        its events would sit in this worker's hands while its heartbeat says it is
        alive.  It stops beating and taking events, so that live workers recover
        what it held; returns the reason."""
        if self.failed is None:
            dead = sorted(t.name for t in list(self._threads) if not t.is_alive())
            if dead:
                self.fail(f"worker thread(s) died: {', '.join(dead)}")
        return self.failed

    def fail(self, reason: str) -> None:
        """Stop this worker taking events, for ``reason`` (a dead worker thread, a
        heartbeat that cannot run): it stops beating, live workers recover what it
        held, liveness reports it, and :attr:`on_failure` is called once."""
        with self._lock:
            if self.failed is not None:
                return
            self.failed = reason
        logger.critical(
            "%s; this worker stops taking events and its in-flight events go to "
            "other workers within the redelivery timeout.",
            reason,
        )
        if self.on_failure is not None:
            self.on_failure(reason)

    def beat(self) -> int:
        """Send one heartbeat and run one recovery pass; returns messages put back."""
        if self.check_threads() is not None:
            return 0  # silent: live workers recover what this one held
        ns = self.namespace
        # Snapshots: handlers are declared, and queues consumed, by other threads
        # meanwhile (iterating the live dict or set would raise).
        handlers = "\n".join(
            f"{actor.queue_name}|{name}"
            for name, actor in list(self.actors.items())
            if keys.HANDLER in actor.options
        )
        with self._beat_lock:  # concurrent beats must not register a stale queue list
            with self._lock:
                consumed = ",".join(sorted(self.consumed))
            moved, unparked, unknown = self._beat(
                args=[
                    ns,
                    self.worker_id,
                    consumed,
                    int(self.heartbeat_timeout * 1000),
                    MAX_DEAD_PER_PASS,
                    "-" if self._beats % BEATS_PER_TIMEOUT else "+",
                    handlers,
                    "\n".join(self.subscriptions),
                    self._description,
                ]
            )
        if unknown and self.service is not None and self._beaten:
            # Redis forgot this worker: restarted without persistence, flushed, or it
            # declared us dead.  Our subscriptions may be gone too: write them again.
            logger.warning("Redis did not know this worker; writing its subscriptions again.")
            self.write_subscriptions(self.service, again=True)
        self._beaten = True
        self._beats += 1
        if self._beats % BEATS_PER_TIMEOUT == 1:
            self.sweep_unrouted()
        if moved:
            logger.warning("Redelivered %d in-flight event(s) of dead worker(s).", moved)
        if unparked:
            logger.info("Took back %d event(s) parked for this worker's handlers.", unparked)
        return int(moved)

    def sweep_unrouted(self) -> int:
        """Drop (and count, and log) the events of the unrouted window that no
        subscription can be handed any more; returns how many reached none.  A
        corrupt key there is logged and left for an operator: it must not stop
        the heartbeat."""
        try:
            return sweep_unrouted(self.client, self.namespace, self.retention)
        except redis.ResponseError as exc:
            logger.error("Could not sweep the unrouted window: %s", exc)
            return 0

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
        """Beat until stopped.  A Redis error is retried at the next beat (the worker
        is declared dead only after ``heartbeat_timeout`` of them).  Anything else
        is a bug that would fail every beat while this worker goes on taking events
        that other workers then redeliver: it fails the worker instead (see
        :meth:`ReliableRedisBroker.fail`), with the traceback in the log."""
        try:
            self._beat_until_stopped()
        except BaseException as exc:
            logger.critical("The heartbeat thread failed.", exc_info=exc)
            self.broker.fail(f"heartbeat failed: {type(exc).__name__}: {exc}")

    def _beat_until_stopped(self) -> None:
        failing = False
        while not self._stopped.wait(self.broker.heartbeat_interval):
            try:
                self.broker.beat()
            except redis.RedisError as exc:
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
    """Watches the Worker's threads, and releases the worker's hold on its messages
    once dramatiq's Worker stopped."""

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        if isinstance(message, RedisMessage):
            message.started = True

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if isinstance(message, RedisMessage):
            message.settled = True

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        if isinstance(message, RedisMessage):
            message.settled = True

    def after_worker_thread_boot(self, broker: dramatiq.Broker, thread: threading.Thread) -> None:
        if isinstance(broker, ReliableRedisBroker):
            broker.thread_started(thread)

    def before_worker_thread_shutdown(
        self, broker: dramatiq.Broker, thread: threading.Thread
    ) -> None:
        if isinstance(broker, ReliableRedisBroker):
            broker.thread_stopped(thread)

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if isinstance(broker, ReliableRedisBroker):
            broker.release()
