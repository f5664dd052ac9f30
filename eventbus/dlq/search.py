"""What the dead-letter console asks of a store: filtered pages, failure groups, selections.

A store that can answer from indexes implements :class:`SearchableStore`
(:class:`~eventbus.redis.dlq.RedisDeadLetterStore` does, with sorted sets per
topic, handler, error type and group).  Any other
:class:`~eventbus.dlq.store.DeadLetterStore` is served by :class:`ScanSearch`, which
reads every record per call: fine for the in-memory store (bounded, 10,000 by
default) and for the Kafka store (its records are folded in memory already).

Records are listed newest first, by the time of their final failure; a cursor is
the position of the last record of a page: ``<microseconds>:<record id>``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable

from eventbus.dlq.records import FailedEvent
from eventbus.dlq.store import DeadLetterStore

#: Characters of a record's error message kept in its summary (the record has it all).
SUMMARY_ERROR_CHARS = 300
#: Failure groups listed at most (the largest).
MAX_GROUPS = 500


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
#: A cursor: the microseconds of a record's final failure, a colon, its id.
_CURSOR = re.compile(r"(-?[0-9]{1,20}):(.+)", re.DOTALL)


def micros(moment: datetime) -> int:
    """``moment`` as whole microseconds since the epoch (naive times are UTC); exact."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _MICROSECOND


#: The first and the last microsecond a UTC time can have (years 1 to 9999).
MIN_MICROS = micros(datetime.min.replace(tzinfo=UTC))
MAX_MICROS = micros(datetime.max.replace(tzinfo=UTC))


def from_micros(value: int) -> datetime:
    """The UTC time of ``value`` microseconds since the epoch; exact within the
    years 1 to 9999 UTC, clamped to them outside (a stored time written with
    another offset, or a forged one, can lie beyond)."""
    return _EPOCH + timedelta(microseconds=min(max(value, MIN_MICROS), MAX_MICROS))


@dataclass(frozen=True)
class DeadLetterQuery:
    """Which records: every filter that is not None must match.

    Attributes:
      topic, handler, error_type: Exact values.
      since, until: The final failure happened at or after ``since`` and at or
        before ``until``.
    """

    topic: str | None = None
    handler: str | None = None
    error_type: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    @property
    def low(self) -> int | None:
        """``since`` in microseconds."""
        return None if self.since is None else micros(self.since)

    @property
    def high(self) -> int | None:
        """``until`` in microseconds."""
        return None if self.until is None else micros(self.until)

    def matches(self, summary: DeadLetterSummary) -> bool:
        """Whether ``summary`` passes every filter."""
        low, high = self.low, self.high
        return (
            (self.topic is None or summary.topic == self.topic)
            and (self.handler is None or summary.handler == self.handler)
            and (self.error_type is None or summary.error_type == self.error_type)
            and (low is None or summary.failed_at_us >= low)
            and (high is None or summary.failed_at_us <= high)
        )


@dataclass(frozen=True)
class DeadLetterSummary:
    """One line of the list: what a record is, without its payload.

    Attributes:
      failed_at_us: The final failure, in microseconds since the epoch (the sort key).
    """

    id: str
    topic: str
    handler: str
    error_type: str
    error: str
    attempts: int
    failed_at_us: int
    event_type: str = ""

    @property
    def failed_at(self) -> datetime:
        """When the final attempt failed (UTC)."""
        return from_micros(self.failed_at_us)

    @property
    def cursor(self) -> str:
        """The cursor of the page that starts after this record."""
        return f"{self.failed_at_us}:{self.id}"

    @classmethod
    def of(cls, record: FailedEvent) -> DeadLetterSummary:
        """The summary of ``record``."""
        return cls(
            id=record.id,
            topic=record.topic,
            handler=record.handler,
            error_type=record.error_type,
            error=record.error[:SUMMARY_ERROR_CHARS],
            attempts=record.attempts,
            failed_at_us=micros(record.last_failed_at),
            event_type=record.event.event_type if record.event is not None else "",
        )


