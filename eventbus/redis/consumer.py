"""The consumer of one Redis queue, as dramatiq's worker sees it.

* **Latency.**  An idle consumer blocks in ``BLMOVE`` on its queue and wakes the
  moment an entry lands, instead of polling with a backoff that grows to a
  second (dramatiq: p99 ~740 ms at 2 events/s).  A backlog is fetched in
  batches of up to :data:`MAX_FETCH` by the FETCH script, which also promotes
  due retries.
* **Ids, not bytes.**  Lists hold entry ids; ack, requeue and recovery move or
  delete ids (see :mod:`eventbus.redis.scripts`).  Every entry taken sits in this
  worker's in-flight list until it is acked, so the heartbeat of
  :class:`~eventbus.redis.broker.ReliableRedisBroker` can hand it to a live
  worker if this one dies.
* **Rolling deploys.**  An entry for a handler this worker does not have, but
  that is subscribed (deployed on newer workers of the same queue), is parked for
  that handler instead of dead-lettered; workers that have it take it back at
  their next heartbeat.
* **Bad input** (bytes that are not a message, an unknown actor, an argument list
  that is not one envelope) is dead-lettered with the reason; the worker goes on.
* **Durable before acknowledged.**  A failed attempt whose retry could not be
  enqueued and whose dead letter could not be written (Redis down: see
  :class:`~eventbus.middleware.retries.Outcome`) is neither acked nor nacked: its
  entry moves from the in-flight list to the delayed set, due
  :data:`~eventbus.middleware.retries.UNRECORDED_REDELIVERY_DELAY` seconds later,
  and is handled again.  While Redis is unreachable that move fails too; dramatiq
  retries it until Redis answers, and if the worker dies meanwhile its in-flight
  entries go to live workers after the redelivery timeout.
"""

from __future__ import annotations

from eventbus.extras import requires_extra

with requires_extra("redis", __name__):
    import redis

import functools
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from dramatiq import Consumer, Message
from dramatiq.broker import MessageProxy
from dramatiq.errors import ActorNotFound, ConnectionClosed, DecodeError

import eventbus.redis.scripts as lua
from eventbus import keys
from eventbus.events import MAX_DEPTH, text_too_deep
from eventbus.middleware.retries import UNRECORDED_REDELIVERY_DELAY, unrecorded
from eventbus.redis.limits import hand_over_later
from eventbus.redis.messages import InvalidMessage, message_problem

if TYPE_CHECKING:
    from eventbus.redis.broker import ReliableRedisBroker

logger = logging.getLogger(__name__)

#: Seconds between two log lines about events parked for one handler.
PARKED_LOG_INTERVAL = 60.0


class ParkedLog:
    """Logs the events a worker parks for a handler it does not have: the first one
    at once, then at most one summary per handler every ``interval`` seconds (with
    the count since the last line), not one line per event: a handler deleted from
    the code but still subscribed gets every event of its topic parked.  The parked
    events are counted in Redis (``eventbus subscriptions list``, health)."""

    def __init__(self, interval: float = PARKED_LOG_INTERVAL) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        #: handler -> (when its last line was logged, events parked since)
        self._state: dict[str, tuple[float, int]] = {}

    def parked(self, handler: str) -> None:
        """One event was parked for ``handler``: log it, or count it for later."""
        now = time.monotonic()
        with self._lock:
            state = self._state.get(handler)
            if state is not None and now - state[0] < self.interval:
                self._state[handler] = (state[0], state[1] + 1)
                return
            self._state[handler] = (now, 0)
        if state is None:
            logger.info(
                "Parked an event for handler %s, which this worker does not have; a worker "
                "with it takes it at its next heartbeat (further ones are summarized "
                "every %gs).",
                handler,
                self.interval,
            )
            return
        logger.info(
            "Parked %d event(s) for handler %s in the last %.0fs: no worker of this queue "
            "that has it took them yet. If the handler was deleted, `eventbus "
            "subscriptions remove %s --yes` removes its subscription (and dead-letters "
            "what waits for it).",
            state[1] + 1,
            handler,
            now - state[0],
            handler,
        )


#: The process's parked-event log (shared by the consumers of every queue).
parked_log = ParkedLog()

#: Most entries one fetch takes (and most delayed entries one fetch promotes).
MAX_FETCH = 500
#: Most finished entries one ACK script call deletes.
MAX_ACKS = 200

#: Seconds between fetch-script polls while a full Redis refuses BLMOVE.
OOM_POLL = 0.05

