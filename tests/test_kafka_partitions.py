"""The Kafka bridge's partition ledger, without a broker: which offsets may be
committed, how the budget is shared, when a partition is paused and resumed, and
what a revoke keeps and drops.  The bridge's own tests (test_kafka_bridge.py,
test_kafka_backend.py) run the same rules against a real Kafka-protocol broker."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from eventbus.kafka.partitions import Dispatched, Partition, PartitionLedger

#: Seconds a full partition may commit nothing before it is paused, in these tests.
PAUSE = 5.0
#: Seconds between commits, in these tests.
INTERVAL = 0.1
#: A monotonic time to start from (the ledger never reads a clock).
T0 = 1_000.0


@dataclass(frozen=True)
class Rec:
    """A fetched record: all the ledger reads of aiokafka's ConsumerRecord."""

    offset: int


Ledger = PartitionLedger[str, Rec]
Entry = Dispatched[str, Rec]


def ledger(max_in_flight: int) -> Ledger:
    return PartitionLedger(max_in_flight, pause_after=PAUSE, commit_interval=INTERVAL)


def fetch(book: Ledger, key: str, offsets: list[int], now: float = T0) -> list[Entry]:
    """Assign ``key`` if needed, receive records at ``offsets``, and dispatch what
    the budget allows (as the bridge's fetch loop does), one handler message each."""
    book.assign([key])
    part = book.receive(key, [Rec(o) for o in offsets])
    assert part is not None
    book.reshare(now)
    return take_all(book, part)


def take_all(book: Ledger, part: Partition[str, Rec]) -> list[Entry]:
    taken = []
    while (item := book.take(part)) is not None:
        entry, record = item
        assert entry.offset == record.offset
        entry.remaining = 1
        taken.append(entry)
    return taken


# -- offsets --------------------------------------------------------------------


def test_records_finishing_out_of_order_commit_only_the_finished_prefix() -> None:
    book = ledger(10)
    r = fetch(book, "a", [0, 1, 2, 3, 4])
    [part] = book.partitions

    book.settle(r[2], T0)
    book.settle(r[1], T0)
    assert part.committable is None  # offset 0 still running holds back 1 and 2
    assert book.in_flight == 5

    book.settle(r[0], T0)
    assert part.committable == 3
    assert book.in_flight == 2

    book.settle(r[4], T0)
    assert part.committable == 3  # 3 still running
    book.settle(r[3], T0)
    assert part.committable == 5
    assert book.in_flight == 0


def test_the_committable_offset_follows_offsets_with_gaps() -> None:
    # A compacted topic has gaps: commit one past the last finished record.
    book = ledger(10)
    r = fetch(book, "a", [7, 12, 40])
    for entry in r:
        book.settle(entry, T0)
    assert book.partitions[0].committable == 41


def test_a_record_is_done_only_once_every_handler_message_finished() -> None:
    book = ledger(10)
    [r] = fetch(book, "a", [0])
    r.remaining = 3  # three handlers subscribe to the topic
    part = r.partition

    assert book.settle(r, T0) is False
    assert book.settle(r, T0) is False
    assert part.committable is None and not r.done and book.in_flight == 1
    assert book.settle(r, T0) is True
    assert part.committable == 1 and r.done and book.in_flight == 0


def test_a_record_no_handler_takes_is_done_at_once() -> None:
    # The bridge settles a record no handler of this process subscribes to at once.
    book = ledger(10)
    [r] = fetch(book, "a", [0])
    r.remaining = 0
    assert book.settle(r, T0) is True
    assert r.partition.committable == 1


def test_a_record_that_never_finishes_holds_back_its_partition_only() -> None:
    # A dead letter that cannot be written never settles its record.
    book = ledger(10)
    a = fetch(book, "a", [0, 1, 2])
    b = fetch(book, "b", [0, 1])
    for entry in a[1:] + b:
        book.settle(entry, T0)
    pa, pb = book.get("a"), book.get("b")
    assert pa is not None and pb is not None
    assert pa.committable is None and pb.committable == 2
    assert book.offsets(book.partitions, T0) == {"b": 2}


# -- commits --------------------------------------------------------------------


