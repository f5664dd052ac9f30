"""Embedded-mode benchmark: N events -> one no-op handler, three systems.

Usage (from the repo root): python bench/embedded.py [--n 20000] [--repeat 3]

Every measurement runs in a fresh subprocess, one after another. The best
(max) publish and end-to-end rates over the repeats are reported.

The "2 dependencies" rows run the same handler with two FastAPI ``Depends``
resolved for every event: an async function and an async ``yield`` dependency
(cleaned up after every event), or two async functions.  They take turns with the
plain handler's row, and the lines under the table give what the dependencies add
per event: best run against best run, and round by round (each round runs them
back to back) as the spread, in wall and in CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import venv
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SEED_VENV = BENCH / ".venvs" / "seed"
SEED_VERSION = "0.1.1"
SEED_NAME = "fastapi-eventbus 0.1.1 (sync backend)"
PLAIN_NAME = "eventbus embedded (this project)"
DI_NAME = "eventbus embedded, 2 dependencies (async, async yield)"
DI_ASYNC_NAME = "eventbus embedded, 2 dependencies (2 async)"
#: Most microseconds two dependencies may add per event (issue 13).
DI_BUDGET_US = 10.0


@dataclass
class System:
    name: str
    python: str
    script: str  # called as: python script N *args
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


#: Events per run in --smoke mode (the test suite's run: every row, in seconds).
SMOKE_N = 200


@dataclass
class Row:
    name: str
    publish: float | None = None  # events/s
    e2e: float | None = None  # events/s
    note: str = ""
    e2e_runs: list[float] = field(default_factory=list)  # events/s, every run
    cpu_runs: list[float] = field(default_factory=list)  # CPU us/event, runs that report it


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def venv_python(path: Path) -> str:
    return str(path / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))


def ensure_seed_venv() -> str:
    """Create bench/.venvs/seed with fastapi-eventbus 0.1.1 unless it already works."""
    py = venv_python(SEED_VENV)
    check = [py, "-I", "-c", "import importlib.metadata as m; print(m.version('fastapi-eventbus'))"]
    if os.path.exists(py):
        proc = subprocess.run(check, check=False, capture_output=True, text=True)
        if proc.stdout.strip() == SEED_VERSION:
            return py
    log(f"creating {SEED_VENV.relative_to(ROOT)} with fastapi-eventbus=={SEED_VERSION} ...")
    venv.EnvBuilder(clear=True, with_pip=True).create(SEED_VENV)
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, f"fastapi-eventbus=={SEED_VERSION}"], check=True)
    return py


def run_once(system: System, n: int) -> dict[str, float | str]:
    """Run one measurement; returns {"publish", "e2e"} seconds or {"error"|"unavailable"}."""
    cmd = [system.python, str(BENCH / system.script), str(n), *system.args]
    env = {**os.environ, **system.env}
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    result: dict[str, float | str] = json.loads(lines[-1])
    return result


def measure(systems: list[System], n: int, repeat: int) -> list[Row]:
    """Run each system `repeat` times, taking turns (A B A B ...) so that a machine
    getting busier or quieter meanwhile weighs on all of them alike; keep the best
    publish and end-to-end rates, and every end-to-end rate."""
    pubs: dict[str, list[float]] = {s.name: [] for s in systems}
    e2es: dict[str, list[float]] = {s.name: [] for s in systems}
    cpus: dict[str, list[float]] = {s.name: [] for s in systems}
    notes: dict[str, str] = {}
    for k in range(repeat):
        for system in systems:
            if system.name in notes:
                continue
            res = run_once(system, n)
            if "publish" not in res:
                notes[system.name] = "not available" if "unavailable" in res else "failed"
                reason = res.get("unavailable") or res.get("error")
                log(f"  {system.name}: {notes[system.name]}: {reason}")
                continue
            pubs[system.name].append(n / float(res["publish"]))
            e2es[system.name].append(n / float(res["e2e"]))
            if "cpu" in res:
                cpus[system.name].append(float(res["cpu"]) / n * 1e6)
            log(
                f"  {system.name} #{k + 1}: publish {pubs[system.name][-1]:,.0f}/s, "
                f"end-to-end {e2es[system.name][-1]:,.0f}/s"
            )
    return [
        Row(s.name, note=notes[s.name])
        if s.name in notes
        else Row(
            s.name,
            max(pubs[s.name]),
            max(e2es[s.name]),
            e2e_runs=e2es[s.name],
            cpu_runs=cpus[s.name],
        )
        for s in systems
    ]


def nproc() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))  # what `nproc` prints
    return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def table(rows: list[Row], n: int, repeat: int) -> str:
    base = next((r.e2e for r in rows if r.name == SEED_NAME), None)
    out = [
        f"N = {n:,} events, one no-op async handler, best of {repeat}",
        "",
        "| system | publish/s | end-to-end/s | ratio e2e vs fastapi-eventbus 0.1.1 |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r.publish is None or r.e2e is None:
            out.append(f"| {r.name} | {r.note} | {r.note} | n/a |")
            continue
        ratio = f"{r.e2e / base:.2f}x" if base else "n/a"
        out.append(f"| {r.name} | {r.publish:,.0f} | {r.e2e:,.0f} | {ratio} |")
    overhead = di_overhead(rows)
    if overhead:
        out += ["", overhead]
    out += [
        "",
        f"machine: nproc={nproc()}, python {platform.python_version()}, CPU: {cpu_model()}",
    ]
    return "\n".join(out)


def di_overhead(rows: list[Row]) -> str:
    """What the dependencies add per event: wall time end to end (best vs best, and
    round by round), and CPU time (round by round)."""
    plain = next((r for r in rows if r.name == PLAIN_NAME and r.e2e_runs), None)
    if plain is None:
        return ""
    lines = []
    for di in rows:
        if di.name not in (DI_NAME, DI_ASYNC_NAME) or not di.e2e_runs:
            continue
        label = di.name.split(", ", 1)[1]
        best = 1e6 / max(di.e2e_runs) - 1e6 / max(plain.e2e_runs)
        verdict = "within" if best <= DI_BUDGET_US else "OVER"
        # Runs of one round ran back to back (see measure): compare them pairwise.
        wall = [1e6 / d - 1e6 / p for d, p in zip(di.e2e_runs, plain.e2e_runs, strict=True)]
        lines.append(
            f"{label} add {best:.1f} us/event end to end, best vs best ({verdict} the "
            f"{DI_BUDGET_US:g} us budget); round by round: {spread(wall)}"
        )
        if len(di.cpu_runs) == len(plain.cpu_runs) == len(di.e2e_runs):
            cpu = [d - p for d, p in zip(di.cpu_runs, plain.cpu_runs, strict=True)]
            lines.append(f"  CPU time they add per event, round by round: {spread(cpu)}")
    return "\n".join(lines)


def spread(values: list[float]) -> str:
    """``median M us, from MIN to MAX us``."""
    ordered = sorted(values)
    return (
        f"median {ordered[len(ordered) // 2]:.1f} us, from {ordered[0]:.1f} to {ordered[-1]:.1f} us"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="eventbus embedded-mode benchmark")
    parser.add_argument("--n", type=int, default=20_000, help="events per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per system (best kept)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny run of every eventbus row in seconds; skips the fastapi-eventbus "
        f"{SEED_VERSION} reference (its venv is installed on demand) and prints '-' for it",
    )
    args = parser.parse_args()
    if args.smoke:
        args.n, args.repeat = SMOKE_N, 1

    here = sys.executable
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    project = {"PYTHONPATH": pythonpath}
    systems = [
        System(SEED_NAME, "" if args.smoke else ensure_seed_venv(), "_ref_seed.py"),
        System("raw dramatiq StubBroker + Worker", here, "_ref_dramatiq.py"),
        System(PLAIN_NAME, here, "_run_eventbus.py", ["publish"], project),
        System(DI_NAME, here, "_run_eventbus.py", ["publish_di"], project),
        System(DI_ASYNC_NAME, here, "_run_eventbus.py", ["publish_di_async"], project),
        System(
            "eventbus embedded publish_many",
            here,
            "_run_eventbus.py",
            ["publish_many"],
            project,
        ),
    ]
    # The handler with dependencies takes turns with the same handler without them.
    together = (PLAIN_NAME, DI_NAME, DI_ASYNC_NAME)
    groups = [[s] for s in systems if s.name not in together]
    groups.insert(2, [s for s in systems if s.name in together])
    rows = []
    for group in groups:
        if args.smoke and group[0].name == SEED_NAME:
            rows.append(Row(SEED_NAME, note="-"))
            continue
        log(f"running {' / '.join(s.name for s in group)} ...")
        rows += measure(group, args.n, args.repeat)
    print(table(rows, args.n, args.repeat))


if __name__ == "__main__":
    main()
