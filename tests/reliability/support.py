"""Shared pieces of the reliability suite: profiles, ledgers, tallies, pacing.

**Profiles.**  ``EVENTBUS_RELIABILITY_PROFILE=quick`` (the default, part of the
normal test run) or ``long`` sets how many events each scenario sends.

**Ledgers.**  Worker handlers append one line per invocation to files outside
the broker (:mod:`tests.reliability.handlers` for Redis, :mod:`tests.kafka_handlers`
for Kafka).  A :class:`Ledger` reads them incrementally.

**Tallies.**  Each scenario ends with a :class:`Tally`:

* ``sent``: events whose publish succeeded (returned without raising);
* ``handled``: those of them handled at least once;
* ``lost``: ``sent - handled`` -- every scenario asserts it is 0, but the Sentinel
  failover with ``EVENTBUS_REDIS_MIN_REPLICAS=0`` (asynchronous replication: counted);
* ``duplicated``: handler runs beyond the first, over every event (at-least-once
  delivery re-runs a handler after a crash; they are counted, never hidden);
* ``seconds``: from the first publish until every sent event was handled.
"""

from __future__ import annotations

import asyncio
import os
import platform
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PROFILE_ENV = "EVENTBUS_RELIABILITY_PROFILE"
RESULTS_ENV = "EVENTBUS_RELIABILITY_RESULTS"
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Profile:
    """How hard each scenario pushes."""

    name: str
    #: Events of the Redis load test (2 worker processes, no faults).
    load_events: int
    #: Events of the SIGKILL runs, and seconds between two kills.
    kill_events: int
    kill_interval: float
    #: Events of the Redis restart run.
    restart_events: int
    #: Events of the SIGTERM bursts.
    burst_events: int
    #: Events of the Kafka SIGKILL run, and seconds between two kills.
    kafka_kill_events: int
    kafka_kill_interval: float
    #: Events of the Kafka broker stop run.
    kafka_stop_events: int
    #: Events per second of paced streams (the fault runs).
    rate: float
    #: Hypothesis examples of the worker-level hostile input tests.
    fuzz_examples: int
    #: pytest-timeout of each scenario, in seconds.
    timeout: float


PROFILES = {
    "quick": Profile(
        name="quick",
        load_events=10_000,
        kill_events=4_000,
        kill_interval=2.0,
        restart_events=3_000,
        burst_events=1_000,
        kafka_kill_events=4_000,
        kafka_kill_interval=2.5,
        kafka_stop_events=4_000,
        rate=500.0,
        fuzz_examples=20,
        timeout=120.0,
    ),
    "long": Profile(
        name="long",
        load_events=100_000,
        kill_events=20_000,
        kill_interval=3.0,
        restart_events=20_000,
        burst_events=5_000,
        kafka_kill_events=20_000,
        kafka_kill_interval=4.0,
        kafka_stop_events=10_000,
        rate=500.0,
        fuzz_examples=150,
        timeout=600.0,
    ),
}


def current_profile() -> Profile:
    """The profile named by ``EVENTBUS_RELIABILITY_PROFILE`` (default ``quick``)."""
    name = os.environ.get(PROFILE_ENV, "quick").strip().lower() or "quick"
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"{PROFILE_ENV}={name!r}: use one of {', '.join(sorted(PROFILES))}"
        ) from None


PROFILE = current_profile()


