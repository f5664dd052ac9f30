"""The operations view of a Redis namespace: workers, subscriptions, backlogs.

One reading (:func:`read_operations`, blocking) costs a handful of round trips:
the live workers and their descriptions (one script), the subscriptions and
their counters (one pipeline), the in-flight lists of the live workers (one
pipeline), the heads of each queue's ready, delayed and parked lists with their
bodies (two pipelines), and the unrouted window.  Nothing is scanned in full:
the age of a subscription's oldest waiting event is read from the first
:data:`OLDEST_WINDOW` entries of its queue's ready list and delayed set and the
head of its parked list.
"""

from __future__ import annotations

from eventbus.extras import requires_extra

with requires_extra("redis", __name__):
    import redis

import json
import time
from datetime import UTC, datetime
from typing import Any

import eventbus.redis.scripts as lua
from eventbus.backends.base import Operations, SubscriptionState, WorkerState
from eventbus.redis.subscriptions import list_subscriptions, unrouted_stats, worker_states

#: Entries read from the head of each queue's ready list (and delayed set) to find
#: the oldest waiting event of each of its handlers.
OLDEST_WINDOW = 100


def _stamp(body: bytes | None) -> tuple[str, int] | None:
    """(actor, publish time in ms) of a stored message body, or None."""
    if not body:
        return None
    try:
        message = json.loads(body)
        return str(message["actor_name"]), int(message["message_timestamp"])
    except (ValueError, KeyError, TypeError):
        return None


def _oldest(client: redis.Redis, namespace: str, pairs: set[tuple[str, str]]) -> dict[Any, int]:
    """The publish time (ms) of the oldest waiting event per (queue, actor) among
    ``pairs``: from the head of the queue's ready list and delayed set, and of the
    actor's parked list."""
    r: Any = client
    queues = sorted({queue for queue, _ in pairs})
    ordered = sorted(pairs)
    with r.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.lrange(lua.ready_key(namespace, queue), 0, OLDEST_WINDOW - 1)
            pipe.zrange(lua.delayed_key(namespace, queue), 0, OLDEST_WINDOW - 1)
        for queue, actor in ordered:
            pipe.lindex(lua.parked_key(namespace, queue, actor), 0)
        heads = pipe.execute()
    ids: dict[str, list[bytes]] = {}
    for i, queue in enumerate(queues):
        ids[queue] = [e for e in heads[2 * i] if e] + list(heads[2 * i + 1])
    for j, (queue, _) in enumerate(ordered):
        parked = heads[2 * len(queues) + j]
        if parked:
            ids[queue].append(parked)
    with r.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.hmget(lua.bodies_key(namespace, queue), ids[queue] or [b""])
        bodies = pipe.execute()
    out: dict[Any, int] = {}
    for queue, found in zip(queues, bodies, strict=True):
        for body in found:
            stamp = _stamp(body)
            if stamp is None:
                continue
            key = (queue, stamp[0])
            if key in pairs and (key not in out or stamp[1] < out[key]):
                out[key] = stamp[1]
    return out


def read_operations(
    client: redis.Redis, namespace: str, heartbeat_timeout: float, address: str
) -> Operations:
    """Workers, subscriptions (backlog, parked, oldest waiting event, code
    fingerprints) and the unrouted window of ``namespace`` (blocking)."""
    r: Any = client
    workers = worker_states(client, namespace, heartbeat_timeout)
    subscriptions = list_subscriptions(client, namespace, heartbeat_timeout, workers)
    with r.pipeline(transaction=False) as pipe:
        for w in workers:
            for queue in w.queues:
                pipe.llen(lua.inflight_key(namespace, w.id, queue))
        lengths = iter(pipe.execute())
    in_flight = {w.id: sum(int(next(lengths)) for _ in w.queues) for w in workers}
    waiting = {(s.queue, s.handler) for s in subscriptions if s.backlog or s.parked}
    oldest = _oldest(client, namespace, waiting) if waiting else {}
    now_ms = time.time() * 1000
    rows = []
    for s in subscriptions:
        first = oldest.get((s.queue, s.handler))
        rows.append(
            SubscriptionState(
                s.service,
                s.topic,
                s.handler,
                s.queue,
                s.backlog,
                s.parked,
                max(0.0, (now_ms - first) / 1000) if first is not None else None,
                s.live_workers,
                s.code,
                s.mixed_code,
            )
        )
    window = unrouted_stats(client, namespace)
    return Operations(
        "redis",
        address,
        datetime.now(UTC),
        rows,
        [
            WorkerState(w.label, w.beat_age, w.queues, in_flight[w.id], w.version, dict(w.code))
            for w in workers
        ],
        window.waiting,
        window.dropped,
        window.last_drop,
    )
