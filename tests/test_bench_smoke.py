"""Benchmarks that cannot rot: every script in bench/ runs its --smoke mode (tiny N,
seconds, its own redis-server / Tansu / database on loopback) and prints its table
with numbers.  bench/resp_bench.py, hooks_bench.py and redis_replicas_bench.py have
their own smoke tests (tests/test_bench_smoke_resp.py, test_backend_contract.py,
test_redis_replicas.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

pytest_plugins = ["tests.pg_support"]

ROOT = Path(__file__).resolve().parent.parent
#: Seconds one smoke run may take before the test fails (all nine run at once; on
#: 2 cores the slowest, redis_bench, takes about 75 s).
SMOKE_TIMEOUT_S = 240
#: A measured cell: a number, possibly with thousands separators, a sign, a unit suffix.
NUMBER = re.compile(r"^[+-]?[\d,]+(\.\d+)?(%|x| \(.*\))?$")

# script and its arguments -> the table rows (their first cell) that must carry numbers
# in every cell named by index (cells counted after the row's name).
CASES: dict[str, tuple[list[str], dict[str, tuple[int, ...]]]] = {
    "redis_bench": (
        [],
        {
            # eventbus column everywhere; raw dramatiq where the script measures it.
            **{
                m: (0,)
                for m in ("publish 64 concurrent/s", "publish, 5 handlers/s", "publish_many/s")
            },
            **{
                m: (0, 1)
                for m in (
                    "publish/s",
                    "end-to-end/s",
                    "drain/s",
                    "end-to-end/s, 1 process",
                    "p50 ms @50/s",
                    "p99 ms @500/s",
                    "idle commands/s",
                )
            },
        },
    ),
    "redis_recovery": ([], {"1": (0, 1)}),
    # Consumers running while publishing, 1 and 2 worker processes (FastStream, whose
    # venv is installed on demand, left out: the run stays short).
    "production_bench": (
        ["--only", "eventbus,eventbus-threads,dramatiq"],
        {
            f"{m}, -p {p}": (0, 1, 2)
            for p in (1, 2)
            for m in (
                "publish/s",
                "end-to-end/s",
                "p50 ms @50/s",
                "p99 ms @500/s",
                "CPU µs/event publisher",
                "CPU µs/event worker(s)",
                "CPU µs/event Redis",
                "CPU µs/event total",
                "Redis commands/event",
            )
        },
    ),
    "embedded": (
        [],
        {
            "raw dramatiq StubBroker + Worker": (0, 1),
            "eventbus embedded (this project)": (0, 1),
            "eventbus embedded, 2 dependencies (async, async yield)": (0, 1),
            "eventbus embedded, 2 dependencies (2 async)": (0, 1),
            "eventbus embedded publish_many": (0, 1),
        },
    ),
    "kafka_bench": (
        [],
        {
            "publish, one by one (acks=all)": (0, 1, 2),
            "publish, batches of 1,000 (publish_many)": (0, 1, 2),
            "end-to-end, worker process (commit after handling)": (0, 1, 2),
        },
    ),
    "observability-sync": (
        ["--backend", "sync"],
        {c: (0, 1, 2, 3) for c in ("off", "prometheus+otel", "otel@10%")},
    ),
    "observability-redis": (
        ["--backend", "redis"],
        {c: (0, 1, 2, 3) for c in ("off", "prometheus+otel", "otel@10%")},
    ),
    "observability_http": (
        [],
        {c: (0, 1, 2) for c in ("plain", "fastapi-otel", "fastapi-otel+bus-otel", "all")},
    ),
    "redis_settings_bench": (
        [],
        {
            "baseline (no persistence)": (1, 2, 3, 4),
            "AOF, appendfsync always": (1, 2, 3, 4),
            "TLS (rediss://)": (1, 2, 3, 4),
            "MIN_REPLICAS=1, one replica": (1, 2, 3, 4),
            "1": (0, 1, 2, 3, 4, 5),
            "2": (0, 1, 2, 3, 4, 5),
            "publish + deliver": (0, 1, 2),
        },
    ),
    "redis_failover_window_bench": (
        [],
        {"coordinated failover": (0, 1), "demotion under the publisher": (0, 1)},
    ),
    "publish_cost_bench": (
        [],
        {
            f"{row}, {phase}": (0, 1, 2, 3)
            for phase in ("warm-up", "steady")
            for row in ("publish/s (one by one)", "publish, 5 handlers/s", "publish_many/s")
        },
    ),
    "outbox_bench": ([], {"asyncpg": (0, 1, 2, 3, 4, 5), "psycopg": (0, 1, 2, 3, 4, 5)}),
    "schema_check_bench": (
        [],
        {
            row: (0, 1, 2, 3, 4)
            for row in (
                "check off (reference)",
                "check warn, compatible",
                "check error, compatible",
                "check warn, no schema stored",
                "check warn, breaking class",
            )
        },
    ),
    "console_bench": (
        [],
        {
            "list, newest 50": (0, 1, 2, 3),
            "list, 50 at the middle (cursor)": (0, 1, 2),
            "groups": (0, 1, 2, 3),
            "record detail": (0, 1, 2),
        },
    ),
    "delay_concurrency_bench": (
        [],
        {
            **{
                f"delay=60 s: {row}": (0, 1, 2)
                for row in (
                    "publish/s, one by one",
                    "publish: publisher CPU µs/event",
                    "publish: Redis CPU µs/event",
                )
            },
            **{
                f"concurrency={limit}: {row}": (0, 1, 2)
                for limit in (8, 2)
                for row in (
                    "end-to-end/s, -p 1 -t 8, handler 2 ms",
                    "end-to-end: Redis commands/event",
                    "end-to-end: Redis CPU µs/event",
                    "end-to-end: worker CPU µs/event",
                )
            },
        },
    ),
}


def _rows(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("|") and not line.startswith("| ---") and "---|" not in line:
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def _numeric(cell: str) -> bool:
    # "2.17 (2.17-2.17) / 4.66" and similar compound cells: every part a number.
    parts = [p for p in re.split(r" / | \(|\)", cell) if p.strip()]
    return bool(parts) and all(
        NUMBER.match(p.strip()) or re.match(r"^[\d.,]+-[\d.,]+$", p.strip()) for p in parts
    )


def _run(case: str, pg_port: int) -> subprocess.CompletedProcess[str]:
    args = list(CASES[case][0])
    script = case.split("-")[0]
    if script == "outbox_bench":  # the session's PostgreSQL (the machine's, or our own)
        args += ["--pg-url", f"postgresql://postgres@127.0.0.1:{pg_port}/postgres"]
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{script}.py"), "--smoke", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
        check=False,
    )


@pytest.fixture(scope="module")
def runs(pg_port: int) -> Iterator[dict[str, Future[subprocess.CompletedProcess[str]]]]:
    """Every smoke run started at once (they wait on their own subprocesses and
    servers, so together they take about as long as the slowest one, redis_bench)."""
    with ThreadPoolExecutor(max_workers=len(CASES)) as pool:
        yield {case: pool.submit(_run, case, pg_port) for case in CASES}


@pytest.mark.timeout(SMOKE_TIMEOUT_S + 30)  # one case alone (-k) waits for its whole run
@pytest.mark.parametrize("case", list(CASES))
def test_bench_smoke_prints_its_table_measured(
    case: str, runs: dict[str, Future[subprocess.CompletedProcess[str]]]
) -> None:
    expected = CASES[case][1]
    done = runs[case].result()
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows(done.stdout)
    for name, indexes in expected.items():
        assert name in rows, (name, done.stdout)
        for i in indexes:
            assert _numeric(rows[name][i]), (name, rows[name], done.stdout)
