"""Tests that leave nothing behind for the tests after them.

Each case runs pytest in a subprocess on a test known to touch process-wide state,
then on a test that a leak of that state broke, in that order.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_in_order(*node_ids: str) -> subprocess.CompletedProcess[str]:
    """``pytest NODE_IDS`` in one subprocess, in the order given."""
    options = ["-q", "-p", "no:cacheprovider", "-p", "no:randomly", "--timeout", "120"]
    return subprocess.run(
        [sys.executable, "-m", "pytest", *options, *node_ids],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )


def test_the_worker_thread_death_test_leaves_in_process_workers_alive() -> None:
    # It once imported tests.dying_handlers into the test process, whose logging
    # filter on dramatiq's WorkerThread logger then raised from the log call of every
    # later failed attempt: the in-process worker's threads died one by one, the
    # failed event was put back again and again, and the kit's drain timed out.
    done = run_in_order(
        "tests/test_redis_backend.py::"
        "test_a_worker_whose_thread_died_exits_and_its_event_is_handled_elsewhere",
        "tests/test_testing_real.py::test_injected_failures_are_retried[redis]",
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "2 passed" in done.stdout
    assert "worker thread died" not in done.stdout + done.stderr
