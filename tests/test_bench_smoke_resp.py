"""bench/resp_bench.py runs: its smoke mode measures every row on a private redis-server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The rows of the benchmark's table (bench/resp_bench.py's ROWS).
ROWS = (
    "| bus.publish one by one |",
    "| bus.publish, 64 concurrent callers |",
    "| EVALSHA fan-out one by one (client only) |",
    "| EVALSHA fan-out, 64 concurrent callers (client only) |",
    "| worker idle path: BLMOVE + HGET + ack, per message |",
    "| worker busy path: FETCH x16 + ack, per message |",
)


def test_resp_bench_smoke_prints_every_row_measured() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "resp_bench.py"), "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    for row in ROWS:
        # One line in the ops/s table, one in the CPU-per-operation table.
        found = [line for line in lines if line.startswith(row)]
        assert len(found) == 2, (row, done.stdout)
        for line in found:
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            # resp, and redis.asyncio with the pure-Python parser, are always measured
            # (hiredis only where it is installed): each cell is a number, not "-".
            resp, pure = cells[1], cells[3]
            assert float(resp.replace(",", "")) > 0, line
            assert float(pure.replace(",", "")) > 0, line