def test_a_commit_is_due_when_an_offset_moved_and_the_interval_passed() -> None:
    book = ledger(10)
    r = fetch(book, "a", [0, 1])
    assert not book.commit_due(T0)  # nothing finished

    book.settle(r[0], T0)
    assert book.commit_due(T0)
    parts = book.partitions
    offsets = book.offsets(parts, T0)
    assert offsets == {"a": 1}
    book.committed(parts, offsets)
    assert parts[0].committed == 1
    assert not book.commit_due(T0 + 1)  # nothing moved since

    book.settle(r[1], T0 + INTERVAL / 2)
    assert not book.commit_due(T0 + INTERVAL / 2)  # the last commit is too recent
    assert book.commit_due(T0 + INTERVAL)
    assert book.offsets(parts, T0 + INTERVAL) == {"a": 2}


def test_an_accepted_offset_is_not_committed_again() -> None:
    book = ledger(10)
    [r] = fetch(book, "a", [0])
    book.settle(r, T0)
    parts = book.partitions
    book.committed(parts, book.offsets(parts, T0))
    assert book.offsets(parts, T0 + 1) == {}


def test_a_failed_commit_is_retried_with_the_same_offsets() -> None:
    book = ledger(10)
    [r] = fetch(book, "a", [0])
    book.settle(r, T0)
    parts = book.partitions
    assert book.offsets(parts, T0) == {"a": 1}
    book.commit_failed()  # the coordinator was away

    assert book.commit_due(T0 + INTERVAL)
    assert book.offsets(parts, T0 + INTERVAL) == {"a": 1}
    assert parts[0].committed is None


# -- budget -----------------------------------------------------------------------


def test_a_partition_alone_takes_the_whole_budget_and_the_rest_waits() -> None:
    book = ledger(3)
    taken = fetch(book, "a", [0, 1, 2, 3, 4])
    [part] = book.partitions
    assert [e.offset for e in taken] == [0, 1, 2]
    assert [rec.offset for rec in part.waiting] == [3, 4]
    assert book.room == 0 and book.in_flight == 3

    flow = book.flow(T0)
    assert flow.fetch == [] and flow.room == 0  # full: fetch nothing

    book.settle(taken[0], T0)
    assert [e.offset for e in take_all(book, part)] == [3]  # the next in offset order


def test_the_budget_is_shared_by_the_partitions_that_have_records() -> None:
    book = ledger(8)
    book.assign(["a", "b", "c"])
    fetch(book, "a", list(range(10)))
    assert book.share == 8  # alone with records: the whole budget
    assert book.in_flight == 8
    book.receive("b", [Rec(o) for o in range(10)])
    book.reshare(T0)
    assert book.share == 4  # a and b have records; c is idle and reserves nothing

    flow = book.flow(T0)
    assert flow.fetch == ["c"]  # a is over its share, b has records waiting
    b = book.get("b")
    assert b is not None
    assert take_all(book, b) == []  # no room: a took it while alone


def test_a_partition_keeps_its_share_for_pause_after_seconds_without_records() -> None:
    book = ledger(8)
    a = fetch(book, "a", [0], T0)
    fetch(book, "b", [0], T0)
    assert book.share == 4
    book.settle(a[0], T0)  # a has nothing in flight now

    book.reshare(T0 + PAUSE - 0.1)
    assert book.share == 4
    book.reshare(T0 + PAUSE)
    assert book.share == 8  # only b is still active


def test_a_full_partition_stuck_for_pause_after_is_paused_and_stops_counting() -> None:
    book = ledger(4)
    stuck = fetch(book, "a", [0, 1, 2, 3, 4])
    assert book.room == 0
    assert book.flow(T0).pause == []  # full from now on

    assert book.flow(T0 + PAUSE - 0.1).pause == []
    flow = book.flow(T0 + PAUSE)
    assert [(p.key, seconds) for p, seconds in flow.pause] == [("a", PAUSE)]
    assert book.paused == ["a"]
    assert book.held == 4 and book.in_flight == 4
    assert flow.room == 4  # its records no longer count against the budget

    other = fetch(book, "b", [0, 1, 2, 3, 4, 5], T0 + PAUSE)
    assert len(other) == 4  # b gets the whole budget (a paused reserves nothing)
    assert len(stuck[0].partition.records) == 4  # a holds what it took, no more


