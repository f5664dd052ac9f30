"""The Kafka bridge's partition ledger: the budget, and the offsets it may commit.

Pure bookkeeping, with no consumer, no event loop and no clock of its own (every
method that depends on time takes ``now``, a monotonic time in seconds): the
bridge (:mod:`eventbus.kafka.bridge`) asks it what to fetch, pause,
resume, dispatch and commit, and does the I/O itself.  It tracks, for each
assigned partition:

- **waiting**: records fetched and not dispatched yet (fetched past the
  partition's share), in offset order;
- **records**: records dispatched and not committable yet, in offset order, each
  counting the handler messages made from it that have not finished;
- **committable**: the next offset to commit, and **committed**: the last one
  the broker accepted;
- whether it is **paused** (full and committing nothing for ``pause_after``
  seconds) and since when it is full, last made progress, last had records.

**Offsets.**  A record is *done* once every handler message made from it
succeeded, was skipped, or was dead-lettered (the dead letter written).  A
partition's committable offset is one past the highest offset below which every
dispatched record is done: done records at the head of ``records`` leave it at
once, a record that is not done holds back the commit of every later record of
its partition (never the other way round).  So the committable offset only moves
forward and never passes a record that is not done; a partition that has
committed nothing since it was assigned has none (``None``).

**Budget.**  At most ``max_in_flight`` records are dispatched and not committable
(``in_flight``), paused partitions' records aside (``held``): ``room`` is
``max_in_flight - (in_flight - held)``.  The budget is shared by the partitions
that have had records within ``pause_after`` seconds, paused ones aside: each may
hold ``max_in_flight // those partitions`` records (its ``share``, at least one).
A record is dispatched only while its partition is under its share and there is
room.  A partition at its share is not fetched; one at its share that has
committed nothing for ``pause_after`` seconds is paused: its records stop
counting against the budget until it is under its share again, then it is
resumed.

**Revoke and release.**  A revoked partition is *detached* first: no more of its
records are dispatched, but its records still finish and move its committable
offset, so the bridge can wait for them and commit what finished.  *Releasing*
it then drops its state: its records stop counting, and a record of it that
finishes later changes nothing.  A partition assigned again starts afresh, with
no committable offset of its own (the consumer resumes from the group's commit).

Invariants, after every method returns:

- ``in_flight`` is the number of ``records`` of the partitions not released;
  ``held`` the number of those of paused partitions; so ``room`` never counts a
  paused partition's records;
- the head of a partition's ``records`` is never done;
- every record dispatched from a partition with an offset below its committable
  offset is done;
- a partition's ``records`` grows only while it holds fewer than its share and
  ``room`` is positive.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

#: Seconds a full partition may go without committing before it is paused alone,
#: and seconds a partition without records keeps its share of the budget.
PAUSE_AFTER = 5.0
#: Seconds between offset commits while records finish.
COMMIT_INTERVAL = 0.1


class Fetched(Protocol):
    """What the ledger needs of a fetched record: its offset."""

    @property
    def offset(self) -> int: ...


K = TypeVar("K", bound=Hashable)  # a partition's key (aiokafka's TopicPartition)
R = TypeVar("R", bound=Fetched)  # a fetched record (aiokafka's ConsumerRecord)


@dataclass(eq=False)
class Partition(Generic[K, R]):
    """The bookkeeping of one assigned partition."""

    key: K
    #: Dispatched and not committable yet, in offset order (the head is never done).
    records: deque[Dispatched[K, R]] = field(default_factory=deque)
    #: Fetched past the partition's share, not dispatched yet, in offset order.
    waiting: deque[R] = field(default_factory=deque)
    #: The next offset to commit; None until a record of it is done.
    committable: int | None = None
    #: The last offset the broker accepted for it; None until then.
    committed: int | None = None
    #: Its state was dropped (revoked, or the consumer closed).
    released: bool = False
    #: Monotonic time since which it has had no room (its share reached).
    full_since: float | None = None
    #: Monotonic time its committable offset last moved (0.0: never).
    progress_at: float = 0.0
    #: Monotonic time it last had records dispatched or waiting (None: never).
    active_at: float | None = None
    #: Paused: full and committing nothing for ``pause_after`` seconds.
    paused: bool = False
    #: The bridge is dispatching its waiting records (a re-entrancy guard).
    draining: bool = False

    @property
    def settled(self) -> bool:
        """Every dispatched record is done (nothing of it still running)."""
        return all(record.done for record in self.records)

    @property
    def running(self) -> int:
        """Dispatched records not done yet."""
        return sum(not record.done for record in self.records)


@dataclass(eq=False)
class Dispatched(Generic[K, R]):
    """A record handed to the handlers, counting its handler messages not finished."""

    partition: Partition[K, R]
    offset: int
    #: Handler messages made from it that have not finished (the bridge sets it).
    remaining: int = 0
    done: bool = False


@dataclass(frozen=True)
class Flow(Generic[K, R]):
    """What the fetch loop does next (:meth:`PartitionLedger.flow`)."""

    #: Partitions under their share with nothing waiting: fetch these.
    fetch: list[K]
    #: Records the budget has room for (zero or less: spent).
    room: int
    #: Partitions that got under their share again: resume them on the consumer.
    resume: list[K]
    #: Partitions paused now, each with the seconds it has been stuck: pause them.
    pause: list[tuple[Partition[K, R], float]]


class PartitionLedger(Generic[K, R]):
    """The partitions a consumer owns, their budget and their committable offsets.

    Parameters:
      max_in_flight: Records dispatched and not committable, paused partitions
        aside (at least 1).
      pause_after: Seconds a full partition may commit nothing before it is paused,
        and seconds a partition without records keeps its share of the budget.
      commit_interval: Seconds between commits while records finish.
    """

    def __init__(
        self,
        max_in_flight: int,
        *,
        pause_after: float = PAUSE_AFTER,
        commit_interval: float = COMMIT_INTERVAL,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(
                f"max_in_flight must be at least 1 (got {max_in_flight}): it is how many "
                "records may be dispatched and not committed; with none, nothing is fetched."
            )
        self.max_in_flight = max_in_flight
        self.pause_after = pause_after
        self.commit_interval = commit_interval
        self._partitions: dict[K, Partition[K, R]] = {}
        self._in_flight = 0
        self._held = 0  # records of paused partitions: not counted against the budget
        self._share = max_in_flight
        self._starved = False  # the budget was spent when the fetch loop last looked
        self._dirty = False  # a committable offset moved since the last commit
        self._last_commit = 0.0

    # -- state -------------------------------------------------------------------

    @property
    def keys(self) -> list[K]:
        """The partitions owned now (assigned, neither detached nor released)."""
        return list(self._partitions)

    @property
    def partitions(self) -> list[Partition[K, R]]:
        """The bookkeeping of the partitions owned now."""
        return list(self._partitions.values())

    def get(self, key: K) -> Partition[K, R] | None:
        """The bookkeeping of ``key`` while it is owned."""
        return self._partitions.get(key)

    @property
    def in_flight(self) -> int:
        """Records dispatched whose offset is not committable yet."""
        return self._in_flight

    @property
    def held(self) -> int:
        """Records of paused partitions (in ``in_flight``, not against the budget)."""
        return self._held

    @property
    def share(self) -> int:
        """Records each active partition may hold (as of the last :meth:`reshare`)."""
        return self._share

    @property
    def room(self) -> int:
        """Records the budget has room for (zero or less: spent)."""
        return self.max_in_flight - (self._in_flight - self._held)

    @property
    def paused(self) -> list[K]:
        """The partitions paused because they stayed full."""
        return [part.key for part in self._partitions.values() if part.paused]

    @property
    def flowing(self) -> bool:
        """Some owned partition is not paused."""
        return any(not part.paused for part in self._partitions.values())

    # -- assignment --------------------------------------------------------------

    def assign(self, keys: Iterable[K]) -> None:
        """Track newly assigned partitions (ones already owned keep their state)."""
        for key in keys:
            if key not in self._partitions:
                self._partitions[key] = Partition(key)

    def detach(self, keys: Iterable[K]) -> list[Partition[K, R]]:
        """Stop owning revoked partitions: none of their records is dispatched any
        more; those dispatched still finish and move their committable offsets
        until :meth:`release`.  Returns the ones that were owned."""
        parts = [self._partitions.pop(key) for key in set(keys) if key in self._partitions]
        return parts

    def release(self, parts: Iterable[Partition[K, R]]) -> None:
        """Drop the partitions' state: their records stop counting, and a record of
        theirs that finishes later changes nothing."""
        for part in parts:
            if not part.released:
                part.released = True
                self._in_flight -= len(part.records)
                if part.paused:
                    self._held -= len(part.records)
                    part.paused = False
                part.records.clear()
                part.waiting.clear()
            if self._partitions.get(part.key) is part:
                del self._partitions[part.key]

    # -- fetching and dispatching ------------------------------------------------

    def receive(self, key: K, records: Iterable[R]) -> Partition[K, R] | None:
        """Queue fetched records behind the partition's waiting ones; None when the
        partition is not owned (revoked while fetching: its next owner reads them)."""
        part = self._partitions.get(key)
        if part is not None:
            part.waiting.extend(records)
        return part

    def reshare(self, now: float) -> None:
        """Split the budget among the partitions that have had records within
        ``pause_after`` seconds (paused ones aside)."""
        active = 0
        for part in self._partitions.values():
            if part.records or part.waiting:
                part.active_at = now
            if (
                not part.paused
                and part.active_at is not None
                and now - part.active_at < self.pause_after
            ):
                active += 1
        self._share = max(1, self.max_in_flight // max(1, active))

    def take(self, part: Partition[K, R]) -> tuple[Dispatched[K, R], R] | None:
        """The partition's next waiting record, now counted as dispatched, if the
        partition is owned, under its share and the budget has room; else None."""
        if (
            not part.waiting
            or len(part.records) >= self._share
            or self.room <= 0
            or self._partitions.get(part.key) is not part
        ):
            return None
        record = part.waiting.popleft()
        entry = Dispatched(part, record.offset)
        part.records.append(entry)
        self._in_flight += 1
        if part.paused:
            self._held += 1
        return entry, record

    def flow(self, now: float) -> Flow[K, R]:
        """Decide what the fetch loop does: which partitions to fetch, to pause (full
        and committing nothing for ``pause_after`` seconds) and to resume (under
        their share again); remembers whether the budget is spent."""
        fetch: list[K] = []
        resume: list[K] = []
        pause: list[tuple[Partition[K, R], float]] = []
        for part in self._partitions.values():
            if len(part.records) < self._share:
                part.full_since = None
                if part.paused:
                    part.paused = False
                    self._held -= len(part.records)
                    resume.append(part.key)
                if not part.waiting:
                    fetch.append(part.key)
                continue
            if part.full_since is None:
                part.full_since = now
            stuck_since = max(part.full_since, part.progress_at)
            if not part.paused and now - stuck_since >= self.pause_after:
                part.paused = True
                self._held += len(part.records)
                pause.append((part, now - stuck_since))
        room = self.room
        self._starved = room <= 0
        return Flow(fetch, room, resume, pause)

    # -- completion --------------------------------------------------------------

    def settle(self, entry: Dispatched[K, R], now: float) -> bool:
        """One of the record's handler messages finished (or, with none expected, the
        record itself).  Once none remains the record is done, and the done head of
        its partition becomes committable.  Returns whether the record is done on a
        partition not released (progress the bridge may act on)."""
        entry.remaining -= 1
        if entry.remaining > 0:
            return False
        entry.done = True
        part = entry.partition
        if part.released:
            return False
        records = part.records
        if records and records[0].done:
            part.progress_at = now
            while records and records[0].done:
                part.committable = records.popleft().offset + 1
                self._in_flight -= 1
                if part.paused:
                    self._held -= 1
                self._dirty = True
        return True

    def room_freed(self, part: Partition[K, R]) -> bool:
        """After a record of ``part`` was done: whether the fetch loop should look
        again.  That is once a quarter of the spent budget is free, or a full
        partition is down to three quarters of its share (not after every record:
        fetches would shrink to one)."""
        if self._starved and self.room >= max(1, self.max_in_flight // 4):
            self._starved = False
            return True
        return part.full_since is not None and len(part.records) <= self._share * 3 // 4

    # -- commits -----------------------------------------------------------------

    def commit_due(self, now: float) -> bool:
        """Whether an offset moved and the last commit is ``commit_interval`` old."""
        return self._dirty and now - self._last_commit >= self.commit_interval

    def offsets(self, parts: Iterable[Partition[K, R]], now: float) -> dict[K, int]:
        """The offsets to commit now for ``parts``: their committable offsets the
        broker has not accepted yet.  Counts as a commit started at ``now``."""
        self._dirty = False
        self._last_commit = now
        return {
            part.key: part.committable
            for part in parts
            if part.committable is not None and part.committable != part.committed
        }

    def committed(self, parts: Iterable[Partition[K, R]], offsets: dict[K, int]) -> None:
        """The broker accepted ``offsets`` (from :meth:`offsets`) for ``parts``."""
        for part in parts:
            if part.key in offsets:
                part.committed = offsets[part.key]

    def commit_failed(self) -> None:
        """The commit did not go through: commit again at the next chance."""
        self._dirty = True
