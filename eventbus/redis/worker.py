"""Redis worker processes whose handlers run on an event loop, not behind dramatiq's
worker threads (``EVENTBUS_REDIS_WORKER=loop``; the default is ``threads``).

Under ``dramatiq eventbus.actors`` a message of dramatiq's own worker crosses three
threads before an async handler runs: the consumer thread takes it from Redis, a
worker thread picks it from the work queue and runs the middleware, and dramatiq's
AsyncIO middleware hands the coroutine to its event-loop thread and blocks until
it is done.  Measured on a 2-core VM at 2 events/s (``bench/production_bench.py``),
the two hand-offs cost 0.7 ms of a 2 ms publish-to-handler p50, and every message
pays their CPU.

:class:`RedisWorkerLoop` keeps the consumer (:class:`~eventbus.redis.consumer.
RedisConsumer`: the blocking ``BLMOVE`` with the body in the same round trip, the
in-flight list, grouped acks, recovery) and hands each message straight to a
:class:`~eventbus.dispatch.Dispatcher` on one event loop, the one the Kafka bridge
and the embedded backend use:

* async handlers run on the worker's loop (one hop from the consumer thread, no
  thread blocked per handler); sync handlers in a pool of ``--threads`` threads;
* the whole middleware chain runs as before (retries, dead letters, metrics,
  tracing, concurrency limits); time limits are the dispatcher's (async handlers
  are cancelled, sync ones interrupted), with the same ``HandlerTimeout``;
* finished messages go to an acker thread, which deletes them in groups (one
  script call for every message finished meanwhile): a crash before that only
  redelivers them (they stay in this worker's in-flight list);
* at most ``prefetch`` messages per queue are held (dramatiq's: twice
  ``--threads``), as with dramatiq's worker.

dramatiq's Worker still runs the process (signals, ``--processes``, its hooks);
its consumers are not started and its worker threads stay idle.
``EVENTBUS_REDIS_WORKER=threads`` (the default) runs handlers on dramatiq's worker
threads.  The loop halves the p99 at rest (2 vs 4 ms at 2 events/s); under a steady
flow it keeps pace with the publisher a few events per fetch, which costs more Redis
commands and wake-ups per event than dramatiq's batches (docs/redis.md has both).
"""

from __future__ import annotations

from eventbus.extras import requires_extra

with requires_extra("redis", __name__):
    import redis

import asyncio
import contextlib
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.common import q_name
from dramatiq.errors import ConnectionClosed
from dramatiq.middleware import TimeLimit

from eventbus.dispatch import Dispatcher
from eventbus.redis.consumer import RECONNECT_DELAYS, RedisConsumer, RedisMessage
from eventbus.redis.limits import ConcurrencyLimits

if TYPE_CHECKING:
    from eventbus.redis.broker import ReliableRedisBroker

logger = logging.getLogger(__name__)

#: The queue name dramatiq's Worker is restricted to, so that it starts no consumer.
NO_QUEUE = "eventbus-loop-worker-consumes-no-queue"
#: Seconds a consumer thread waits before trying again after an unexpected error.
CONSUMER_ERROR_DELAY = 1.0

#: Seconds the acker waits after a message finished for others to finish, so that one
#: ACK call deletes them all (``bench/production_bench.py``, one run of 10,000 events
#: at ~4,500/s on a 2-core VM: worker CPU 168 -> 86 us per event, Redis commands
#: 10.9 -> 8.8).  A crash meanwhile only redelivers them; a consumer that holds its
#: whole prefetch cuts the wait short.
ACK_LINGER = 0.002

_STOP = object()


