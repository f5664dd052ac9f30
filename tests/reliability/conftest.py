"""Collects each reliability scenario's numbers, prints the table at the end of
the pytest run (so CI logs show it) and saves it as JSON for
``python -m tests.reliability.report``."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.reliability.report import default_results_path, format_table
from tests.reliability.support import PROFILE, RESULTS_ENV, Tally, machine

_TALLIES = pytest.StashKey[list[Tally]]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_TALLIES] = []


@pytest.fixture
def report_tally(request: pytest.FixtureRequest) -> Iterator[Callable[[Tally], None]]:
    """``report_tally(t)``: add a scenario's numbers to the session's table.

    Call it *before* asserting on the numbers, so a failing run shows in the table.
    """
    recorded: list[Tally] = []

    def record(t: Tally) -> None:
        recorded.append(t)
        request.config.stash[_TALLIES].append(t)
        print(
            f"\n[reliability] {t.scenario} ({t.backend}): sent={t.sent} handled={t.handled} "
            f"lost={t.lost} duplicated={t.duplicated} time={t.seconds}s {t.notes}"
        )

    yield record
    failed = getattr(request.node, "_reliability_failed", None)
    for t in recorded:
        t.passed = not failed


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    if report.failed:  # type: ignore[attr-defined]
        item._reliability_failed = True  # type: ignore[attr-defined]
    return report


def _results_path() -> Path:
    configured = os.environ.get(RESULTS_ENV)
    return Path(configured) if configured else default_results_path(PROFILE.name)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    tallies = session.config.stash.get(_TALLIES, [])
    if not tallies:
        return
    path = _results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "profile": PROFILE.name,
        "machine": machine(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "scenarios": [t.as_dict() for t in tallies],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    tallies = config.stash.get(_TALLIES, [])
    if not tallies:
        return
    terminalreporter.section(f"eventbus reliability ({PROFILE.name} profile)")
    terminalreporter.write_line(machine())
    for line in format_table([t.as_dict() for t in tallies]).splitlines():
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"saved to {_results_path()}")
