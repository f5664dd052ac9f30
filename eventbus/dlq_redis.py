"""A durable dead-letter store in Redis, shared by every process of a deployment.

Workers write records; the web process (``bus.dlq``, the admin router, the
``eventbus dlq`` CLI) reads, replays and purges them.  It is what the Redis
backend returns from ``dead_letter_store()``.

Keys (``{ns}`` is the backend's namespace)::

    {ns}:dlq          HASH  record id -> record JSON (FailedEvent.to_dict())
    {ns}:dlq:order    ZSET  record id -> insertion sequence (listed records)
    {ns}:dlq:claimed  ZSET  record id -> claim time (ms) of records being replayed
    {ns}:dlq:seq      counter of insertions
    {ns}:dlq:evicted  counter of records dropped to stay within ``max_size``

A claimed record is hidden from listings and other replays; if its claimer dies
before completing, the next read brings it back after :data:`CLAIM_TIMEOUT`.
A stored value that is not a record (written by hand, or damaged) is listed as
a record of error type ``UnreadableRecord`` holding the raw text, so it can be
seen and purged.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from .dlq import FailedEvent, newest
from .events import text_too_deep

#: Records listed when no limit is given.
DEFAULT_LIMIT = 10
#: Seconds after which a claimed record whose replay never completed is listed again.
CLAIM_TIMEOUT = 60.0
#: Records fetched per HMGET when scanning with filters.
SCAN_CHUNK = 500
#: ``error_type`` of a listed value that is not a valid record.
UNREADABLE = "UnreadableRecord"

_NOW = """
local __t = redis.call('TIME')
local now = tonumber(__t[1]) * 1000 + math.floor(tonumber(__t[2]) / 1000)
"""

# KEYS: hash, order, claimed, seq, evicted.  ARGV: id, json, max_size.
_ADD = """
local seq = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[2], seq, ARGV[1])
local excess = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[3])
if excess > 0 then
  local victims = redis.call('ZRANGE', KEYS[2], 0, excess - 1)
  redis.call('ZREM', KEYS[2], unpack(victims))
  redis.call('HDEL', KEYS[1], unpack(victims))
  redis.call('INCRBY', KEYS[5], #victims)
end
return 1
"""

# KEYS: hash, order, claimed, seq.  ARGV: claim timeout ms.  Lists stale claims again.
_RESTORE = (
    _NOW
    + """
local stale = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[1]),
  'LIMIT', 0, 1000)
for _, id in ipairs(stale) do
  redis.call('ZREM', KEYS[3], id)
  if redis.call('HEXISTS', KEYS[1], id) == 1 then
    redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[4]), id)
  end
