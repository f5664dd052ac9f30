"""docs/outbox.md's code runs as an application against real PostgreSQL: the
endpoint commits a user and its event, the relay delivers it, the idempotent
handler applies a redelivered event once (tests/outbox_docs_app.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

pytest_plugins = ["tests.pg_support"]

ROOT = Path(__file__).resolve().parent.parent


def test_outbox_page_runs_against_postgresql(pg_url: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DATABASE_URL": pg_url}
    env = {k: v for k, v in env.items() if not k.startswith("EVENTBUS_")}
    done = subprocess.run(
        [sys.executable, "-m", "tests.outbox_docs_app"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "docs app ok" in done.stdout
