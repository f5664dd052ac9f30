"""Concurrency limits of handlers across the workers of a service (``@on_event(...,
concurrency=N)`` on the Redis backend).

Each run of a limited handler takes a slot of a Redis sorted set first
(:data:`~eventbus.redis.scripts.ACQUIRE`, one round trip) and gives it back
when its outcome is known (``ZREM``, one more).  Handlers without a limit cost
nothing: a dictionary lookup, no round trip.

An event that finds every slot taken waits for one in its worker thread, at most
:data:`LIMIT_WAIT` seconds: a slot given back in the same process wakes it at
once, one given back by another process is seen within :data:`LIMIT_POLL` (no
polling while every slot is held in this process).
Still none: it is not run and not counted as an attempt, it goes back to its
queue's delayed set, due :data:`LIMIT_RECHECK_DELAY` seconds later (jittered),
and the thread takes other work.  No retry is used and nothing is dead-lettered
for the limit.  A worker killed while running
limited handlers frees their slots when it is declared dead (the redelivery
timeout), as its in-flight events are handed to live workers.
"""

from __future__ import annotations

from eventbus.extras import requires_extra

with requires_extra("redis", __name__):
    import redis

import hashlib
import logging
import random
import threading
import time
from typing import TYPE_CHECKING, Any, cast

from dramatiq import Middleware
from dramatiq.middleware import SkipMessage

import eventbus.redis.scripts as lua
from eventbus import keys

if TYPE_CHECKING:
    from dramatiq import Broker
    from dramatiq.broker import MessageProxy

    from eventbus.redis.broker import ReliableRedisBroker

logger = logging.getLogger(__name__)

#: Seconds a worker thread waits for a free slot before putting the event back.
LIMIT_WAIT = 0.5
#: Seconds between two tries of a waiting thread while other processes hold slots
#: (one given back in this process wakes it at once).
LIMIT_POLL = 0.02
#: Seconds after which an event put back (no slot within :data:`LIMIT_WAIT`) is
#: handed to a worker again (each time drawn from 0.5x to 1.5x of it).
LIMIT_RECHECK_DELAY = 0.05
#: Attribute of a message proxy: milliseconds until it is handed over again (it
#: found no free slot; its consumer must neither ack nor run it).
_LATER = "eventbus_limit_later"
#: Attribute of a message proxy: the slot it holds, ``(slots key, holder)``.
_SLOT = "eventbus_limit_slot"
#: dramatiq's worker logs each skipped message at WARNING with this format.
_SKIP_LOG = "Message %s was skipped."


def hand_over_later(message: object) -> int | None:
    """Milliseconds after which ``message`` must be handed over again (it found no
    free slot of its handler's concurrency limit), or None: it ran."""
    later = getattr(message, _LATER, None)
    return later if isinstance(later, int) else None