end
return #stale
"""
)

# KEYS: hash, order, claimed.  ARGV: id.  Hides the record and returns it.
_CLAIM = (
    _NOW
    + """
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return false end
redis.call('ZADD', KEYS[3], now, ARGV[1])
return redis.call('HGET', KEYS[1], ARGV[1])
"""
)

# KEYS: hash, order.  ARGV: id.  Deletes a listed record and returns it.
_REMOVE = """
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return false end
local data = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
return data
"""


class RedisDeadLetterStore:
    """Dead letters in Redis, bounded by count (the oldest are evicted and counted).

    Parameters:
      client: A synchronous redis-py client.
      namespace: Key prefix (the Redis backend's namespace).
      max_size: Records kept.
      claim_timeout: Seconds before an unfinished claim is undone.

    Example::

        store = RedisDeadLetterStore(redis.Redis(), namespace="eventbus")
        for record in store.find(20, topic="user.created"):
            print(record.id, record.error_type, record.error)
    """

    #: Every call is a Redis round trip: async wrappers run it in a thread.
    blocking = True

    def __init__(
        self,
        client: redis.Redis,
        *,
        namespace: str = "eventbus",
        max_size: int = 10_000,
        claim_timeout: float = CLAIM_TIMEOUT,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.max_size = max_size
        self.claim_timeout = claim_timeout
        base = f"{namespace}:dlq"
        self._hash = base
        self._order = f"{base}:order"
        self._claimed = f"{base}:claimed"
        self._seq = f"{base}:seq"
        self._evicted = f"{base}:evicted"
        self._add = client.register_script(_ADD)
        self._restore = client.register_script(_RESTORE)
        self._claim = client.register_script(_CLAIM)
        self._remove = client.register_script(_REMOVE)

    @property
    def evicted(self) -> int:
        """Records dropped so far to stay within ``max_size``."""
        return int(self.client.get(self._evicted) or 0)

    def _decode(self, record_id: str | bytes, data: Any) -> FailedEvent | None:
        if data is None:
            return None
        try:
            if text_too_deep(data):  # to_dict never writes such a record
                raise ValueError("nested too deeply")
            fields = json.loads(data)
            if not isinstance(fields, dict):
                raise ValueError(f"a JSON {type(fields).__name__}, not an object")
            return FailedEvent.from_dict(fields)
        except (ValueError, KeyError, TypeError) as exc:
            return _unreadable(record_id, data, exc)

    def _restore_stale(self) -> None:
        self._restore(
            keys=[self._hash, self._order, self._claimed, self._seq],
            args=[int(self.claim_timeout * 1000)],
        )

    def add(self, record: FailedEvent) -> None:
        """Store ``record``, replacing one with the same id."""
        data = json.dumps(record.to_dict(), default=str)
        self._add(
            keys=[self._hash, self._order, self._claimed, self._seq, self._evicted],
            args=[record.id, data, self.max_size],
        )

    def find(
        self,
        limit: int | None = DEFAULT_LIMIT,
        *,
        topic: str | None = None,
        handler: str | None = None,
        error_type: str | None = None,
    ) -> list[FailedEvent]:
        """Matching records, oldest first; at most ``limit`` (the newest), None for all."""
        self._restore_stale()
        if limit is not None and limit <= 0:
            return []
        filtered = topic is not None or handler is not None or error_type is not None
        if not filtered and limit is not None:
            ids: list[bytes] = self.client.zrange(self._order, -limit, -1)  # type: ignore[assignment]
        else:
            ids = self.client.zrange(self._order, 0, -1)  # type: ignore[assignment]
        records: list[FailedEvent] = []
        for i in range(0, len(ids), SCAN_CHUNK):
            chunk = ids[i : i + SCAN_CHUNK]
            for record_id, data in zip(chunk, self.client.hmget(self._hash, chunk), strict=True):
                record = self._decode(record_id, data)
                if record is not None and record.matches(topic, handler, error_type):
                    records.append(record)
        return newest(records, limit)

    def peek(self, limit: int = DEFAULT_LIMIT) -> list[FailedEvent]:
        """The ``limit`` newest records, oldest first."""
        return self.find(limit)

    def get(self, record_id: str) -> FailedEvent | None:
        """The listed record with ``record_id``, or None (also while it is claimed)."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.zscore(self._order, record_id)
            pipe.hget(self._hash, record_id)
            score, data = pipe.execute()
        return None if score is None else self._decode(record_id, data)

    def remove(self, record_id: str) -> FailedEvent | None:
        """Delete and return the record with ``record_id``."""
        data = self._remove(keys=[self._hash, self._order], args=[record_id])
        return self._decode(record_id, data)

    def size(self) -> int:
        """How many records are listed (claimed ones excluded)."""
        self._restore_stale()
        return int(self.client.zcard(self._order))

    def clear(self) -> None:
        """Delete every record (the eviction counter stays)."""
        self.client.delete(self._hash, self._order, self._claimed)

    def claim(self, record_id: str) -> FailedEvent | None:
        """Hide the record from listings and other claims, and return it."""
        data = self._claim(keys=[self._hash, self._order, self._claimed], args=[record_id])
        return self._decode(record_id, data)

    def release(self, record: FailedEvent) -> None:
        """List a claimed record again (its replay failed)."""
        self.add(record)

    def complete(self, record_id: str) -> None:
        """Delete a claimed record (its replay is enqueued)."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.zrem(self._claimed, record_id)
            pipe.hdel(self._hash, record_id)
            pipe.execute()


def _unreadable(record_id: str | bytes, data: str | bytes, exc: Exception) -> FailedEvent:
    """A stand-in for a stored value that is not a record: listable and purgeable."""
    if isinstance(record_id, bytes):
        record_id = record_id.decode("utf-8", "replace")
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
    return FailedEvent(
        id=record_id,
        event=None,
        envelope=text,
        topic="",
        handler="",
        queue="",
        attempts=0,
        error=f"the stored dead-letter record is not valid JSON of a record: {exc}",
        error_type=UNREADABLE,
    )
