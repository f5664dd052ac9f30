"""Embedded-mode benchmark: N events -> one no-op handler, three systems.

Usage (from the repo root): python bench/embedded.py [--n 20000] [--repeat 3]

Every measurement runs in a fresh subprocess, one after another. The best
(max) publish and end-to-end rates over the repeats are reported.
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


@dataclass
class System:
    name: str
    python: str
    script: str  # called as: python script N *args
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Row:
    name: str
    publish: float | None = None  # events/s
    e2e: float | None = None  # events/s
    note: str = ""


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


def measure(system: System, n: int, repeat: int) -> Row:
    """Run `repeat` times; keep the best publish and end-to-end rates."""
    pubs, e2es = [], []
    for k in range(repeat):
        res = run_once(system, n)
        if "publish" not in res:
            note = "not available" if "unavailable" in res else "failed"
            log(f"  {system.name}: {note}: {res.get('unavailable') or res.get('error')}")
            return Row(system.name, note=note)
        pubs.append(n / float(res["publish"]))
        e2es.append(n / float(res["e2e"]))
        log(f"  {system.name} #{k + 1}: publish {pubs[-1]:,.0f}/s, end-to-end {e2es[-1]:,.0f}/s")
    return Row(system.name, max(pubs), max(e2es))


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
    out += [
        "",
        f"machine: nproc={nproc()}, python {platform.python_version()}, CPU: {cpu_model()}",
    ]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description="eventbus embedded-mode benchmark")
    parser.add_argument("--n", type=int, default=20_000, help="events per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per system (best kept)")
    args = parser.parse_args()

    here = sys.executable
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    project = {"PYTHONPATH": pythonpath}
    systems = [
        System(SEED_NAME, ensure_seed_venv(), "_ref_seed.py"),
        System("raw dramatiq StubBroker + Worker", here, "_ref_dramatiq.py"),
        System(
            "eventbus embedded (this project)",
            here,
            "_run_eventbus.py",
            ["publish"],
            project,
        ),
        System(
            "eventbus embedded publish_many",
            here,
            "_run_eventbus.py",
            ["publish_many"],
            project,
        ),
    ]
    rows = []
    for system in systems:
        log(f"running {system.name} ...")
        rows.append(measure(system, args.n, args.repeat))
    print(table(rows, args.n, args.repeat))


if __name__ == "__main__":
    main()
