"""Run the reliability suite and print its table.

    python -m tests.reliability.report                  # quick profile (~2-3 min)
    python -m tests.reliability.report --profile long   # 100k-event load, 20k-event kills
    python -m tests.reliability.report --show           # the last saved table, no run

Extra arguments after ``--`` go to pytest (``-- -k redis``).  The table lists,
per scenario: events sent (publish succeeded), handled at least once, lost
(sent but never handled: must be 0, but counted only in the Sentinel failover
with MIN_REPLICAS=0), duplicated (handler runs beyond the first)
and the time from the first publish until every sent event was handled.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

COLUMNS = (
    ("scenario", "scenario"),
    ("backend", "backend"),
    ("sent", "sent"),
    ("handled", "handled"),
    ("lost", "lost"),
    ("duplicated", "duplicated"),
    ("seconds", "time (s)"),
    ("faults", "faults"),
    ("publish_errors", "publish errors"),
    ("notes", "notes"),
)


def default_results_path(profile: str) -> Path:
    """Where a run of ``profile`` saves its table (inside the git-ignored pytest cache)."""
    return ROOT / ".pytest_cache" / "eventbus-reliability" / f"{profile}.json"


def _cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key, "")
    if key == "scenario" and row.get("passed") is False:
        return f"{value} (FAILED)"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _order(row: dict[str, Any]) -> tuple[bool, bool]:
    # The load run first, then the fault runs; Redis before Kafka.
    return (not str(row.get("scenario", "")).startswith("load"), row.get("backend") != "redis")


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of scenario rows (load first, then faults by backend)."""
    rows = sorted(rows, key=_order)
    header = [title for _, title in COLUMNS]
    body = [[_cell(row, key) for key, _ in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    numeric = {
        i for i, (key, _) in enumerate(COLUMNS) if key not in ("scenario", "backend", "notes")
    }

    def line(cells: list[str]) -> str:
        padded = [
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            "-" * (w + 1) + ":" if i in numeric else "-" * (w + 2) for i, w in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([line(header), rule, *(line(cells) for cells in body)])


def show(path: Path) -> int:
    """Print the table saved at ``path``."""
    if not path.exists():
        print(f"no results at {path}: run the suite first", file=sys.stderr)
        return 1
    document = json.loads(path.read_text())
    print(f"eventbus reliability, {document['profile']} profile, {document['finished']}")
    print(f"machine: {document['machine']}")
    print()
    print(format_table(document["scenarios"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.reliability.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--profile", choices=("quick", "long"), default="quick")
    parser.add_argument("--show", action="store_true", help="print the last saved table only")
    parser.add_argument("pytest_args", nargs="*", help="arguments for pytest (after --)")
    args = parser.parse_args(argv)
    path = default_results_path(args.profile)
    if args.show:
        return show(path)
    env = {
        **os.environ,
        "EVENTBUS_RELIABILITY_PROFILE": args.profile,
        "EVENTBUS_RELIABILITY_RESULTS": str(path),
    }
    if path.exists():
        path.unlink()  # never print an older run's table as this one's
    command = [sys.executable, "-m", "pytest", "tests/reliability", "-q", *args.pytest_args]
    code = subprocess.call(command, cwd=ROOT, env=env)
    print()
    shown = show(path)
    return code or shown


if __name__ == "__main__":
    raise SystemExit(main())
