"""Redis worker processes whose handlers run on an event loop, not behind dramatiq's
worker threads (``EVENTBUS_REDIS_WORKER=loop``, the default; ``threads`` runs them
on dramatiq's).

Under ``dramatiq eventbus.actors`` a message of dramatiq's own worker crosses three
threads before an async handler runs: the consumer thread takes it from Redis, a
worker thread picks it from the work queue and runs the middleware, and dramatiq's
AsyncIO middleware hands the coroutine to its event-loop thread and blocks until
it is done.  Measured on a 2-core VM at 2 events/s (``bench/production_bench.py``),
the two hand-offs cost 0.7 ms of a 2 ms publish-to-handler p50, and every message
pays their CPU.

:class:`RedisWorkerLoop` does it all on one event loop, with no thread hop between
Redis and an async handler:

* one consumer task per queue takes entries as
  :class:`~eventbus.redis.consumer.RedisConsumer` does (the same scripts: a
  blocking ``BLMOVE`` with the body in the same round trip when idle, batches of
  up to ``MAX_FETCH`` when busy, the in-flight list, due retries promoted, a full
  Redis polled), over its own connection of the asyncio RESP client (Sentinel
  included), and hands them to a :class:`~eventbus.dispatch.Dispatcher`, the one
  the Kafka bridge and the embedded backend use;
* async handlers run on that loop; sync handlers in a pool of ``--threads`` threads;
* the whole middleware chain runs as before (retries, dead letters, metrics,
  tracing, concurrency limits); time limits are the dispatcher's (async handlers
  are cancelled, sync ones interrupted), with the same ``HandlerTimeout``;
* an acker task deletes finished messages in groups (one script call for every
  message finished meanwhile): a crash before that only redelivers them (they
  stay in this worker's in-flight list).  What needs a blocking call (an event
  handed over later: its retry unwritable, or its handler's slots all taken; bad
  input dead-lettered or parked; entries put back after a lost reply) runs in a
  thread, never on the loop;
* at most ``prefetch`` messages per queue are held (dramatiq's: twice ``--threads``)
  and ``--threads`` handlers run at once, as with dramatiq's worker.

dramatiq's Worker still runs the process (signals, ``--processes``, its hooks);
its consumers are not started and its worker threads stay idle.
``EVENTBUS_REDIS_WORKER=threads`` runs handlers on dramatiq's worker threads
(docs/redis.md compares the two).
"""

from __future__ import annotations

from eventbus.extras import requires_extra

with requires_extra("redis", __name__):
    import redis

import asyncio
import contextlib
import functools
import hashlib
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.common import q_name
from dramatiq.errors import ConnectionClosed
from dramatiq.middleware import TimeLimit

import eventbus.redis.scripts as lua
from eventbus.dispatch import Dispatcher
from eventbus.middleware.retries import unrecorded
from eventbus.redis.consumer import (
    MAX_ACKS,
    MAX_FETCH,
    OOM_POLL,
    RECONNECT_DELAYS,
    RedisConsumer,
    RedisMessage,
    more_waiting,
)
from eventbus.redis.limits import ConcurrencyLimits, hand_over_later
from eventbus.redis.resp import DEFAULT_TIMEOUT, RespClient, RespConnectionError, RespError

if TYPE_CHECKING:
    from eventbus.redis.broker import ReliableRedisBroker

logger = logging.getLogger(__name__)

#: The queue name dramatiq's Worker is restricted to, so that it starts no consumer.
NO_QUEUE = "eventbus-loop-worker-consumes-no-queue"
#: Seconds a consumer task waits before trying again after an unexpected error.
CONSUMER_ERROR_DELAY = 1.0

#: Seconds the acker waits after a message finished for others to finish, so that one
#: ACK call deletes them all.  A crash meanwhile only redelivers them; a consumer that
#: holds its whole prefetch cuts the wait short.
ACK_LINGER = 0.002

#: A ``BLMOVE`` answered within this many seconds, with nothing more waiting, means a
#: steady flow that the consumer keeps pace with one event per round trip: it then
#: waits :data:`FETCH_LINGER` before its next fetch, which takes what came meanwhile in
#: one round trip (a few events per fetch, not one: fewer wake-ups and Redis commands
#: per event).  An event that arrives after a longer quiet (at rest, or at a few
#: hundred a second) still goes to its handler as ``BLMOVE`` wakes, with no wait.
STEADY_FLOW = 0.001
#: Seconds a consumer that keeps pace with a steady flow waits before its next fetch.
FETCH_LINGER = 0.001