def machine() -> str:
    """One line describing this machine: cores, CPU model, Python, OS."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} CPU(s) ({model}), Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


# -- ledgers -------------------------------------------------------------------------


class Ledger:
    """Reads handler ledgers incrementally: every ``*.log`` file of a directory
    (one per worker process, ``s <n>`` / ``d <n>`` lines), or one shared file of
    ``<pid> <n>`` lines (``single``: the Kafka test handlers' format)."""

    def __init__(self, path: Path, *, single: bool = False) -> None:
        self.path = path
        self.single = single
        self._offsets: dict[Path, int] = {}
        self._partial: dict[Path, bytes] = {}
        #: Finished handler runs per event.
        self.done: Counter[int] = Counter()
        #: Started handler runs per event (directory ledgers only).
        self.started: Counter[int] = Counter()
        #: Finished and started runs per process id.
        self.done_by_pid: dict[int, Counter[int]] = {}
        self.started_by_pid: dict[int, Counter[int]] = {}

    def _files(self) -> list[Path]:
        if self.single:
            return [self.path] if self.path.exists() else []
        return sorted(self.path.glob("*.log"))

    def refresh(self) -> Ledger:
        """Read what was appended since the last call."""
        for file in self._files():
            offset = self._offsets.get(file, 0)
            with file.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            if not chunk:
                continue
            self._offsets[file] = offset + len(chunk)
            data = self._partial.pop(file, b"") + chunk
            lines = data.split(b"\n")
            if lines[-1]:
                self._partial[file] = lines[-1]
            self._parse(file, lines[:-1])
        return self

    def _parse(self, file: Path, lines: list[bytes]) -> None:
        if self.single:
            for line in lines:
                pid, n = line.split()
                self._add(self.done, self.done_by_pid, int(pid), int(n))
            return
        pid = int(file.stem)
        for line in lines:
            phase, n = line.split()
            if phase == b"d":
                self._add(self.done, self.done_by_pid, pid, int(n))
            else:
                self._add(self.started, self.started_by_pid, pid, int(n))

    @staticmethod
    def _add(total: Counter[int], by_pid: dict[int, Counter[int]], pid: int, n: int) -> None:
        total[n] += 1
        by_pid.setdefault(pid, Counter())[n] += 1

    def missing(self, events: Iterable[int]) -> set[int]:
        """The events of ``events`` not handled yet."""
        self.refresh()
        done = self.done
        return {n for n in events if not done[n]}


# -- tallies -------------------------------------------------------------------------


@dataclass
class Tally:
    """The numbers of one scenario run (see the module docstring)."""

    scenario: str
    backend: str
    sent: int
    handled: int
    lost: int
    duplicated: int
    seconds: float
    #: Faults injected (kills, restarts, stops).
    faults: int = 0
    #: Publishes that raised PublishError.
    publish_errors: int = 0
    notes: str = ""
    profile: str = field(default_factory=lambda: PROFILE.name)
    passed: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def tally(
    scenario: str,
    backend: str,
    *,
    sent: Iterable[int],
    ledger: Ledger,
    seconds: float,
    faults: int = 0,
    publish_errors: int = 0,
    notes: str = "",
) -> Tally:
    """Count ``sent`` events against ``ledger``."""
    confirmed = set(sent)
    ledger.refresh()
    handled = sum(1 for n in confirmed if ledger.done[n])
    duplicated = sum(count - 1 for count in ledger.done.values() if count > 1)
    return Tally(
        scenario=scenario,
        backend=backend,
        sent=len(confirmed),
        handled=handled,
        lost=len(confirmed) - handled,
        duplicated=duplicated,
        seconds=round(seconds, 2),
        faults=faults,
        publish_errors=publish_errors,
        notes=notes,
    )


# -- pacing and waiting ----------------------------------------------------------------


def batches(total: int, size: int, start: int = 0) -> Iterable[range]:
    """``range`` slices of ``[start, start + total)``, ``size`` events each."""
    for first in range(start, start + total, size):
        yield range(first, min(first + size, start + total))


async def paced(
    total: int,
    size: int,
    rate: float,
    publish: Callable[[range], Awaitable[None]],
    *,
    start: int = 0,
    concurrent: bool = False,
) -> float:
    """Publish ``total`` events in batches at about ``rate`` events/s; returns the
    monotonic time the first batch started.

    ``concurrent``: batches start on schedule even while earlier ones wait (like
    requests arriving at a web app); all are awaited before returning.
    """
    began = time.monotonic()
    running: list[asyncio.Task[None]] = []
    try:
        for batch in batches(total, size, start):
            if concurrent:
                running.append(asyncio.create_task(_call(publish, batch)))
            else:
                await publish(batch)
            due = began + (batch.stop - start) / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
    finally:
        await asyncio.gather(*running)
    return began


async def _call(publish: Callable[[range], Awaitable[None]], batch: range) -> None:
    await publish(batch)


async def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> float:
    """Poll ``condition`` until true; returns the seconds it took, fails after ``timeout``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)
    return time.monotonic() - started


async def wait_handled(ledger: Ledger, events: Iterable[int], timeout: float) -> None:
    """Wait until every event of ``events`` is handled; on timeout, return quietly
    (the tally then shows what is lost, and the test's assertion fails on it)."""
    waiting = set(events)
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        waiting = ledger.missing(waiting)
        if waiting:
            await asyncio.sleep(0.05)


# -- worker logs -----------------------------------------------------------------------

_RECLAIMED = re.compile(r"Put back (\d+) event\(s\) of queue \S+ taken by a fetch")


def reclaimed(log: str) -> int:
    """Events a Redis worker put back after a fetch whose reply was lost (its log)."""
    return sum(int(n) for n in _RECLAIMED.findall(log))


async def publish_until_accepted(
    publish_many: Callable[[], Awaitable[None]], retry_after: float = 0.1
) -> int:
    """Call ``publish_many`` until it returns (a refused batch is published again: at
    least once, as an application retrying a ``PublishError`` does); returns how many
    ``PublishError`` it saw."""
    from eventbus import PublishError

    errors = 0
    while True:
        try:
            await publish_many()
            return errors
        except PublishError:
            errors += 1
            await asyncio.sleep(retry_after)