@dataclass(frozen=True)
class DeadLetterPage:
    """One page of a listing.

    Attributes:
      items: The records, newest first.
      next_cursor: Where the next page starts; None on the last page.
      total: How many records match, or None when the store could not count them
        without a full scan.
    """

    items: list[DeadLetterSummary]
    next_cursor: str | None
    total: int | None


@dataclass(frozen=True)
class FailureGroup:
    """Dead letters of one handler that failed with one exception type.

    Attributes:
      first_seen, last_seen: The oldest and newest final failure among them.
      topic: The topic of the newest one (a handler serves one topic).
      sample_error: The newest one's error message (shortened).
    """

    handler: str
    error_type: str
    topic: str
    count: int
    first_seen: datetime
    last_seen: datetime
    sample_error: str


def parse_cursor(cursor: str | None) -> tuple[int, str] | None:
    """``(microseconds, record id)`` of ``cursor``; None for no or a malformed cursor
    (digits other than ASCII's, a time beyond the calendar, no record id)."""
    if not cursor:
        return None
    match = _CURSOR.fullmatch(cursor)
    if match is None:
        return None
    score = int(match[1])
    if not MIN_MICROS <= score <= MAX_MICROS:
        return None
    return score, match[2]


@runtime_checkable
class SearchableStore(Protocol):
    """A dead-letter store that answers the console from indexes, not full scans."""

    def search(self, query: DeadLetterQuery, *, limit: int, cursor: str | None) -> DeadLetterPage:
        """The page of at most ``limit`` records matching ``query`` after ``cursor``."""
        ...

    def failure_groups(self, query: DeadLetterQuery) -> list[FailureGroup]:
        """The groups of the records matching ``query``, largest first."""
        ...

    def select(self, query: DeadLetterQuery) -> list[str]:
        """The ids of every record matching ``query``, newest first."""
        ...


def group_records(summaries: Iterable[DeadLetterSummary]) -> list[FailureGroup]:
    """Failure groups of ``summaries`` (given newest first), largest first."""
    groups: dict[tuple[str, str], list[DeadLetterSummary]] = {}
    for summary in summaries:
        groups.setdefault((summary.handler, summary.error_type), []).append(summary)
    result = [
        FailureGroup(
            handler=handler,
            error_type=error_type,
            topic=members[0].topic,
            count=len(members),
            first_seen=members[-1].failed_at,
            last_seen=members[0].failed_at,
            sample_error=members[0].error,
        )
        for (handler, error_type), members in groups.items()
    ]
    result.sort(key=lambda g: (-g.count, g.handler, g.error_type))
    return result[:MAX_GROUPS]


class ScanSearch:
    """:class:`SearchableStore` answers for any store, by reading every record.

    Parameters:
      store: The store (its ``find(None)`` is called once per call here).
    """

    def __init__(self, store: DeadLetterStore) -> None:
        self.store = store

    def _matching(self, query: DeadLetterQuery) -> list[DeadLetterSummary]:
        records = self.store.find(
            None, topic=query.topic, handler=query.handler, error_type=query.error_type
        )
        summaries = [s for s in map(DeadLetterSummary.of, records) if query.matches(s)]
        summaries.sort(key=lambda s: (s.failed_at_us, s.id), reverse=True)
        return summaries

    def search(self, query: DeadLetterQuery, *, limit: int, cursor: str | None) -> DeadLetterPage:
        summaries = self._matching(query)
        start = 0
        position = parse_cursor(cursor)
        if position is not None:  # newest first: the first record after the cursor's
            start = next(
                (i for i, s in enumerate(summaries) if (s.failed_at_us, s.id) < position),
                len(summaries),
            )
        items = summaries[start : start + limit]
        more = start + limit < len(summaries)
        return DeadLetterPage(
            items=items,
            next_cursor=items[-1].cursor if more and items else None,
            total=len(summaries),
        )

    def failure_groups(self, query: DeadLetterQuery) -> list[FailureGroup]:
        return group_records(self._matching(query))

    def select(self, query: DeadLetterQuery) -> list[str]:
        return [s.id for s in self._matching(query)]


def searchable(store: DeadLetterStore) -> SearchableStore:
    """``store`` itself when it has indexes, else a :class:`ScanSearch` over it."""
    if isinstance(store, SearchableStore):
        return store
    return ScanSearch(store)