class RedisWorkerLoop:
    """Consumes ``queues`` of ``broker`` and runs their handlers on one event loop.

    Parameters:
      broker: The worker's broker (its actors declared).
      queues: The queues to consume.
      prefetch: Most messages held per queue (taken and not yet acked).
      timeout_ms: Longest ``BLMOVE`` wait; a stop takes effect within it.
      max_concurrency: Handlers running at once.
      worker_threads: Threads for sync handlers.
    """

    def __init__(
        self,
        broker: ReliableRedisBroker,
        queues: list[str],
        *,
        prefetch: int,
        timeout_ms: int,
        max_concurrency: int,
        worker_threads: int,
    ) -> None:
        self.broker = broker
        self.queues = queues
        self.prefetch = prefetch
        self.timeout_ms = timeout_ms
        self.max_concurrency = max_concurrency
        self.worker_threads = worker_threads
        self.consumers: dict[str, RedisConsumer] = {}
        self.loop = asyncio.new_event_loop()
        self.dispatcher: Dispatcher | None = None
        self._acks: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stopping = threading.Event()
        #: Set by a consumer that holds its whole prefetch: ack now, do not linger.
        self._full = threading.Event()
        #: monotonic time after which the acker stops retrying (set by stop()).
        self._give_up_at = float("inf")
        self._threads: list[threading.Thread] = []
        self._consumer_threads: list[threading.Thread] = []
        self._acker = threading.Thread(target=self._ack_loop, name="eventbus-redis-acker")
        self._limits = next(
            (m for m in broker.middleware if isinstance(m, ConcurrencyLimits)), None
        )

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start the loop, the dispatcher, the acker and one consumer per queue."""
        broker = self.broker
        for middleware in [m for m in broker.middleware if isinstance(m, TimeLimit)]:
            # Its timer raises in the thread that started the message: here the
            # loop's.  The dispatcher enforces the handlers' time limits itself.
            broker.remove_middleware(middleware)
        for name in self.queues:
            consumer = broker.consume(name, prefetch=self.prefetch, timeout=self.timeout_ms)
            assert isinstance(consumer, RedisConsumer)
            consumer.on_full = self._full.set
            self.consumers[name] = consumer
        loop_thread = threading.Thread(
            target=self.loop.run_forever, name="eventbus-redis-loop", daemon=True
        )
        loop_thread.start()
        self.dispatcher = asyncio.run_coroutine_threadsafe(self._dispatcher(), self.loop).result()
        self._watch(loop_thread)
        self._watch(self._acker)
        for name, consumer in self.consumers.items():
            thread = threading.Thread(
                target=self._consume, args=(consumer,), name=f"eventbus-redis-consumer({name})"
            )
            self._consumer_threads.append(thread)
            self._watch(thread)
        logger.info(
            "Redis: handlers run on the worker's event loop (consuming %s; prefetch %d per "
            "queue, %d thread(s) for sync handlers: --threads).",
            ", ".join(self.queues),
            self.prefetch,
            self.worker_threads,
        )

    async def _dispatcher(self) -> Dispatcher:
        dispatcher = Dispatcher(
            self.broker,
            asyncio.get_running_loop(),
            max_concurrency=self.max_concurrency,
            worker_threads=self.worker_threads,
            settle=self._acks.put,
            prepare=self._prepare,
        )
        dispatcher.task.add_done_callback(self._dispatcher_done)
        return dispatcher

    def _prepare(self, proxy: MessageProxy) -> Callable[[], None] | None:
        """A handler with a concurrency limit takes its slot in a thread: the wait
        for one must not block the loop, where the slots' holders run."""
        limits = self._limits
        if limits is None or limits.limit_of(self.broker, proxy) is None:
            return None
        return functools.partial(limits.acquire, self.broker, proxy)

    def _dispatcher_done(self, task: asyncio.Task[None]) -> None:
        if self._stopping.is_set():
            return
        reason = "cancelled" if task.cancelled() else repr(task.exception())
        logger.critical("The event dispatcher of this worker stopped: %s", reason)
        self.broker.fail(f"the event dispatcher stopped: {reason}")

    def _watch(self, thread: threading.Thread) -> None:
        """Start ``thread``, watched like dramatiq's worker threads: one that dies
        fails the worker (see ``ReliableRedisBroker.check_threads``)."""
        if not thread.is_alive():
            thread.daemon = True
            thread.start()
        self._threads.append(thread)
        self.broker.thread_started(thread)

    def stop(self, timeout: float, margin: float) -> None:
        """Stop taking messages; let in-flight handlers finish within ``timeout``
        (then cancel them: they are settled with their outcome); put back what
        was taken and not started; flush the acks within ``margin`` more seconds."""
        deadline = time.monotonic() + timeout + margin
        self._give_up_at = deadline
        self._stopping.set()
        for thread in self._threads:
            self.broker.thread_stopped(thread)
        for thread in self._consumer_threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        undelivered: list[Any] = []
        if self.dispatcher is not None and self.loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self.dispatcher.stop(timeout), self.loop)
            try:
                undelivered = future.result(max(0.0, deadline - time.monotonic()) + 1.0)
            except Exception:
                logger.exception("The event dispatcher did not stop cleanly.")
        self._acks.put(_STOP)
        if self._acker.is_alive():
            self._acker.join(max(0.0, deadline - time.monotonic()))
        by_queue: dict[str, list[MessageProxy]] = {}
        for message in undelivered:
            if isinstance(message, RedisMessage):
                by_queue.setdefault(message.queue_name, []).append(message)
        for name, consumer in self.consumers.items():
            with contextlib.suppress(ConnectionClosed):  # the heartbeat's expiry brings them
                consumer.requeue(by_queue.get(name, []))
            consumer.close()
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)

    # -- threads ----------------------------------------------------------------------

    def _consume(self, consumer: RedisConsumer) -> None:
        dispatcher = self.dispatcher
        assert dispatcher is not None
        stopping = self._stopping
        while not stopping.is_set():
            try:
                message = next(consumer)
            except Exception:
                logger.exception(
                    "The consumer of queue %s failed; trying again in %gs.",
                    consumer.queue_name,
                    CONSUMER_ERROR_DELAY,
                )
                stopping.wait(CONSUMER_ERROR_DELAY)
                continue
            if message is None:
                continue
            # The rest of its fetch too: one hand-over to the loop for all.
            batch = [message, *consumer.take_cached()]
            dispatcher.push_many(batch)

    def _ack_loop(self) -> None:
        """Settle finished messages: every one finished meanwhile in one ACK call.

        A settle Redis refuses (unreachable) is kept and tried again with a growing
        delay, the others go on; its entry stays in this worker's in-flight list
        meanwhile, so a crash only redelivers it.  After stop() the acker keeps
        trying until stop()'s deadline, then leaves the rest to the heartbeat's
        expiry."""
        acks = self._acks
        retry: list[MessageProxy] = []
        unflushed = False
        failures = 0
        stopped = False
        while True:
            batch: list[Any] = []
            try:
                if retry or unflushed:
                    delay = RECONNECT_DELAYS[min(failures - 1, len(RECONNECT_DELAYS) - 1)]
                    batch.append(acks.get(timeout=delay))
                elif not stopped:
                    batch.append(acks.get())
                    if not self._stopping.is_set():
                        self._full.wait(ACK_LINGER)  # let the group grow: one ACK call
                        self._full.clear()
                while True:
                    batch.append(acks.get_nowait())
            except queue.Empty:
                pass
            if _STOP in batch:
                stopped = True
                batch = [item for item in batch if item is not _STOP]
            pending, retry = retry, []
            for proxy in pending:
                if not self._settle(proxy):
                    retry.append(proxy)
            for proxy in batch:
                if not self._settle(proxy):
                    logger.warning(
                        "Could not settle event %s of handler %s: Redis is unreachable; it "
                        "stays in this worker's hands and is settled once Redis answers.",
                        proxy.message_id,
                        proxy.actor_name,
                    )
                    retry.append(proxy)
            unflushed = False
            for consumer in self.consumers.values():
                if consumer.to_ack:
                    try:
                        consumer.flush_acks()
                    except redis.RedisError as exc:
                        if not failures:
                            logger.warning(
                                "Could not delete finished events of queue %s (%s); retrying.",
                                consumer.queue_name,
                                exc,
                            )
                        unflushed = True
            if retry or unflushed:
                failures += 1
            elif failures:
                logger.info("Redis is back; finished events are settled again.")
                failures = 0
            if stopped and (not (retry or unflushed) or time.monotonic() >= self._give_up_at):
                if retry or unflushed:
                    logger.warning(
                        "Could not settle %d finished event(s) before shutdown; they are "
                        "handled again when this worker's heartbeat expires.",
                        len(retry) + sum(len(c.to_ack) for c in self.consumers.values()),
                    )
                return

    def _settle(self, proxy: MessageProxy) -> bool:
        """Ack or nack ``proxy`` with its consumer (grouped: not flushed); False
        while Redis does not take it."""
        consumer = self.consumers.get(proxy.queue_name)
        if consumer is None:  # not ours (cannot happen): it stays in flight
            return True
        try:
            if proxy.failed:
                consumer.nack(proxy, flush=False)
            else:
                consumer.ack(proxy, flush=False)
        except (ConnectionClosed, redis.RedisError):
            return False
        return True


def worker_queues(broker: dramatiq.Broker, worker: dramatiq.Worker) -> list[str]:
    """The declared queues of ``broker`` that ``worker`` was told to consume
    (``--queues``), then restricts ``worker`` to none: its consumers would compete
    with the loop's."""
    whitelist = getattr(worker, "consumer_whitelist", None)
    queues = sorted(
        name for name in broker.get_declared_queues() if not whitelist or q_name(name) in whitelist
    )
    worker.consumer_whitelist = {NO_QUEUE}
    return queues
