"""Redis memory: what a full Redis does to ``publish``, and an eviction policy that
would lose events.

Events live in Redis until every handler has handled them, so Redis must never
*evict* eventbus's keys to make room: a queue or a message body evicted is an event
lost without a trace.  The setting that guarantees it is ``maxmemory-policy
noeviction`` (Redis' default): when ``used_memory`` reaches ``maxmemory``, Redis
refuses new writes instead, and ``publish`` raises
:class:`~eventbus.exceptions.PublishError` saying Redis is out of memory, with
nothing of the call published (the fan-out script's first write is the one Redis
refuses; see :func:`refusal`).

The ``volatile-*`` policies evict only keys with a time to live; eventbus sets one
only on the staging list of a large ``publish_many`` (whose loss fails that publish,
loudly), so they keep every acknowledged event too.  The ``allkeys-*`` policies may
evict anything: :func:`check_policy` warns at start and :func:`memory_health`
reports ``redis.memory`` *degraded* while the server runs one, and also while its
memory is nearly full.

Both read ``INFO memory`` (``maxmemory_policy``, ``used_memory``, ``maxmemory``),
not ``CONFIG GET``: managed services often disable ``CONFIG``; a server that refuses
``INFO`` too is reported as unknown, never as a failure.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Any

from eventbus.health import HealthResult, HealthStatus
from eventbus.redis.resp import RespClient, RespConnectionError, RespError

logger = logging.getLogger(__name__)

#: The eviction policy that keeps every key: a full Redis refuses writes instead.
SAFE_POLICY = "noeviction"
#: Prefix of the policies that evict only keys with a time to live (eventbus sets
#: one only on the staging list of a chunked publish).
VOLATILE_PREFIX = "volatile-"
#: Share of ``maxmemory`` in use from which health reports ``redis.memory`` degraded.
FULL_SHARE = 0.9
#: An error reply of Redis out of memory (``-OOM command not allowed when used
#: memory > 'maxmemory'``), alone or inside a script's error.
_OOM = re.compile(r"\bOOM\b|used memory > 'maxmemory'")


def refusal(exc: BaseException) -> str:
    """The message of a refused publish: Redis' reply and, when Redis is out of
    memory, what that means and what to do (the caller adds "nothing was published")."""
    message = f"Redis refused the event(s): {exc}"
    if not _OOM.search(str(exc)):
        return message
    return (
        f"{message.rstrip('. ')}. Redis is out of memory (OOM): its used memory reached "
        "`maxmemory` and its `maxmemory-policy noeviction` refuses new writes (as it "
        "should: an evicting policy would drop queued events). The events published before "
        "are kept. Make room: raise `maxmemory` (`CONFIG SET maxmemory ...` and "
        "redis.conf) or free memory; see the backlog with `eventbus subscriptions list`"
    )


async def forget(client: RespClient, key: str) -> None:
    """Delete ``key`` now, best effort (``DEL`` runs on a full Redis too): the chunks
    staged by a large publish that was refused, which would otherwise hold their memory
    until they expire and keep a full Redis full."""
    with contextlib.suppress(RespError, RespConnectionError):
        await client.call("DEL", key)


def parse_info(info: bytes | str | dict[str, Any]) -> dict[str, str]:
    """The ``field:value`` lines of an ``INFO`` reply (or the dict redis-py makes of it)."""
    if isinstance(info, dict):
        return {str(name): str(value) for name, value in info.items()}
    text = info.decode(errors="replace") if isinstance(info, bytes) else info
    out = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and not name.startswith("#"):
            out[name.strip()] = value.strip()
    return out


def evicting(policy: str) -> bool:
    """Whether ``policy`` may evict keys eventbus needs (queued events, subscriptions)."""
    return policy != SAFE_POLICY and not policy.startswith(VOLATILE_PREFIX)


def policy_problem(policy: str) -> str:
    """Why an evicting policy loses events, and the fix."""
    return (
        f"Redis runs maxmemory-policy {policy}: when its memory is full it may evict "
        "eventbus's keys (queued events, subscriptions), losing events silently. Set "
        "`maxmemory-policy noeviction` (publishes then fail with PublishError while Redis "
        "is full, and nothing is lost), or give eventbus a Redis of its own"
    )


async def _memory_info(client: RespClient) -> dict[str, str] | None:
    """``INFO memory`` as fields, or None when the server refuses or is unreachable."""
    try:
        return parse_info(await client.call("INFO", "memory"))
    except (RespError, RespConnectionError):
        return None


async def check_policy(client: RespClient, address: str) -> str | None:
    """Warn (WARNING log) when the server's eviction policy may evict eventbus's keys;
    returns the policy (None when it cannot be read)."""
    info = await _memory_info(client)
    policy = None if info is None else info.get("maxmemory_policy")
    if policy is None:
        logger.info(
            "Cannot read the eviction policy of Redis at %s (INFO memory refused); make sure "
            "it is maxmemory-policy noeviction, or events may be evicted.",
            address,
        )
    elif evicting(policy):
        logger.warning("%s (Redis at %s).", policy_problem(policy), address)
    return policy


async def memory_health(client: RespClient, name: str) -> list[HealthResult]:
    """``<name>.memory`` *degraded* while the eviction policy may evict eventbus's keys
    or the memory is nearly full; nothing when all is well or ``INFO`` is refused."""
    info = await _memory_info(client)
    if info is None:
        return []
    problems = []
    policy = info.get("maxmemory_policy", SAFE_POLICY)
    if evicting(policy):
        problems.append(policy_problem(policy))
    try:
        used, limit = int(info.get("used_memory", "0")), int(info.get("maxmemory", "0"))
    except ValueError:
        used, limit = 0, 0
    if limit and used >= FULL_SHARE * limit:
        problems.append(
            f"Redis memory is {used / limit:.0%} full ({used:,} of maxmemory {limit:,} "
            "bytes): at 100% "
            + (
                "publishes fail with PublishError (out of memory)"
                if policy == SAFE_POLICY
                else f"Redis evicts keys ({policy})"
            )
            + "; raise maxmemory or free memory"
        )
    if not problems:
        return []
    return [HealthResult(f"{name}.memory", HealthStatus.DEGRADED, "; ".join(problems))]
