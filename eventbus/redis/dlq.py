"""A durable dead-letter store in Redis, shared by every process of a deployment.

Workers write records; the web process (``bus.dlq``, the admin router, the
console, the ``eventbus dlq`` CLI) reads, replays and purges them.  It is what
the Redis backend returns from ``dead_letter_store()``.

Keys (``{ns}`` is the backend's namespace)::

    {ns}:dlq          HASH  record id -> record JSON (FailedEvent.to_dict())
    {ns}:dlq:order    ZSET  record id -> insertion sequence (listed records)
    {ns}:dlq:claimed  ZSET  record id -> claim time (ms) of records being replayed
    {ns}:dlq:seq      counter of insertions
    {ns}:dlq:evicted  counter of records dropped to stay within ``max_size`` and ``max_bytes``
    {ns}:dlq:bytes    bytes of the records and summaries stored (the JSON texts)
    {ns}:dlq:sum      HASH  record id -> summary JSON (no payload, no traceback)
    {ns}:dlq:ix       ZSET  record id -> final failure time (us), listed records
    {ns}:dlq:ix:t:<topic>, :ix:h:<handler>, :ix:e:<error type>,
    {ns}:dlq:ix:g:<group>    the same, per topic, handler, error type and group
    {ns}:dlq:groups   HASH  group -> record count (group: handler and error type)
    {ns}:dlq:ixkeys   SET   the per-value index keys that exist
    {ns}:dlq:audit    LIST  audit entries (JSON), newest first
    {ns}:dlq:replays  HASH  replayed record id -> id of the record its replay became
                            when it failed again (``FailedEvent.replay_of``)

The indexes let the console list, filter, page and group 100,000 records with
a handful of O(log n) commands; every script that lists or unlists a record
keeps them up to date.  Records written by a version without indexes are
indexed on the next search (:meth:`RedisDeadLetterStore.reindex`).

A claimed record is hidden from listings and other replays; if its claimer dies
before completing, the next read brings it back after :data:`CLAIM_TIMEOUT`.
A stored value that is not a record (written by hand, or damaged, or holding
``NaN`` / ``Infinity``, which are not JSON) is listed as a record of error type
``UnreadableRecord`` holding the raw text, so it can be seen and purged.

**Bounds.**  The store keeps at most ``max_size`` records and ``max_bytes`` bytes
of them (:data:`~eventbus.config.DEFAULT_DLQ_MAX_BYTES`, 256 MiB, counted as the
length of each record's JSON and summary; Redis' own overhead per key comes on
top).  Adding a record evicts the oldest ones until both hold, counts them in
``evicted`` and logs a warning (at most one per :data:`EVICTION_LOG_INTERVAL`).
A record larger than ``max_bytes / RECORD_SHARE`` alone is cut before it is
written (:func:`~eventbus.dlq.cut.fit_record`, the Kafka store's rules too): its
error and traceback first, its payload too if that is not enough (it then cannot
be replayed; the record says why and keeps the payload's size and sha256), with a
warning.  One record never evicts more than a tenth of the store, and none is
refused.

One concept past ~500 lines: the Redis dead-letter store, whose methods all keep
one set of keys (records, summaries, indexes, bounds, claims) consistent; its
Lua scripts are :mod:`eventbus.redis.dlq_scripts`, its audit trail the small
:class:`RedisAuditLog` beside it.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, cast

import redis

import eventbus.redis.dlq_scripts as lua
from eventbus.config import DEFAULT_DLQ_MAX_BYTES, DEFAULT_DLQ_MAX_SIZE
from eventbus.dlq.audit_log import DEFAULT_AUDIT_SIZE, AuditEntry
from eventbus.dlq.cut import fit_record
from eventbus.dlq.records import FailedEvent, newest, refuse_constants
from eventbus.dlq.search import (
    MAX_GROUPS,
    MAX_MICROS,
    MIN_MICROS,
    DeadLetterPage,
    DeadLetterQuery,
    DeadLetterSummary,
    FailureGroup,
    from_micros,
    parse_cursor,
)
from eventbus.events import text_too_deep

logger = logging.getLogger(__name__)

#: Records listed when no limit is given.
DEFAULT_LIMIT = 10
#: Seconds after which a claimed record whose replay never completed is listed again.
CLAIM_TIMEOUT = 60.0
#: Records fetched per HMGET when scanning with filters.
SCAN_CHUNK = 500
#: Index entries a search reads at most per page when two filters have no shared
#: index (topic and error type): the page may then be short, with a next cursor.
MAX_SCAN = 5_000
#: ``error_type`` of a listed value that is not a valid record.
UNREADABLE = "UnreadableRecord"
#: A record larger than ``max_bytes / RECORD_SHARE`` is cut before it is written.
RECORD_SHARE = 10
#: Follows the reason of a dead letter whose payload was dropped to fit the store.
DROP_HINT = "a tenth of EVENTBUS_DLQ_MAX_BYTES, the most one Redis dead letter may take"
#: Seconds between two warnings about evicted records (each counts those since the last).
EVICTION_LOG_INTERVAL = 60.0


class RedisDeadLetterStore:
    """Dead letters in Redis, bounded by count and by bytes (the oldest are evicted
    and counted; see the module's docstring).

    Also a :class:`~eventbus.dlq.search.SearchableStore` (indexed pages,
    groups and selections for the console) and an
    :class:`~eventbus.dlq.audit_log.AuditedStore` (its :attr:`audit` trail is a Redis list
    next to the records).

    Parameters:
      client: A synchronous redis-py client.
      namespace: Key prefix (the Redis backend's namespace).
      max_size: Records kept.
      max_bytes: Bytes of records kept (their JSON and summaries); a record over
        ``max_bytes / RECORD_SHARE`` is cut to fit.
      claim_timeout: Seconds before an unfinished claim is undone.
      audit_size: Audit entries kept.

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
        max_size: int = DEFAULT_DLQ_MAX_SIZE,
        max_bytes: int = DEFAULT_DLQ_MAX_BYTES,
        claim_timeout: float = CLAIM_TIMEOUT,
        audit_size: int = DEFAULT_AUDIT_SIZE,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.max_size = max_size
        self.max_bytes = max_bytes
        #: Bytes one record may take; a larger one is cut before it is written.
        self.max_record_bytes = max(max_bytes // RECORD_SHARE, 1)
        self.claim_timeout = claim_timeout
        base = f"{namespace}:dlq"
        self._prefix = base
        self._hash = base
        self._order = f"{base}:order"
        self._evicted = f"{base}:evicted"
        self._bytes = f"{base}:bytes"
        self._evictions_lock = threading.Lock()
        self._evictions_unlogged = 0
        self._evictions_logged_at = -math.inf
        self._sum = f"{base}:sum"
        self._ix = f"{base}:ix"
        self._groups = f"{base}:groups"
        self._replays = f"{base}:replays"
        self._add = client.register_script(lua.ADD)
        self._restore = client.register_script(lua.RESTORE)
        self._claim = client.register_script(lua.CLAIM)
        self._remove = client.register_script(lua.REMOVE)
        self._complete = client.register_script(lua.COMPLETE)
        self._clear = client.register_script(lua.CLEAR)
        self._reindex = client.register_script(lua.REINDEX)
        #: Actions taken on these records, kept in Redis with them.
        self.audit = RedisAuditLog(client, f"{base}:audit", max_size=audit_size)

    @property
    def evicted(self) -> int:
        """Records dropped so far to stay within ``max_size`` and ``max_bytes``."""
        return int(self.client.get(self._evicted) or 0)

    @property
    def used_bytes(self) -> int:
        """Bytes the stored records and their summaries take (what ``max_bytes`` bounds)."""
        return int(self.client.get(self._bytes) or 0)

    def _decode(self, record_id: str | bytes, data: Any) -> FailedEvent | None:
        if data is None:
            return None
        try:
            if text_too_deep(data):  # to_dict never writes such a record
                raise ValueError("nested too deeply")
            fields = json.loads(data, parse_constant=refuse_constants)
            if not isinstance(fields, dict):
                raise ValueError(f"a JSON {type(fields).__name__}, not an object")
            return FailedEvent.from_dict(fields)
        except (ValueError, KeyError, TypeError, OverflowError) as exc:
            return _unreadable(record_id, data, exc)

    def _restore_stale(self) -> None:
        self._restore(args=[self._prefix, int(self.claim_timeout * 1000)])

    def add(self, record: FailedEvent) -> None:
        """Store ``record``, replacing one with the same id (cut first when it is
        larger than :attr:`max_record_bytes`); evicts the oldest records while the
        store is over ``max_size`` or ``max_bytes``."""
        evicted = self._add(args=self._add_args(record))
        self._evictions(int(evicted))
        if record.replay_of:
            self._link_replays([record])

    def add_many(self, records: Iterable[FailedEvent], *, chunk: int = SCAN_CHUNK) -> None:
        """Store many records, ``chunk`` per round trip (imports, benchmarks)."""
        pending = list(records)
        for i in range(0, len(pending), chunk):
            with self.client.pipeline(transaction=False) as pipe:
                for record in pending[i : i + chunk]:
                    self._add(args=self._add_args(record), client=pipe)
                evicted = pipe.execute()
            self._evictions(sum(int(n) for n in evicted))
        self._link_replays([r for r in pending if r.replay_of])

    def _link_replays(self, records: list[FailedEvent]) -> None:
        """Remember which record each replayed one became; drop links to records
        gone when the links outnumber ``max_size``."""
        if not records:
            return
        self.client.hset(self._replays, mapping={r.replay_of: r.id for r in records})
        if int(self.client.hlen(self._replays)) <= self.max_size:
            return
        for old, new in self.client.hscan_iter(self._replays):
            if self.client.zscore(self._order, new) is None:
                self.client.hdel(self._replays, old)

    def replayed_as(self, ids: list[str]) -> dict[str, str]:
        """``{old id: new id}`` for those of ``ids`` whose replay failed again into a
        record still stored (see :class:`~eventbus.dlq.store.TracksReplays`)."""
        if not ids:
            return {}
        links = cast(list[bytes | None], self.client.hmget(self._replays, ids))
        found = {
            old: new.decode("utf-8", "replace") for old, new in zip(ids, links, strict=True) if new
        }
        if not found:
            return {}
        scores = self.client.zmscore(self._order, list(found.values()))
        return {
            old: new
            for (old, new), score in zip(found.items(), scores, strict=True)
            if score is not None
        }

    def _add_args(self, record: FailedEvent) -> list[Any]:
        data, summary = _encoded(record)
        size = len(data) + len(summary)
        if size > self.max_record_bytes:
            record, cut = fit_record(
                record,
                self.max_record_bytes,
                lambda r, _cut: sum(map(len, _encoded(r))),
                DROP_HINT,
            )
            data, summary = _encoded(record)
            logger.warning(
                "Dead letter %s (handler %s) was %s bytes, over the %s a record may take in "
                "the Redis dead-letter store (a tenth of EVENTBUS_DLQ_MAX_BYTES=%s): its %s "
                "cut to fit, now %s bytes%s.",
                record.id,
                record.handler,
                f"{size:,}",
                f"{self.max_record_bytes:,}",
                self.max_bytes,
                " and ".join(cut),
                f"{len(data) + len(summary):,}",
                "; the payload was dropped, so it cannot be replayed" if "payload" in cut else "",
            )
        return [self._prefix, record.id, data, summary, self.max_size, self.max_bytes]

    def _evictions(self, count: int) -> None:
        """Log evictions: the first at once, then at most one warning per interval."""
        if count <= 0:
            return
        with self._evictions_lock:
            self._evictions_unlogged += count
            now = time.monotonic()
            if now - self._evictions_logged_at < EVICTION_LOG_INTERVAL:
                return
            count, self._evictions_unlogged = self._evictions_unlogged, 0
            self._evictions_logged_at = now
        logger.warning(
            "Evicted %s dead letter(s), the oldest first, to keep the Redis store within "
            "%s records and %s bytes (EVENTBUS_DLQ_MAX_SIZE, EVENTBUS_DLQ_MAX_BYTES); %s "
            "evicted in all. Replay or purge them, or raise the bounds.",
            f"{count:,}",
            f"{self.max_size:,}",
            f"{self.max_bytes:,}",
            f"{self.evicted:,}",
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
        if topic is None and handler is None and error_type is None:
            start = -limit if limit is not None else 0
            ids: list[bytes] = self.client.zrange(self._order, start, -1)  # type: ignore[assignment]
        else:
            self._ensure_indexed()
            query = DeadLetterQuery(topic=topic, handler=handler, error_type=error_type)
            ids = self._insertion_order(self._select(query))
            if limit is not None:
                ids = ids[-limit:]
        records: list[FailedEvent] = []
        for i in range(0, len(ids), SCAN_CHUNK):
            chunk = ids[i : i + SCAN_CHUNK]
            for record_id, data in zip(chunk, self.client.hmget(self._hash, chunk), strict=True):
                record = self._decode(record_id, data)
                if record is not None and record.matches(topic, handler, error_type):
                    records.append(record)
        return newest(records, limit)

    def _insertion_order(self, ids: list[bytes]) -> list[bytes]:
        """``ids`` that are listed, oldest inserted first (``find``'s order)."""
        ranked: list[tuple[float, bytes]] = []
        for i in range(0, len(ids), SCAN_CHUNK):
            chunk = ids[i : i + SCAN_CHUNK]
            scores = self.client.zmscore(self._order, chunk)  # type: ignore[arg-type]
            ranked += [(sc, m) for m, sc in zip(chunk, scores, strict=True) if sc is not None]
        ranked.sort()
        return [m for _, m in ranked]

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

    def get_many(self, ids: list[str]) -> list[FailedEvent | None]:
        """:meth:`get` of each of ``ids``, :data:`SCAN_CHUNK` per round trip."""
        found: list[FailedEvent | None] = []
        for i in range(0, len(ids), SCAN_CHUNK):
            chunk = ids[i : i + SCAN_CHUNK]
            with self.client.pipeline(transaction=False) as pipe:
                pipe.zmscore(self._order, chunk)
                pipe.hmget(self._hash, chunk)
                scores, rows = pipe.execute()
            found += [
                None if score is None else self._decode(record_id, data)
                for record_id, score, data in zip(chunk, scores, rows, strict=True)
            ]
        return found

    def remove(self, record_id: str) -> FailedEvent | None:
        """Delete and return the record with ``record_id``."""
        data = self._remove(args=[self._prefix, record_id])
        return self._decode(record_id, data)

    def size(self) -> int:
        """How many records are listed (claimed ones excluded)."""
        self._restore_stale()
        return int(self.client.zcard(self._order))

    def clear(self) -> None:
        """Delete every record (the eviction counter and the audit trail stay)."""
        self._clear(args=[self._prefix])
        self.client.delete(self._replays)

    def claim(self, record_id: str) -> FailedEvent | None:
        """Hide the record from listings and other claims, and return it."""
        data = self._claim(args=[self._prefix, record_id])
        return self._decode(record_id, data)

    def release(self, record: FailedEvent) -> None:
        """List a claimed record again (its replay failed)."""
        self.add(record)

    def complete(self, record_id: str) -> None:
        """Delete a claimed record (its replay is enqueued)."""
        self._complete(args=[self._prefix, record_id])

    # -- indexes: what the console reads --------------------------------------------

    def reindex(self) -> int:
        """Bring the indexes in line with the listed records; returns how many it fixed.

        Needed once after records were written or deleted by a version without
        indexes (a rolling upgrade); :meth:`search` and friends call it when the
        index and the listing differ in size.  Reads every id: O(n).
        """
        listed = set(cast(list[bytes], self.client.zrange(self._order, 0, -1)))
        indexed = set(cast(list[bytes], self.client.zrange(self._ix, 0, -1)))
        fixed = 0
        missing = sorted(listed - indexed)
        for i in range(0, len(missing), SCAN_CHUNK):
            chunk = missing[i : i + SCAN_CHUNK]
            args: list[Any] = [self._prefix]
            for record_id, data in zip(chunk, self.client.hmget(self._hash, chunk), strict=True):
                record = self._decode(record_id, data)
                if record is not None:
                    args += [record_id, _summary_json(record)]
            fixed += int(self._reindex(args=args))
        stale = sorted(indexed - listed)
        for i in range(0, len(stale), SCAN_CHUNK):
            args = [self._prefix]
            for record_id in stale[i : i + SCAN_CHUNK]:
                args += [record_id, "{}"]
            fixed += int(self._reindex(args=args))
        return fixed

    def _ensure_indexed(self) -> None:
        self._restore_stale()
        with self.client.pipeline(transaction=True) as pipe:  # one instant: no false alarm
            pipe.zcard(self._order)
            pipe.zcard(self._ix)
            listed, indexed = pipe.execute()
        if listed != indexed:
            self.reindex()

    def _index_for(self, query: DeadLetterQuery) -> tuple[str, bool]:
        """The index key to walk for ``query``, and whether some filter is left to check."""
        given = {
            kind: value
            for kind, value in (
                ("t", query.topic),
                ("h", query.handler),
                ("e", query.error_type),
            )
            if value is not None
        }
        if query.handler is not None and query.error_type is not None:
            group = _group(query.handler, query.error_type)
            return f"{self._ix}:g:{group}", query.topic is not None
        if not given:
            return self._ix, False
        keys = [f"{self._ix}:{kind}:{value}" for kind, value in given.items()]
        if len(keys) == 1:
            return keys[0], False
        with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.zcard(key)
            sizes = pipe.execute()
        return min(zip(sizes, keys, strict=True))[1], True

    def _summaries(self, ids: Sequence[bytes]) -> list[DeadLetterSummary]:
        if not ids:
            return []
        return [
            _summary(record_id, data)
            for record_id, data in zip(ids, self.client.hmget(self._sum, ids), strict=True)
            if data is not None
        ]

    def search(self, query: DeadLetterQuery, *, limit: int, cursor: str | None) -> DeadLetterPage:
        """The page of at most ``limit`` records matching ``query`` after ``cursor``.

        O(log n + limit) when the filters have an index of their own (none, one
        of them, or handler with error type); topic with error type walks the
        smaller index and reads at most :data:`MAX_SCAN` entries per page.
        """
        self._ensure_indexed()
        key, residual = self._index_for(query)
        low = "-inf" if query.low is None else query.low
        high: int | str = "+inf" if query.high is None else query.high
        position = parse_cursor(cursor)
        after: tuple[int, bytes] | None = None
        if position is not None:
            after = (position[0], position[1].encode())
            high = position[0] if query.high is None else min(position[0], query.high)
        items: list[DeadLetterSummary] = []
        offset = scanned = 0
        batch = limit + 1 if not residual else max(limit + 1, 200)
        last: tuple[int, bytes] | None = None
        exhausted = False
        while len(items) <= limit and scanned < MAX_SCAN:
            rows: list[tuple[bytes, int]] = self.client.zrange(  # type: ignore[assignment]
                key,
                high,
                low,
                desc=True,
                byscore=True,
                offset=offset,
                num=batch,
                withscores=True,
                score_cast_func=_score,
            )
            offset += len(rows)
            scanned += len(rows)
            fresh = [m for m, sc in rows if after is None or (sc, _b(m)) < after]
            for summary in self._summaries(fresh):
                if not residual or query.matches(summary):
                    items.append(summary)
            if rows:
                last = (rows[-1][1], _b(rows[-1][0]))
            if len(rows) < batch:
                exhausted = True
                break
        next_cursor = None
        if len(items) > limit:
            items = items[:limit]
            next_cursor = items[-1].cursor
        elif not exhausted and last is not None:  # the scan stopped early: go on from there
            next_cursor = f"{last[0]}:{last[1].decode('utf-8', 'replace')}"
        total = None
        if not residual:
            full_high = "+inf" if query.high is None else query.high
            total = int(self.client.zcount(key, low, full_high))
        return DeadLetterPage(items=items, next_cursor=next_cursor, total=total)

    def failure_groups(self, query: DeadLetterQuery) -> list[FailureGroup]:
        """Groups (handler, error type) of the records matching ``query``, largest first.

        One command per group and three per group in a pipeline: O(groups).
        """
        self._ensure_indexed()
        groups: list[tuple[str, str, bytes]] = []
        for field in cast(list[bytes], self.client.hkeys(self._groups)):
            parsed = _parse_group(field)
            if parsed is None:
                continue
            handler, error_type = parsed
            if query.handler not in (None, handler) or query.error_type not in (None, error_type):
                continue
            groups.append((handler, error_type, self._ix.encode() + b":g:" + field))
        low = "-inf" if query.low is None else query.low
        high = "+inf" if query.high is None else query.high
        with self.client.pipeline(transaction=False) as pipe:
            for _, _, key in groups:
                pipe.zcount(key, low, high)
                pipe.zrange(
                    key,
                    low,
                    high,
                    byscore=True,
                    offset=0,
                    num=1,
                    withscores=True,
                    score_cast_func=_score,
                )
                pipe.zrange(
                    key,
                    high,
                    low,
                    desc=True,
                    byscore=True,
                    offset=0,
                    num=1,
                    withscores=True,
                    score_cast_func=_score,
                )
            replies = pipe.execute()
        found: list[tuple[str, str, int, int, int, bytes]] = []
        for i, (handler, error_type, _) in enumerate(groups):
            count, oldest, newest_row = replies[3 * i : 3 * i + 3]
            if count and oldest and newest_row:
                found.append(
                    (
                        handler,
                        error_type,
                        int(count),
                        oldest[0][1],
                        newest_row[0][1],
                        newest_row[0][0],
                    )
                )
        samples = self._summaries([row[5] for row in found])
        by_id = {s.id: s for s in samples}
        result = []
        for handler, error_type, count, first, last, sample_id in found:
            sample = by_id.get(sample_id.decode("utf-8", "replace"))
            topic = sample.topic if sample is not None else ""
            if query.topic is not None and topic != query.topic:
                continue
            result.append(
                FailureGroup(
                    handler=handler,
                    error_type=error_type,
                    topic=topic,
                    count=count,
                    first_seen=from_micros(first),
                    last_seen=from_micros(last),
                    sample_error=sample.error if sample is not None else "",
                )
            )
        result.sort(key=lambda g: (-g.count, g.handler, g.error_type))
        return result[:MAX_GROUPS]

    def select(self, query: DeadLetterQuery) -> list[str]:
        """The ids of every record matching ``query``, newest first."""
        self._ensure_indexed()
        return [m.decode("utf-8", "replace") for m in self._select(query)]

    def _select(self, query: DeadLetterQuery) -> list[bytes]:
        key, residual = self._index_for(query)
        low = "-inf" if query.low is None else query.low
        high = "+inf" if query.high is None else query.high
        ids: list[bytes] = self.client.zrange(key, high, low, desc=True, byscore=True)  # type: ignore[assignment]
        if not residual:
            return ids
        kept: list[bytes] = []
        for i in range(0, len(ids), SCAN_CHUNK):
            chunk = ids[i : i + SCAN_CHUNK]
            sums = self.client.hmget(self._sum, chunk)
            kept += [
                m
                for m, data in zip(chunk, sums, strict=True)
                if data is not None and query.matches(_summary(m, data))
            ]
        return kept


class RedisAuditLog:
    """An audit trail in a Redis list, newest first, capped at ``max_size`` entries."""

    blocking = True

    def __init__(self, client: redis.Redis, key: str, *, max_size: int = DEFAULT_AUDIT_SIZE):
        self.client = client
        self.key = key
        self.max_size = max_size

    def append(self, entry: AuditEntry) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.lpush(self.key, json.dumps(entry.to_dict()))
            pipe.ltrim(self.key, 0, self.max_size - 1)
            pipe.execute()

    def entries(self, limit: int = 50) -> list[AuditEntry]:
        if limit <= 0:
            return []
        rows: list[bytes] = self.client.lrange(self.key, 0, limit - 1)  # type: ignore[assignment]
        entries = []
        for row in rows:
            try:
                data = json.loads(row, parse_constant=refuse_constants)
            except ValueError:
                continue
            if isinstance(data, dict):
                entries.append(AuditEntry.from_dict(data))
        return entries


def _b(member: bytes | str) -> bytes:
    return member.encode() if isinstance(member, str) else member


def _score(value: bytes | str) -> int:
    """An index score as microseconds; a forged one (``inf``, beyond the calendar)
    is clamped to the range a time can have."""
    number = float(value)
    if math.isnan(number):
        return 0
    return int(min(max(number, MIN_MICROS), MAX_MICROS))


def _micros(value: object) -> int:
    """A summary's time (whole microseconds, as text); exact when in range."""
    text = str(value)
    if text.isascii() and text.lstrip("-").isdigit():
        return min(max(int(text), MIN_MICROS), MAX_MICROS)
    return _score(text)


def _group(handler: str, error_type: str) -> str:
    """The group field of (handler, error type): the handler's length in bytes first."""
    return f"{len(handler.encode())}:{handler}{error_type}"


def _parse_group(field: bytes) -> tuple[str, str] | None:
    size, sep, rest = field.partition(b":")
    if not sep or not size.isdigit():
        return None
    n = int(size)
    return rest[:n].decode("utf-8", "replace"), rest[n:].decode("utf-8", "replace")


def _encoded(record: FailedEvent) -> tuple[bytes, bytes]:
    """The record's JSON and its summary's, as stored."""
    data = json.dumps(record.to_dict(), default=str).encode()  # ASCII: ensure_ascii
    return data, _summary_json(record).encode()


def _summary_json(record: FailedEvent) -> str:
    """What the indexes and the list need of ``record``: small, no payload."""
    summary = DeadLetterSummary.of(record)
    return json.dumps(
        {
            "t": str(summary.failed_at_us),
            "topic": summary.topic,
            "handler": summary.handler,
            "error_type": summary.error_type,
            "error": summary.error,
            "attempts": summary.attempts,
            "type": summary.event_type,
        }
    )


def _summary(record_id: bytes | str, data: bytes | str) -> DeadLetterSummary:
    text_id = record_id.decode("utf-8", "replace") if isinstance(record_id, bytes) else record_id
    try:
        fields = json.loads(data)
        return DeadLetterSummary(
            id=text_id,
            topic=str(fields["topic"]),
            handler=str(fields["handler"]),
            error_type=str(fields["error_type"]),
            error=str(fields.get("error", "")),
            attempts=int(fields.get("attempts", 0)),
            failed_at_us=_micros(fields["t"]),
            event_type=str(fields.get("type", "")),
        )
    except (ValueError, KeyError, TypeError, OverflowError) as exc:
        return DeadLetterSummary(
            id=text_id,
            topic="",
            handler="",
            error_type=UNREADABLE,
            error=f"unreadable summary: {exc}",
            attempts=0,
            failed_at_us=0,
        )


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