class _QuietSkips(logging.Filter):
    """Drops dramatiq's "Message ... was skipped." warning for the events put back
    because their handler's slots were all taken (not a problem: a wait)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != _SKIP_LOG or not isinstance(record.args, tuple) or not record.args:
            return True
        return hand_over_later(record.args[0]) is None


_quiet_skips = _QuietSkips()


class ConcurrencyLimits(Middleware):
    """Holds each run of a limited handler to a slot of its Redis semaphore.

    Put it first in the chain: an event that finds no slot is skipped before any
    other middleware sees it (no metrics, span, attempt or retry for the wait).
    Needs a :class:`~eventbus.redis.broker.ReliableRedisBroker` (its client,
    namespace, worker id and heartbeat timeout).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: Per handler's slots key: notified when this process gives one back, and
        #: how many it gave back so far.
        self._freed: dict[str, threading.Condition] = {}
        self._releases: dict[str, int] = {}
        #: Per handler's slots key: the slots this process holds (when they are all
        #: its limit, a waiting thread need not ask Redis).
        self._held: dict[str, int] = {}
        #: Slots whose release failed (Redis unreachable): given back at the next run.
        self._unreleased: list[tuple[str, str]] = []
        # dramatiq's worker threads log through "dramatiq.worker.WorkerThread".
        logging.getLogger("dramatiq.worker.WorkerThread").addFilter(_quiet_skips)

    @staticmethod
    def limit_of(broker: Broker, message: MessageProxy) -> int | None:
        """The concurrency limit of ``message``'s handler, or None (no round trip)."""
        actor = broker.actors.get(message.actor_name)
        spec = actor.options.get(keys.HANDLER) if actor is not None else None
        return spec.concurrency if spec is not None else None

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        if getattr(message, _SLOT, None) is not None:
            return  # taken ahead by acquire() (off the event loop of a loop worker)
        if hand_over_later(message) is None:
            self.acquire(broker, message)
        if hand_over_later(message) is not None:
            raise SkipMessage(f"every slot of {message.actor_name}'s concurrency limit is taken")

    def acquire(self, broker: Broker, message: MessageProxy) -> None:
        """Take a slot for ``message`` (waiting up to :data:`LIMIT_WAIT` seconds, in
        the calling thread), or mark it to be handed over later.  A loop worker calls
        it in a thread before the message's middleware chain runs on its event loop,
        which must not block while the slots' holders run there."""
        limit = self.limit_of(broker, message)
        if limit is None:
            return
        worker = cast("ReliableRedisBroker", broker)
        client, namespace = worker.client, worker.namespace
        slots = lua.slots_key(namespace, message.queue_name, message.actor_name)
        holder = f"{worker.worker_id} {message.message_id}"
        timeout_ms = int(worker.heartbeat_timeout * 1000)
        if self._unreleased:
            self._release_pending(client)
        slot_keys = [slots, lua.heartbeats_key(namespace)]
        args = [holder, limit, timeout_ms]
        deadline = time.monotonic() + LIMIT_WAIT
        freed = self._condition(slots)
        while True:
            releases = self._releases.get(slots, 0)
            try:
                if self._held.get(slots, 0) >= limit:
                    taken = -1  # every slot is held here: wait for one of ours
                else:
                    taken = _acquire(client, slot_keys, args)
            except redis.RedisError as exc:
                # Put it back rather than run it over the limit: its consumer
                # retries the move until Redis answers.
                logger.warning("Could not take a slot of %s's limit: %s", message.actor_name, exc)
                taken = 0
                break
            left = deadline - time.monotonic()
            if taken == 1 or left <= 0:
                break
            # Every slot held in this process (-1): the next one given back here wakes
            # us; else also try again soon for those given back elsewhere.
            wait = left if taken == -1 else min(left, LIMIT_POLL)
            with freed:
                if self._releases.get(slots, 0) == releases:  # none given back since
                    freed.wait(wait)
        if taken == 1:
            with self._lock:
                self._held[slots] = self._held.get(slots, 0) + 1
            setattr(message, _SLOT, (slots, holder))
            return
        delay = LIMIT_RECHECK_DELAY * random.uniform(0.5, 1.5)
        setattr(message, _LATER, max(1, int(delay * 1000)))

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        self._release(broker, message)

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        self._release(broker, message)

    def _condition(self, slots: str) -> threading.Condition:
        condition = self._freed.get(slots)
        if condition is None:
            with self._lock:
                condition = self._freed.setdefault(slots, threading.Condition())
        return condition

    def _release(self, broker: Broker, message: MessageProxy) -> None:
        slot = getattr(message, _SLOT, None)
        if slot is None:
            return
        delattr(message, _SLOT)
        client = cast("ReliableRedisBroker", broker).client
        with self._lock:
            self._held[slot[0]] = self._held.get(slot[0], 1) - 1
        try:
            client.zrem(*slot)
            freed = self._condition(slot[0])
            with freed:
                self._releases[slot[0]] = self._releases.get(slot[0], 0) + 1
                freed.notify()  # one waiter: one slot
        except redis.RedisError as exc:
            logger.warning(
                "Could not give back a slot of %s's concurrency limit (%s); retrying at "
                "the next run.",
                message.actor_name,
                exc,
            )
            with self._lock:
                self._unreleased.append(slot)

    def _release_pending(self, client: redis.Redis) -> None:
        with self._lock:
            pending, self._unreleased = self._unreleased, []
        try:
            with client.pipeline(transaction=False) as pipe:
                for slots, holder in pending:
                    pipe.zrem(slots, holder)
                pipe.execute()
        except redis.RedisError:
            with self._lock:
                self._unreleased.extend(pending)


#: SHA1 of :data:`~eventbus.redis.scripts.ACQUIRE` (EVALSHA).
_ACQUIRE_SHA = hashlib.sha1(lua.ACQUIRE.encode()).hexdigest()


def _acquire(client: redis.Redis, keys: list[str], args: list[Any]) -> int:
    """Run :data:`~eventbus.redis.scripts.ACQUIRE` (EVALSHA, the script sent once
    when Redis does not know it): half the client CPU of redis-py's ``Script``."""
    command: Any = client.execute_command  # redis-py leaves it untyped
    try:
        reply = command("EVALSHA", _ACQUIRE_SHA, len(keys), *keys, *args)
    except redis.exceptions.NoScriptError:
        reply = command("EVAL", lua.ACQUIRE, len(keys), *keys, *args)
    return int(reply)