#: What a call to Redis raises when Redis is unreachable or refuses it.
REDIS_ERRORS = (RespError, RespConnectionError, OSError, redis.RedisError, ConnectionClosed)

#: A factory of asyncio RESP clients for the worker's Redis (``timeout``,
#: ``max_connections``), e.g. ``functools.partial(RespClient.from_url, url)``.
ClientFactory = Callable[..., RespClient]


class RedisWorkerLoop:
    """Consumes ``queues`` of ``broker`` and runs their handlers on one event loop.

    Parameters:
      broker: The worker's broker (its actors declared).
      queues: The queues to consume.
      clients: Makes the asyncio RESP clients the consumers and the acker use.
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
        clients: ClientFactory,
        prefetch: int,
        timeout_ms: int,
        max_concurrency: int,
        worker_threads: int,
    ) -> None:
        self.broker = broker
        self.queues = queues
        self.clients = clients
        self.prefetch = prefetch
        self.timeout_ms = timeout_ms
        self.max_concurrency = max_concurrency
        self.worker_threads = worker_threads
        self.consumers: dict[str, RedisConsumer] = {}
        self.loop = asyncio.new_event_loop()
        self.dispatcher: Dispatcher | None = None
        self._loop_thread = threading.Thread(
            target=self.loop.run_forever, name="eventbus-redis-loop", daemon=True
        )
        self._stopping = threading.Event()
        #: monotonic time after which the acker stops retrying (set by stop()).
        self._give_up_at = float("inf")
        self._limits = next(
            (m for m in broker.middleware if isinstance(m, ConcurrencyLimits)), None
        )
        # Loop state (made on the loop by _start()).
        self._queues: list[_QueueConsumer] = []
        self._acker: asyncio.Task[None] | None = None
        self._ack_client: RespClient | None = None
        self._settled: list[MessageProxy] = []
        self._ack_wanted: asyncio.Event | None = None
        self._stop_event: asyncio.Event | None = None
        #: Set by a consumer that holds its whole prefetch: ack now, do not linger.
        self._full: asyncio.Event | None = None
        self._acker_stop = False

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
            self.consumers[name] = consumer
        self._loop_thread.start()
        # Watched like dramatiq's worker threads: a loop that ends fails the worker
        # (see ReliableRedisBroker.check_threads).
        self.broker.thread_started(self._loop_thread)
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result()
        logger.info(
            "Redis: handlers run on the worker's event loop (consuming %s; prefetch %d per "
            "queue, %d thread(s) for sync handlers: --threads).",
            ", ".join(self.queues),
            self.prefetch,
            self.worker_threads,
        )

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._ack_wanted = asyncio.Event()
        self._full = asyncio.Event()
        self._stop_event = asyncio.Event()
        self.dispatcher = Dispatcher(
            self.broker,
            loop,
            max_concurrency=self.max_concurrency,
            worker_threads=self.worker_threads,
            settle=self._settle_later,
            prepare=self._prepare,
        )
        self.dispatcher.task.add_done_callback(self._task_done)
        self._ack_client = self.clients(timeout=DEFAULT_TIMEOUT)
        for consumer in self.consumers.values():
            # Its own connection: a blocking BLMOVE holds it.
            client = self.clients(timeout=consumer.timeout + DEFAULT_TIMEOUT, max_connections=1)
            queue_consumer = _QueueConsumer(self, consumer, client)
            queue_consumer.task = loop.create_task(queue_consumer.run())
            queue_consumer.task.add_done_callback(self._task_done)
            self._queues.append(queue_consumer)
        self._acker = loop.create_task(self._ack_loop())
        self._acker.add_done_callback(self._task_done)

    def _prepare(self, proxy: MessageProxy) -> Callable[[], None] | None:
        """A handler with a concurrency limit takes its slot in a thread: the wait
        for one must not block the loop, where the slots' holders run."""
        limits = self._limits
        if limits is None or limits.limit_of(self.broker, proxy) is None:
            return None
        return functools.partial(limits.acquire, self.broker, proxy)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        """The dispatcher, a consumer or the acker ended: unless stopping, the
        worker fails (it exits; its events go to live workers)."""
        if self._stopping.is_set():
            return
        reason = "cancelled" if task.cancelled() else repr(task.exception())
        logger.critical("A task of this worker's event loop stopped: %s", reason)
        self.broker.fail(f"a task of the worker's event loop stopped: {reason}")

    def stop(self, timeout: float, margin: float) -> None:
        """Stop taking messages; let in-flight handlers finish within ``timeout``
        (then cancel them: they are settled with their outcome); put back what
        was taken and not started; flush the acks within ``margin`` more seconds."""
        deadline = time.monotonic() + timeout + margin
        self._give_up_at = deadline
        self._stopping.set()
        self.broker.thread_stopped(self._loop_thread)
        undelivered: list[Any] = []
        if self.loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self._stop(timeout, deadline), self.loop)
            try:
                undelivered = future.result(max(0.0, deadline - time.monotonic()) + 1.0)
            except Exception:
                logger.exception("The event loop of this worker did not stop cleanly.")
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

    async def _stop(self, timeout: float, deadline: float) -> list[Any]:
        assert self._stop_event is not None and self._ack_wanted is not None
        self._stop_event.set()
        # The consumers return after their current wait (at most the BLMOVE timeout).
        tasks = [q.task for q in self._queues if q.task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
            for task in late:  # what its last fetch took comes back with the heartbeat
                task.cancel()
        undelivered: list[Any] = []
        if self.dispatcher is not None:
            try:
                undelivered = await self.dispatcher.stop(timeout)
            except Exception:
                logger.exception("The event dispatcher did not stop cleanly.")
        self._acker_stop = True
        self._ack_wanted.set()
        if self._acker is not None:
            await asyncio.wait([self._acker], timeout=max(0.0, deadline - time.monotonic()))
        for client in [self._ack_client, *(q.client for q in self._queues)]:
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close()
        return undelivered

    async def pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if the worker stops meanwhile."""
        assert self._stop_event is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), seconds)

    # -- acks ---------------------------------------------------------------------------

    def _settle_later(self, proxy: MessageProxy) -> None:
        """The dispatcher's ``settle`` (on the loop): ``proxy`` finished."""
        assert self._ack_wanted is not None
        self._settled.append(proxy)
        self._ack_wanted.set()

    def wants_acks(self) -> None:
        """A consumer holds its whole prefetch: flush the acks now."""
        assert self._ack_wanted is not None and self._full is not None
        self._full.set()
        self._ack_wanted.set()

    async def _ack_loop(self) -> None:
        """Settle finished messages: every one finished meanwhile in one ACK call.

        A settle Redis refuses (unreachable) is kept and tried again with a growing
        delay, the others go on; its entry stays in this worker's in-flight list
        meanwhile, so a crash only redelivers it.  After stop() the acker keeps
        trying until stop()'s deadline, then leaves the rest to the heartbeat's
        expiry."""
        wanted, full = self._ack_wanted, self._full
        assert wanted is not None and full is not None
        loop = asyncio.get_running_loop()
        retry: list[MessageProxy] = []
        unflushed = False
        failures = 0
        while True:
            if not (self._settled or retry or unflushed):
                if self._acker_stop:
                    return
                wanted.clear()
                await wanted.wait()
                if not self._acker_stop and not full.is_set():
                    # Let the group grow (one ACK call), unless a consumer is full.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(full.wait(), ACK_LINGER)
            full.clear()
            batch, self._settled = self._settled, []
            pending, retry, slow = retry, [], []
            for proxy in [*pending, *batch]:
                if _needs_io(proxy):
                    slow.append(proxy)
                elif not self._settle(proxy):  # cannot happen: no call to Redis
                    retry.append(proxy)
            if slow:  # a call to Redis each: in a thread, not on the loop
                refused = await loop.run_in_executor(None, self._settle_all, slow)
                fresh = {id(p) for p in batch}
                for proxy in refused:
                    if id(proxy) in fresh:
                        logger.warning(
                            "Could not settle event %s of handler %s: Redis is unreachable; "
                            "it stays in this worker's hands and is settled once Redis "
                            "answers.",
                            proxy.message_id,
                            proxy.actor_name,
                        )
                retry.extend(refused)
                for queue_consumer in self._queues:  # put back or deferred: room made
                    queue_consumer.room.set()
            unflushed = False
            for queue_consumer in self._queues:
                try:
                    await queue_consumer.flush_acks()
                except REDIS_ERRORS as exc:
                    if not failures:
                        logger.warning(
                            "Could not delete finished events of queue %s (%s); retrying.",
                            queue_consumer.consumer.queue_name,
                            exc,
                        )
                    unflushed = True
            if not (retry or unflushed):
                if failures:
                    logger.info("Redis is back; finished events are settled again.")
                    failures = 0
                continue
            failures += 1
            if self._acker_stop and time.monotonic() >= self._give_up_at:
                logger.warning(
                    "Could not settle %d finished event(s) before shutdown; they are "
                    "handled again when this worker's heartbeat expires.",
                    len(retry) + sum(len(c.to_ack) for c in self.consumers.values()),
                )
                return
            delay = RECONNECT_DELAYS[min(failures - 1, len(RECONNECT_DELAYS) - 1)]
            await asyncio.sleep(min(delay, max(0.0, self._give_up_at - time.monotonic())))

    def _settle_all(self, proxies: list[MessageProxy]) -> list[MessageProxy]:
        """Settle ``proxies`` (in a thread); returns those Redis did not take."""
        return [proxy for proxy in proxies if not self._settle(proxy)]

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


def _needs_io(proxy: MessageProxy) -> bool:
    """Whether settling ``proxy`` calls Redis at once (it is handed over later, or
    put back), rather than joining the group of finished entries to delete."""
    if unrecorded(proxy) or hand_over_later(proxy) is not None:
        return True
    return isinstance(proxy, RedisMessage) and proxy.started and not proxy.settled


class _QueueConsumer:
    """Takes the entries of one queue on the worker's loop: the same steps and
    scripts as :meth:`RedisConsumer._next`, whose state (prefetch, held entries,
    finished ones waiting for their ACK) it shares, over an asyncio connection."""

    def __init__(self, owner: RedisWorkerLoop, consumer: RedisConsumer, client: RespClient):
        self.owner = owner
        self.consumer = consumer
        self.client = client
        self.task: asyncio.Task[None] | None = None
        #: Set when acks were flushed: room in the prefetch.
        self.room = asyncio.Event()
        self.failures = 0
        #: Wait FETCH_LINGER before the next fetch (see STEADY_FLOW).
        self.linger = False

    async def run(self) -> None:
        owner, consumer = self.owner, self.consumer
        dispatcher = owner.dispatcher
        assert dispatcher is not None
        while not owner._stopping.is_set():
            try:
                messages = await self._next()
            except REDIS_ERRORS as exc:
                delay = RECONNECT_DELAYS[min(self.failures, len(RECONNECT_DELAYS) - 1)]
                if self.failures == 0:
                    logger.warning(
                        "Lost Redis on queue %s (%s); reconnecting.", consumer.queue_name, exc
                    )
                self.failures += 1
                consumer.must_fetch = True
                # A command that moves entries into our in-flight list (BLMOVE, the
                # fetch script) may have run on the server with its reply lost.
                consumer.must_reclaim = True
                await owner.pause(delay)
                continue
            except Exception:
                logger.exception(
                    "The consumer of queue %s failed; trying again in %gs.",
                    consumer.queue_name,
                    CONSUMER_ERROR_DELAY,
                )
                await owner.pause(CONSUMER_ERROR_DELAY)
                continue
            if self.failures:
                logger.info("Redis is back; consuming queue %s again.", consumer.queue_name)
                self.failures = 0
            if messages:
                dispatcher.push_many(messages)

    async def _next(self) -> list[MessageProxy]:
        consumer, owner = self.consumer, self.owner
        if consumer.broker.failed is not None:
            await owner.pause(consumer.timeout)  # a failed worker takes nothing more
            return []
        if consumer.must_reclaim:
            await asyncio.to_thread(consumer._reclaim)
            consumer.must_reclaim = False
        while True:
            if consumer.cache:
                messages = await self._take_cached()
                if messages:
                    return messages
                continue
            with consumer.acked:
                held = consumer.outstanding
            if held >= consumer.prefetch:
                self.room.clear()
                owner.wants_acks()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.room.wait(), consumer.timeout)
                return []
            room = min(consumer.prefetch - held, MAX_FETCH)
            if self.linger:  # a steady flow: let a few events gather, take them at once
                self.linger = False
                await owner.pause(FETCH_LINGER)
                consumer.must_fetch = True
            if consumer.must_fetch:
                keys = consumer.fetch_keys
                reply = await _script(self.client, lua.FETCH, keys, [room, MAX_FETCH])
                if consumer.fetched(reply):
                    continue
            block = consumer.block_seconds()
            asked = time.perf_counter()
            entry, tail = await self.client.execute(
                [
                    ("BLMOVE", consumer.ready, consumer.inflight, "LEFT", "RIGHT", block),
                    ("EVAL", lua.TAIL_BODY, 3, consumer.inflight, consumer.bodies, consumer.ready),
                ]
            )
            if isinstance(entry, RespError):
                if not str(entry).startswith("OOM"):
                    raise entry
                # A full (noeviction) Redis refuses BLMOVE; the fetch script runs
                # (lua.ACK/FETCH), so poll with it until Redis has room again.
                consumer.must_fetch = True
                await owner.pause(min(block, OOM_POLL))
                return []
            # Entries left waiting: a backlog, fetch them in a batch next; none: block
            # again rather than run an empty fetch.
            waited = time.perf_counter() - asked
            consumer.must_fetch = more_waiting(tail, entry, waited)
            self.linger = not consumer.must_fetch and waited < STEADY_FLOW
            if entry is None:
                # Timed out: fetch (promoting due retries) only if some are scheduled.
                consumer.must_fetch = consumer.next_due >= 0
                return []
            if entry == b"":  # wake-up token: a delayed entry became the earliest
                await self.client.call("LREM", consumer.inflight, 1, b"")
                consumer.must_fetch = True
                continue
            if isinstance(tail, list) and len(tail) >= 2 and tail[0] == entry:
                body = tail[1]  # read as BLMOVE woke (see lua.TAIL_BODY)
            else:
                body = await self.client.call("HGET", consumer.bodies, entry)
            if body is None:  # removed meanwhile (its subscription was removed)
                await self.client.call("LREM", consumer.inflight, 1, entry)
                continue
            consumer.cache.append((entry, body))

    async def _take_cached(self) -> list[MessageProxy]:
        """The fetched entries, decoded; bad input is dead-lettered (or parked) in a
        thread.  If that fails, the entries stay in our in-flight list, unknown to
        this consumer: the next call puts them back (and they come again)."""
        consumer = self.consumer
        messages: list[MessageProxy] = []
        problems: list[Callable[[], None]] = []
        while consumer.cache:
            parsed = consumer.parse(*consumer.cache.popleft())
            if isinstance(parsed, RedisMessage):
                messages.append(parsed)
            else:
                problems.append(parsed)
        if problems:
            try:
                await asyncio.to_thread(_run_all, problems)
            except Exception as exc:
                logger.warning(
                    "Could not dead-letter a fetched event of queue %s (%s); it is taken again.",
                    consumer.queue_name,
                    exc,
                )
                consumer.must_reclaim = True
                consumer.must_fetch = True
        return messages

    async def flush_acks(self) -> None:
        """Delete the finished entries waiting for their ACK, up to ``MAX_ACKS`` per
        script call.  A failure leaves them pending (in the in-flight list too)."""
        consumer = self.consumer
        client = self.owner._ack_client
        assert client is not None
        keys = [consumer.inflight, consumer.bodies, consumer.backlog]
        while True:
            with consumer.acked:
                batch = list(itertools.islice(consumer.to_ack.items(), MAX_ACKS))
            if not batch:
                return
            await _script(client, lua.ACK, keys, [item for pair in batch for item in pair])
            entries = [entry for entry, _ in batch]
            with consumer.acked:
                for entry in entries:
                    consumer.to_ack.pop(entry, None)
            consumer._done(entries)
            self.room.set()


def _run_all(calls: list[Callable[[], None]]) -> None:
    for call in calls:
        call()


_SHAS: dict[str, str] = {}


async def _script(client: RespClient, script: str, keys: list[Any], args: list[Any]) -> Any:
    """Run ``script`` (by its SHA1, loaded when Redis does not know it); an error
    reply is raised as RespError."""
    sha = _SHAS.get(script)
    if sha is None:
        sha = _SHAS[script] = hashlib.sha1(script.encode()).hexdigest()
    [reply] = await client.execute([("EVALSHA", sha, len(keys), *keys, *args)])
    if isinstance(reply, RespError) and str(reply).startswith("NOSCRIPT"):
        [reply] = await client.execute([("EVAL", script, len(keys), *keys, *args)])
    if isinstance(reply, RespError):
        raise reply
    return reply


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