#: Seconds under which a BLMOVE answer means entries were already waiting.
BACKLOG_HINT = 0.001
#: Seconds between connection attempts of a consumer while Redis is unreachable.
RECONNECT_DELAYS = (0.1, 0.25, 0.5, 1.0, 2.0)
#: Deepest nesting of a message's JSON: an event envelope's limit plus the message's
#: own levels (message, args, envelope).
MAX_MESSAGE_DEPTH = MAX_DEPTH + 3
#: Actor name given to the dead letter of bytes that are not a dramatiq message.
UNDECODABLE_ACTOR = "<undecodable>"


class RedisMessage(MessageProxy):
    """A message taken from Redis; ``entry`` is its id in the queue."""

    def __init__(self, message: Message[Any], entry: bytes) -> None:
        super().__init__(message)
        self.entry = entry
        #: Set when a worker thread starts it, and once the middleware chain saw the
        #: outcome: an entry acked between the two comes from a worker thread that
        #: died mid-message, and is put back.  (An entry acked without being started
        #: was re-enqueued by dramatiq's delay handling: a normal ack.)
        self.started = False
        self.settled = False


class RedisConsumer(Consumer):
    """Takes entries of one queue: batches when busy, a blocking BLMOVE when idle."""

    def __init__(
        self, broker: ReliableRedisBroker, queue_name: str, prefetch: int, timeout: int
    ) -> None:
        ns = broker.namespace
        self.broker = broker
        self.client = broker.client
        self.namespace = ns
        self.queue_name = queue_name
        self.prefetch = max(1, prefetch)
        self.timeout = max(0.01, timeout / 1000)
        self.ready = lua.ready_key(ns, queue_name)
        self.delayed = lua.delayed_key(ns, queue_name)
        self.bodies = lua.bodies_key(ns, queue_name)
        self.backlog = lua.backlog_key(ns, queue_name)
        self.inflight = lua.inflight_key(ns, broker.worker_id, queue_name)
        self.cache: deque[tuple[bytes, bytes]] = deque()
        self.outstanding = 0
        #: The entries handed to dramatiq and not acked, nacked or requeued yet.
        self.held: set[bytes] = set()
        self.acked = threading.Condition()
        # Grouped acks: finished entries waiting for one ACK script call (entry ->
        # handler).  They stay in the in-flight list and in ``held`` until it
        # succeeded: a crash meanwhile redelivers them, never loses them.
        self.to_ack: dict[bytes, str] = {}
        self.flushing = False
        self.must_fetch = True
        self.next_due: float = -1.0
        self.failures = 0
        self.must_reclaim = False
        self._fetch_script = broker.client.register_script(lua.FETCH)
        self._reclaim_script = broker.client.register_script(lua.RECLAIM)
        self._park_script = broker.client.register_script(lua.PARK)
        self._defer_script = broker.client.register_script(lua.DEFER)
        self._ack_script = broker.client.register_script(lua.ACK)

    # Called from worker threads (or by eventbus.redis.worker's acker, flush=False).
    def ack(self, message: MessageProxy, *, flush: bool = True) -> None:
        """Delete the finished ``message`` (grouped with the other finished ones);
        ``flush=False`` only adds it to the group, for the caller's
        :meth:`flush_acks`."""
        if isinstance(message, RedisMessage) and message.started and not message.settled:
            # Dramatiq acks a message whose worker thread died before the outcome
            # reached the middleware (neither handled nor dead-lettered): keep it.
            logger.error(
                "Event %s of handler %s was not finished (its worker thread died); "
                "putting it back.",
                message.message_id,
                message.actor_name,
            )
            self.requeue([message])
            return
        if unrecorded(message):  # its retry could not be enqueued
            self._defer(message)
            return
        later = hand_over_later(message)
        if later is not None:  # its handler's concurrency limit is reached: not run
            self._defer(message, later)
            return
        self._remove(message, flush)

    def nack(self, message: MessageProxy, *, flush: bool = True) -> None:
        """Delete the failed ``message`` (its dead letter is written), as :meth:`ack`."""
        if unrecorded(message):  # its dead letter could not be written
            self._defer(message)
            return
        # The DeadLetters middleware has recorded it in our own store already.
        self._remove(message, flush)

    def _defer(self, message: MessageProxy, later_ms: int | None = None) -> None:
        """Hand ``message`` over again later instead of acking it: neither its retry
        nor its dead letter is written (or, with ``later_ms``, it was not run: its
        handler's concurrency limit is reached).  Raises ConnectionClosed while
        Redis is unreachable (dramatiq's worker calls again until it answers)."""
        entry = message.entry if isinstance(message, RedisMessage) else None
        if entry is not None:
            delay_ms = later_ms if later_ms is not None else int(UNRECORDED_REDELIVERY_DELAY * 1000)
            try:
                moved = self._defer_script(
                    keys=[self.inflight, self.delayed, self.ready],
                    args=[entry, delay_ms],
                )
            except redis.RedisError as exc:
                raise connection_closed(exc) from None
            if moved and later_ms is None:
                logger.warning(
                    "Neither a retry nor a dead letter could be written for event %s of "
                    "handler %s; it is handled again in %gs.",
                    message.message_id,
                    message.actor_name,
                    UNRECORDED_REDELIVERY_DELAY,
                )
        self._done([entry] if entry is not None else [])

    def _remove(self, message: MessageProxy, flush: bool = True) -> None:
        entry = message.entry if isinstance(message, RedisMessage) else None
        if entry is None:
            self._done([])
            return
        with self.acked:
            self.to_ack.setdefault(entry, message.actor_name or "")  # once, even if retried
        if not flush:
            return
        try:
            self.flush_acks()
        except redis.RedisError as exc:
            with self.acked:
                pending = entry in self.to_ack
            if pending:  # dramatiq calls ack again: the group is flushed again
                raise connection_closed(exc) from None
            logger.warning("Could not delete finished events of queue %s: %s", self.queue_name, exc)

    def flush_acks(self) -> None:
        """Delete the finished entries of :attr:`to_ack`, up to ``MAX_ACKS`` per
        script call.  One thread flushes at a time; a thread that finds a flush
        under way leaves its entry to it (taken in its next call) and returns
        without waiting for Redis.  A RedisError leaves the group pending (retried
        by the next ack, by the consumer thread, and on close)."""
        with self.acked:
            if self.flushing:
                return
            self.flushing = True
        try:
            while True:
                with self.acked:
                    batch = list(itertools.islice(self.to_ack.items(), MAX_ACKS))
                    if not batch:
                        self.flushing = False
                        return
                self._ack_script(
                    keys=[self.inflight, self.bodies, self.backlog],
                    args=[item for pair in batch for item in pair],
                )
                entries = [entry for entry, _ in batch]
                with self.acked:
                    for entry in entries:
                        self.to_ack.pop(entry, None)
                self._done(entries)
        except BaseException:
            with self.acked:
                self.flushing = False
            raise

    def _delete_entry(self, entry: bytes, actor: str | None = None) -> None:
        """Delete a finished entry (and count it off its handler's backlog)."""
        # A script, not MULTI: it runs on a full (noeviction) Redis, see lua.ACK.
        self._ack_script(
            keys=[self.inflight, self.bodies, self.backlog],
            args=[entry, actor if actor is not None else ""],
        )

    def _done(self, entries: list[bytes]) -> None:
        with self.acked:
            self.outstanding = max(0, self.outstanding - len(entries))
            self.held.difference_update(entries)
            self.acked.notify()

    def requeue(self, messages: Iterable[MessageProxy]) -> None:
        entries = [m.entry for m in messages if isinstance(m, RedisMessage)]
        self._put_back(entries)
        self._done(entries)

    def _put_back(self, entries: list[bytes]) -> None:
        if not entries:
            return
        try:
            with self.client.pipeline(transaction=True) as pipe:
                for entry in entries:
                    pipe.lrem(self.inflight, 1, entry)  # type: ignore[arg-type]
                pipe.lpush(self.ready, *reversed(entries))
                pipe.execute()
        except redis.RedisError as exc:
            raise connection_closed(exc) from None

    def close(self) -> None:
        for delay in (0.0, 0.1, 0.5, 1.0):
            time.sleep(delay)
            try:
                self.flush_acks()
                break
            except redis.RedisError:
                continue
        else:
            with self.acked:
                unflushed = len(self.to_ack)
            if unflushed:
                logger.warning(
                    "Could not delete %d finished event(s) of queue %s; they are handled "
                    "again when this worker's heartbeat expires.",
                    unflushed,
                    self.queue_name,
                )
        cached, self.cache = [entry for entry, _ in self.cache], deque()
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
            # A command that moves entries into our in-flight list (BLMOVE, the
            # fetch script) may have run on the server with its reply lost.
            self.must_reclaim = True
            time.sleep(delay)
            return None
        if self.failures:
            logger.info("Redis is back; consuming queue %s again.", self.queue_name)
            self.failures = 0
        return message

    def _reclaim(self) -> None:
        """Put back the entries of our in-flight list that this consumer never
        received: taken by a command whose reply was lost with the connection, they
        would otherwise wait there, unhandled, for as long as this worker lives."""
        listed: list[bytes] = _command(self.client, "LRANGE", self.inflight, 0, -1)
        with self.acked:
            known = self.held | {entry for entry, _ in self.cache}
        unknown = [entry for entry in listed if entry not in known]
        if unknown:
            # Atomic per entry: one acked meanwhile is gone from the list and stays gone.
            moved = int(self._reclaim_script(keys=[self.inflight, self.ready], args=unknown))
            if moved:
                logger.warning(
                    "Put back %d event(s) of queue %s taken by a fetch whose reply was "
                    "lost with the connection.",
                    moved,
                    self.queue_name,
                )

    def _next(self) -> MessageProxy | None:
        if self.broker.failed is not None:
            time.sleep(self.timeout)  # a failed worker takes nothing more
            return None
        if self.to_ack:  # a group whose flush failed: retried here (RedisError: reconnect)
            self.flush_acks()
        if self.must_reclaim:
            self._reclaim()
            self.must_reclaim = False
        while True:
            while self.cache:
                message = self._decode(*self.cache.popleft())
                if message is not None:
                    return message
            with self.acked:
                if self.outstanding >= self.prefetch:
                    self.acked.wait(self.timeout)
                    return None
                room = min(self.prefetch - self.outstanding, MAX_FETCH)
            if self.must_fetch:
                reply = self._fetch_script(keys=self.fetch_keys, args=[room, MAX_FETCH])
                if self.fetched(reply):
                    continue
            block = self.block_seconds()
            asked = time.perf_counter()
            try:
                entry, tail = self._wait(block)
            except redis.exceptions.OutOfMemoryError:
                # A full (noeviction) Redis refuses BLMOVE; the fetch script runs
                # (lua.ACK/FETCH), so poll with it until Redis has room again.
                self.must_fetch = True
                time.sleep(min(block, OOM_POLL))
                return None
            # Entries left waiting: a backlog, fetch them in a batch next; none: block
            # again rather than run an empty fetch.
            self.must_fetch = more_waiting(tail, entry, time.perf_counter() - asked)
            if entry is None:
                # Timed out: fetch (promoting due retries) only if some are scheduled.
                self.must_fetch = self.next_due >= 0
                return None
            if entry == b"":  # wake-up token: a delayed entry became the earliest
                _command(self.client, "LREM", self.inflight, 1, b"")
                self.must_fetch = True
                continue
            if isinstance(tail, list) and len(tail) >= 2 and tail[0] == entry:
                body = tail[1]  # read as BLMOVE woke (see lua.TAIL_BODY)
            else:  # not seen so far; kept as the fallback
                body = _command(self.client, "HGET", self.bodies, entry)
            if body is None:  # removed meanwhile (its subscription was removed)
                _command(self.client, "LREM", self.inflight, 1, entry)
                continue
            return self._decode(entry, body)

    @property
    def fetch_keys(self) -> list[str]:
        """The keys of the FETCH script: ready, delayed, in-flight, bodies."""
        return [self.ready, self.delayed, self.inflight, self.bodies]

    def fetched(self, reply: list[Any]) -> bool:
        """Take a FETCH reply: its entries into the cache (True), or none: block next."""
        self.next_due = float(reply.pop())
        if reply:
            self.cache.extend(zip(reply[::2], reply[1::2], strict=True))
            return True
        self.must_fetch = False
        return False

    def block_seconds(self) -> float:
        """How long the next BLMOVE may wait: until the next delayed entry is due."""
        if self.next_due >= 0:
            return min(self.timeout, max(self.next_due / 1000, 0.001))
        return self.timeout

    def _wait(self, block: float) -> tuple[Any, Any]:
        """``BLMOVE`` an entry from the ready list to the tail of our in-flight list,
        waiting up to ``block`` seconds, and read the tail's body in the same round
        trip: the (entry or None, TAIL_BODY reply).  An idle worker's path from a
        publish to its handler has one round trip, not two."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.execute_command("BLMOVE", self.ready, self.inflight, "LEFT", "RIGHT", block)  # type: ignore[no-untyped-call]
            pipe.execute_command("EVAL", lua.TAIL_BODY, 3, self.inflight, self.bodies, self.ready)  # type: ignore[no-untyped-call]
            entry, tail = pipe.execute(raise_on_error=False)
        if isinstance(entry, Exception):
            raise entry
        return entry, tail

    def _decode(self, entry: bytes, body: bytes) -> MessageProxy | None:
        parsed = self.parse(entry, body)
        if isinstance(parsed, RedisMessage):
            return parsed
        parsed()  # dead-letter or park it
        return None

    def parse(self, entry: bytes, body: bytes) -> RedisMessage | Callable[[], None]:
        """The message of a fetched ``entry`` (now held: counted in the prefetch),
        or, for bad input, what dead-letters or parks it: a call to Redis, for the
        caller to make where a blocking call may wait (a thread, not an event loop)."""
        if text_too_deep(body, MAX_MESSAGE_DEPTH):
            # Never handed to dramatiq: its failure log would take the message's repr.
            error = InvalidMessage(f"nested deeper than {MAX_MESSAGE_DEPTH} levels")
            return functools.partial(self._reject_raw, entry, body, error)
        try:
            message = Message.decode(body)
        except DecodeError as exc:
            cause = exc.__cause__ or exc
            error = InvalidMessage(f"not a dramatiq message: {cause}")
            return functools.partial(self._reject_raw, entry, body, error)
        shape = message_problem(message, self.queue_name)
        if shape is not None:  # its fields cannot be trusted: record the raw bytes
            return functools.partial(self._reject_raw, entry, body, InvalidMessage(shape))
        try:
            problem = self._check(message)
        except ActorNotFound as exc:
            return functools.partial(self._park_or_reject, message, entry, body, exc)
        if problem is not None:
            return functools.partial(self._reject, message, entry, body, InvalidMessage(problem))
        with self.acked:
            self.outstanding += 1
            self.held.add(entry)
        return RedisMessage(message, entry)

    def _park_or_reject(
        self, message: Message[Any], entry: bytes, body: bytes, error: ActorNotFound
    ) -> None:
        if not self._park_if_subscribed(entry, message):
            self._reject(message, entry, body, error)

    def _check(self, message: Message[Any]) -> str | None:
        actor = self.broker.get_actor(message.actor_name)
        if keys.HANDLER not in actor.options:
            return None  # a plain dramatiq actor: its arguments are its own business
        if len(message.args) != 1 or message.kwargs:
            return "an eventbus message carries exactly one argument, the event envelope"
        return None

    def _park_if_subscribed(self, entry: bytes, message: Message[Any]) -> bool:
        """Park ``message`` for its handler when that handler is subscribed (deployed
        on other workers of this queue); False when nobody subscribes it."""
        topic = message.options.get(keys.TOPIC)
        if not isinstance(topic, str):
            return False
        field = f"{lua.service_of(self.queue_name)}|{message.actor_name}"
        if not _command(self.client, "HEXISTS", lua.topic_key(self.namespace, topic), field):
            return False
        parked = lua.parked_key(self.namespace, self.queue_name, message.actor_name)
        self._park_script(keys=[self.inflight, parked], args=[entry])
        parked_log.parked(message.actor_name)
        return True

    def _reject_raw(self, entry: bytes, body: bytes, error: Exception) -> None:
        text = body.decode("utf-8", errors="replace")
        message: Message[Any] = Message(
            queue_name=self.queue_name,
            actor_name=UNDECODABLE_ACTOR,
            args=(text,),
            kwargs={},
            options={},
            message_id=uuid.uuid4().hex,
        )
        self._reject(message, entry, body, error)

    def _reject(self, message: Message[Any], entry: bytes, body: bytes, error: Exception) -> None:
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
                self._reject_raw(entry, body, error)
                return
            logger.exception("Could not write the dead letter; the message stays in flight.")
            return
        if not recorded:
            logger.error("No DeadLetters middleware: the malformed message is dropped.")
        self._delete_entry(entry)


def more_waiting(tail: Any, entry: Any, waited: float) -> bool:
    """Whether entries wait in the ready list after a ``BLMOVE`` took ``entry``: the
    length :data:`~eventbus.redis.scripts.TAIL_BODY` read as it woke, or, when its
    reply is not about ``entry``, whether BLMOVE answered at once (under
    :data:`BACKLOG_HINT` seconds)."""
    if isinstance(tail, list) and len(tail) == 3 and tail[0] == entry:
        return isinstance(tail[2], int) and tail[2] > 0
    return waited < BACKLOG_HINT


def _command(client: redis.Redis, *args: Any) -> Any:
    # redis-py's stubs type members as str; ours are bytes.
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def connection_closed(exc: BaseException) -> ConnectionClosed:
    """``exc`` (a Redis error) as the error dramatiq's worker retries on."""
    return ConnectionClosed(exc)  # type: ignore[no-untyped-call]
