"""What a worker says at boot about the subscriptions stored in Redis.

- **A subscription of its own service that no code serves.**  A handler deleted
  from the code keeps its subscription (subscriptions outlive workers), and every
  event of its topic waits for it.  A worker that boots warns once per such
  subscription (none of its handlers and no live worker has it), naming it and
  the command that removes it.
- **A topic that looks mistyped.**  A handler subscribed to ``order.plcaed``
  gets nothing while the publishers send ``order.placed``.  Publishers note each
  topic they publish to in ``{ns}:ptopics`` (one ``HSET`` per topic per process,
  ever: nothing per event), and the unrouted window counts the topics whose
  events reached no subscription.  A subscribed topic that no event was ever
  published to, close to one that was (:func:`difflib.get_close_matches`), is
  reported with a "did you mean" (by the worker at boot, and by ``eventbus
  subscriptions list``).  A subscribed topic not published yet and close to no
  published one is never reported: a fresh topic is not a mistake.
"""

from __future__ import annotations

from eventbus.extras import requires_extra

with requires_extra("redis", __name__):
    import redis

import difflib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from eventbus.redis.subscriptions import Subscription, list_subscriptions, unrouted_stats

logger = logging.getLogger(__name__)

#: How close (difflib ratio) a topic must be to a known one to be called a typo.
TYPO_CUTOFF = 0.85


@dataclass(frozen=True)
class SuspectTopic:
    """A subscribed topic that looks like a typo of a published one.

    Attributes:
      topic: The subscribed topic (no event was ever published to it).
      services: The services subscribing it.
      suggestion: The published topic it is close to.
    """

    topic: str
    services: tuple[str, ...]
    suggestion: str

    def message(self) -> str:
        """The warning, one line."""
        return (
            f"Topic {self.topic!r} has subscriptions ({', '.join(self.services)}) but no "
            f"event was ever published to it; did you mean {self.suggestion!r}?"
        )


def suspect_topics(
    rows: Iterable[Subscription], published: Iterable[str], services: Iterable[str] | None = None
) -> list[SuspectTopic]:
    """The subscribed topics of ``rows`` that no event was published to and that are
    close to a ``published`` topic.  ``services``: only topics of these services."""
    by_topic: dict[str, set[str]] = {}
    for row in rows:
        by_topic.setdefault(row.topic, set()).add(row.service)
    seen = set(published)
    wanted = None if services is None else set(services)
    out = []
    for topic, subscribers in sorted(by_topic.items()):
        if topic in seen or (wanted is not None and not subscribers & wanted):
            continue
        close = difflib.get_close_matches(topic, sorted(seen), n=1, cutoff=TYPO_CUTOFF)
        if close:
            out.append(SuspectTopic(topic, tuple(sorted(subscribers)), close[0]))
    return out


def published_topics_key(namespace: str) -> str:
    """The hash of the topics publishers noted (topic -> when, ms)."""
    return f"{namespace}:ptopics"


def published_topics(client: redis.Redis, namespace: str) -> set[str]:
    """Topics events were published to: noted by publishers, or kept or dropped by
    the unrouted window."""
    r: Any = client
    noted = {t.decode(errors="replace") for t in r.hkeys(published_topics_key(namespace))}
    stats = unrouted_stats(client, namespace)
    return noted | set(stats.waiting) | set(stats.dropped)


def check_at_boot(
    client: redis.Redis,
    namespace: str,
    service: str,
    own: Iterable[str],
    heartbeat_timeout: float,
) -> list[str]:
    """Log a WARNING for each subscription of ``service`` that neither this process
    (``own``: its subscription names) nor a live worker serves, and for each topic
    of ``service`` that looks mistyped.  Returns the warnings.  Never raises on a
    Redis error (logged): it must not stop a worker from booting."""
    try:
        rows = list_subscriptions(client, namespace, heartbeat_timeout)
        published = published_topics(client, namespace)
    except redis.RedisError as exc:
        logger.warning("Could not check the subscriptions of service %s: %s", service, exc)
        return []
    mine = set(own)
    warnings = []
    for row in rows:
        if row.service != service or row.field in mine or row.live_workers:
            continue
        warnings.append(
            f"Subscription {row.field} of service {service} has no handler in this "
            f"worker and no live worker serves it: its events wait ({row.backlog} so "
            f"far). If handler {row.handler} was deleted, remove its subscription: "
            f"eventbus subscriptions remove {row.handler} --service {service} --yes "
            "(dead-letters what waits for it)."
        )
    for suspect in suspect_topics(rows, published, services=[service]):
        warnings.append(suspect.message())
    for text in warnings:
        logger.warning("%s", text)
    return warnings