def test_a_commit_delays_the_pause_of_a_full_partition() -> None:
    book = ledger(4)
    r = fetch(book, "a", [0, 1, 2, 3, 4, 5])
    [part] = book.partitions
    book.flow(T0)  # full since T0
    book.settle(r[0], T0 + 4)  # progress at T0 + 4
    take_all(book, part)  # full again
    assert book.flow(T0 + PAUSE).pause == []  # stuck since T0 + 4 only
    assert book.flow(T0 + 4 + PAUSE).pause != []


def test_a_paused_partition_resumes_once_under_its_share() -> None:
    book = ledger(4)
    r = fetch(book, "a", [0, 1, 2, 3])
    book.flow(T0)
    book.flow(T0 + PAUSE)
    assert book.paused == ["a"] and book.held == 4

    book.settle(r[0], T0 + PAUSE + 1)
    assert book.held == 3 and book.in_flight == 3  # a paused record finished
    flow = book.flow(T0 + PAUSE + 1)
    assert flow.resume == ["a"] and flow.pause == []
    assert book.paused == [] and book.held == 0
    assert flow.fetch == ["a"] and flow.room == 1  # its records count again


def test_the_fetch_loop_is_woken_once_a_quarter_of_the_spent_budget_is_free() -> None:
    book = ledger(8)
    a = fetch(book, "a", list(range(6)))  # alone: a takes 6 of 8
    b = fetch(book, "b", [0, 1])  # b takes the last 2 (its share is 4 now)
    flow = book.flow(T0)
    assert flow.room == 0 and flow.fetch == ["b"]  # the budget is spent; b is not full

    book.settle(b[0], T0)
    assert book.room_freed(b[0].partition) is False  # one free: too few to fetch
    book.settle(b[1], T0)
    assert book.room_freed(b[1].partition) is True  # a quarter (2 of 8) free
    book.settle(a[0], T0)
    assert book.room_freed(a[0].partition) is False  # woken once; a is still over 3/4


def test_the_fetch_loop_is_woken_once_a_full_partition_is_down_to_three_quarters() -> None:
    book = ledger(16)
    book.assign(["a", "b"])
    book.receive("a", [Rec(o) for o in range(20)])
    book.receive("b", [Rec(0)])
    book.reshare(T0)
    a, b = book.get("a"), book.get("b")
    assert a is not None and b is not None and book.share == 8
    ra, rb = take_all(book, a), take_all(book, b)
    assert len(ra) == 8 and len(rb) == 1
    assert book.flow(T0).room == 7  # not starved: only the full partition matters

    book.settle(ra[0], T0)
    assert book.room_freed(a) is False  # 7 of its 8
    book.settle(ra[1], T0)
    assert book.room_freed(a) is True  # 6 of its 8

    book.settle(rb[0], T0)
    assert book.room_freed(b) is False  # b was never full


# -- assignment, revoke, release ---------------------------------------------------


def test_assigning_an_owned_partition_again_keeps_its_state() -> None:
    book = ledger(10)
    fetch(book, "a", [0, 1])
    part = book.get("a")
    book.assign(["a", "b"])
    assert book.get("a") is part and part is not None and len(part.records) == 2
    assert sorted(book.keys) == ["a", "b"]


def test_records_fetched_for_a_partition_not_owned_are_dropped() -> None:
    book = ledger(10)
    book.assign(["a"])
    assert book.receive("gone", [Rec(0)]) is None
    assert book.keys == ["a"] and book.in_flight == 0


def test_a_revoked_partition_dispatches_no_more_but_its_records_still_commit() -> None:
    book = ledger(3)
    r = fetch(book, "a", [0, 1, 2, 3, 4])
    [part] = book.detach(["a", "never-owned"])
    assert book.keys == [] and book.get("a") is None

    book.settle(r[0], T0)
    assert take_all(book, part) == []  # room again, but revoked: nothing dispatched
    book.settle(r[1], T0)
    assert not part.settled and part.running == 1  # offset 2 still running
    assert book.offsets([part], T0) == {"a": 2}  # what finished gets committed


def test_release_drops_the_partition_and_a_record_finishing_later_changes_nothing() -> None:
    book = ledger(10)
    r = fetch(book, "a", [0, 1, 2])
    book.settle(r[0], T0)
    parts = book.detach(["a"])
    book.committed(parts, book.offsets(parts, T0))
    book.release(parts)
    assert book.in_flight == 0 and book.room == 10
    [part] = parts
    assert part.released and not part.records and not part.waiting

    assert book.settle(r[1], T0 + 1) is False  # the handler finished after the release
    book.settle(r[2], T0 + 1)
    assert part.committable == 1 and book.in_flight == 0
    assert not book.commit_due(T0 + 10)


def test_releasing_a_paused_partition_gives_back_its_held_records() -> None:
    book = ledger(4)
    fetch(book, "a", [0, 1, 2, 3])
    book.flow(T0)
    book.flow(T0 + PAUSE)
    assert book.held == 4
    book.release(book.partitions)  # the consumer closed
    assert book.held == 0 and book.in_flight == 0 and book.paused == []
    assert book.keys == [] and book.room == 4


def test_a_reassigned_partition_starts_afresh() -> None:
    book = ledger(10)
    old = fetch(book, "a", [0, 1, 2])
    book.settle(old[0], T0)
    parts = book.detach(["a"])
    book.committed(parts, book.offsets(parts, T0))
    book.release(parts)

    book.assign(["a"])
    new = book.get("a")
    assert new is not None and new is not parts[0]
    assert new.committable is None and new.committed is None and not new.records
    book.settle(old[1], T0)  # a record of the previous assignment finishing late
    assert new.committable is None and book.in_flight == 0
    assert book.offsets([new], T0) == {}

    [r] = fetch(book, "a", [1])  # the group's commit: the next owner reads from 1
    book.settle(r, T0)
    assert new.committable == 2


def test_releasing_a_revoked_partition_leaves_its_reassignment_alone() -> None:
    book = ledger(10)
    fetch(book, "a", [0])
    old = book.detach(["a"])
    book.assign(["a"])  # assigned again before the revoked one was let go
    fetch(book, "a", [5])
    book.release(old)
    new = book.get("a")
    assert new is not None and new is not old[0]
    assert [e.offset for e in new.records] == [5] and book.in_flight == 1


def test_a_budget_below_one_record_is_refused() -> None:
    with pytest.raises(ValueError, match="max_in_flight must be at least 1"):
        PartitionLedger(0)


# -- properties ----------------------------------------------------------------------


@st.composite
def completions(draw: st.DrawFn) -> tuple[list[int], list[int], list[int]]:
    """Increasing offsets (with gaps), handler messages per record, and an order in
    which every handler message finishes."""
    gaps = draw(st.lists(st.integers(1, 3), min_size=1, max_size=30))
    offsets = [sum(gaps[: i + 1]) for i in range(len(gaps))]
    messages = draw(st.lists(st.integers(1, 3), min_size=len(offsets), max_size=len(offsets)))
    finishing = [i for i, n in enumerate(messages) for _ in range(n)]
    return offsets, messages, draw(st.permutations(finishing))


@settings(max_examples=150)
@given(completions())
def test_any_completion_order_never_commits_past_an_unfinished_record(
    case: tuple[list[int], list[int], list[int]],
) -> None:
    offsets, messages, order = case
    book = ledger(len(offsets))
    entries = fetch(book, "a", offsets)
    for entry, n in zip(entries, messages, strict=True):
        entry.remaining = n
    part = entries[0].partition
    left = list(messages)
    for i in order:
        book.settle(entries[i], T0)
        left[i] -= 1
        unfinished = [offsets[j] for j in range(len(offsets)) if left[j] > 0]
        committable = part.committable
        if unfinished:
            assert committable is None or committable <= unfinished[0]
        # It is as far as the finished prefix allows, no less.
        prefix = next((j for j in range(len(offsets)) if left[j] > 0), len(offsets))
        assert committable == (offsets[prefix - 1] + 1 if prefix else None)
        assert book.in_flight == len(offsets) - prefix
    assert part.committable == offsets[-1] + 1 and book.in_flight == 0


KEYS = st.sampled_from(["a", "b", "c"])


class LedgerMachine(RuleBasedStateMachine):
    """Random fetches, dispatches, completions, pauses, revokes and releases: the
    counters always match the records, records are dispatched only with room, and
    no commit passes an unfinished record."""

    entries = Bundle("entries")

    @initialize(budget=st.integers(1, 6))
    def start(self, budget: int) -> None:
        self.book = ledger(budget)
        self.book.assign(["a", "b"])
        self.now = T0
        self.next_offset: dict[str, int] = {}
        self.detached: list[Partition[str, Rec]] = []
        self.dispatched: list[Entry] = []  # every record ever dispatched

    @rule(key=KEYS)
    def assign(self, key: str) -> None:
        self.book.assign([key])

    @rule(key=KEYS, count=st.integers(1, 4))
    def receive(self, key: str, count: int) -> None:
        start = self.next_offset.get(key, 0)
        self.next_offset[key] = start + count
        self.book.receive(key, [Rec(o) for o in range(start, start + count)])

    @rule(target=entries, key=KEYS, count=st.integers(0, 4), messages=st.integers(0, 2))
    def fetch_and_dispatch(self, key: str, count: int, messages: int) -> MultipleResults[Entry]:
        self.receive(key, count)
        self.book.reshare(self.now)
        part = self.book.get(key)
        if part is None:
            return multiple()
        taken = []
        while True:
            room, held = self.book.room, len(part.records)
            item = self.book.take(part)
            if item is None:
                break
            assert room > 0 and held < self.book.share  # dispatched only with room
            item[0].remaining = messages
            taken.append(item[0])
        self.dispatched.extend(taken)
        return multiple(*taken)

    @rule(entry=entries)
    def one_message_finishes(self, entry: Entry) -> None:
        if not entry.done:
            self.book.settle(entry, self.now)

    @rule(entry=consumes(entries))
    def record_finishes(self, entry: Entry) -> None:
        while not entry.done:
            self.book.settle(entry, self.now)

    @rule(seconds=st.sampled_from([0.0, 1.0, PAUSE]), stuck=st.booleans())
    def flow(self, seconds: float, stuck: bool) -> None:
        for step in [seconds, PAUSE] if stuck else [seconds]:  # stuck: nothing finishes
            self.now += step
            flow = self.book.flow(self.now)
            assert flow.room == self.book.room
            assert not set(flow.resume) & {p.key for p, _ in flow.pause}
            for part, _ in flow.pause:
                assert len(part.records) >= self.book.share

    @rule(key=KEYS)
    def revoke(self, key: str) -> None:
        self.detached.extend(self.book.detach([key]))

    @precondition(lambda self: bool(self.detached))
    @rule()
    def release(self) -> None:
        self.book.release(self.detached)
        self.detached = []

    @rule()
    def commit(self) -> None:
        """The fetch loop's commit: of the partitions owned."""
        self.commit_of(self.book.partitions)

    @precondition(lambda self: bool(self.detached))
    @rule()
    def commit_revoked(self) -> None:
        """The revoke's commit: of the partitions it detached (each revoke its own)."""
        for part in self.detached:
            self.commit_of([part])

    def commit_of(self, parts: list[Partition[str, Rec]]) -> None:
        offsets = self.book.offsets(parts, self.now)
        for part in parts:
            if part.key in offsets:
                below = [
                    e
                    for e in self.dispatched
                    if e.partition is part and e.offset < offsets[part.key]
                ]
                assert all(e.done for e in below)
        self.book.committed(parts, offsets)

    @invariant()
    def counters_match_the_records(self) -> None:
        live = [p for p in self.book.partitions + self.detached if not p.released]
        assert self.book.in_flight == sum(len(p.records) for p in live)
        assert self.book.held == sum(len(p.records) for p in live if p.paused)
        assert self.book.paused == [p.key for p in self.book.partitions if p.paused]
        for part in live:
            assert not part.records or not part.records[0].done
            if part.committable is not None:
                assert all(
                    e.done
                    for e in self.dispatched
                    if e.partition is part and e.offset < part.committable
                )


LedgerMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=50)
test_the_ledger_keeps_its_invariants = LedgerMachine.TestCase
