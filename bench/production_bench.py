"""Production-shape Redis benchmark: the consumers run while the publisher publishes.

Usage (from the repo root): python bench/production_bench.py [--n 20000] [--repeat 3]
[--processes 1,2] [--only eventbus,eventbus-threads,dramatiq,faststream-list,faststream-stream]
[--smoke]
[--profile DIR]

Starts its own ``redis-server`` on a free loopback port.  For each number of worker
processes P and each system, round-robin (the systems alternated within every repeat):

1. starts the consumers and waits until they consume: eventbus ``dramatiq
   eventbus.actors bench._production_handlers -p P -t 8`` (one async no-op handler;
   ``eventbus``: the default loop worker, handlers on one event loop;
   ``eventbus-threads``: with ``EVENTBUS_REDIS_WORKER=threads``, handlers on dramatiq's
   worker threads),
   raw dramatiq ``dramatiq bench._production_actors -p P -t 8`` (a no-op actor),
   FastStream 0.7 P subscriber processes of one Redis list, or of one Redis stream's
   consumer group (one consumer each, acked after the handler);
2. publishes a warm-up batch, then N events one by one from a publisher process
   (``bench/_production_publisher.py``, ``bench/_faststream_publisher.py prod``) while
   they consume: **publish/s** = N / time until the last publish returned;
   **end-to-end/s** = N / time from the first publish until the last event was handled;
3. **CPU µs per event**: the publisher's own CPU time over its publish loop; the
   consumers' (each process and its descendants, from ``/proc/PID/stat``: dramatiq forks
   its worker processes); Redis's (``INFO cpu``, ``used_cpu_user + used_cpu_sys``);
   consumers and Redis read right before the first publish and after the last event
   was handled.  On a shared 2-core machine the rates drift from run to run; CPU per
   event does not;
4. **latency p50/p99**: events published at 2/s and 500/s carrying their publish wall
   clock; handler start minus that stamp (same host).

Handlers count in memory and a thread reports every 20 ms (``bench/_production_common.py``):
no Redis command per event beyond the system's own.  Each figure is the median of
``--repeat`` runs; ratios compare eventbus with FastStream's list and with raw dramatiq.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from bench._production_common import LAGS_KEY, PROGRESS_KEY  # noqa: E402
from bench.embedded import cpu_model, nproc, venv_python  # noqa: E402
from bench.redis_bench import (  # noqa: E402
    FASTSTREAM_VENV,
    NAMESPACE,
    Worker,
    command_total,
    ensure_faststream_venv,
    flush,
    fmt,
    percentiles,
    ratio,
    redis_server,
    start_subscriber,
    start_worker,
)
from eventbus.redis.scripts import WARM_FIELD  # noqa: E402

SYSTEMS = ("eventbus", "eventbus-threads", "dramatiq", "faststream-list", "faststream-stream")
#: The eventbus default, FastStream's list and raw dramatiq: the ratio columns.
SYSTEMS_COMPARED = ("eventbus", "faststream-list", "dramatiq")
#: How each eventbus system runs its handlers (``EVENTBUS_REDIS_WORKER``).
WORKER_MODES = {"eventbus": "loop", "eventbus-threads": "threads"}
#: Worker threads per process of eventbus and dramatiq (``-t``).
THREADS = 8
#: Events published (and handled) before the measured N: the consumers' first
#: messages import and fill caches, as a long-running service has long done.
WARMUP = 500
SMOKE_N = 200
SMOKE_WARMUP = 50
SMOKE_SECONDS = 0.5
CLK_TCK = os.sysconf("SC_CLK_TCK")

PUBLISH = "publish/s"
E2E = "end-to-end/s"
CPU_ROWS = ("publisher", "worker(s)", "Redis", "total")
#: Redis commands per event (``INFO commandstats``; a Lua script's commands count too).
COMMANDS = "Redis commands/event"


def command_calls(client: redis.Redis) -> dict[str, float]:
    """Calls per Redis command so far (``INFO commandstats``, without INFO itself)."""
    stats = client.info("commandstats")
    return {k[8:]: float(v["calls"]) for k, v in stats.items() if k != "cmdstat_info"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- CPU counters -------------------------------------------------------------------------


def tree_cpu(root: int) -> float:
    """CPU seconds (user + system) of ``root`` and every live descendant."""
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent, cpu seconds)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "
        # fields[1] is ppid, fields[11] utime, fields[12] stime (stat fields 4, 14, 15).
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK)
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, (parent, _) in stats.items():
        children[parent].append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0.0))[1]
        todo.extend(children.get(pid, []))
    return total


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


# -- consumers and publishers -------------------------------------------------------------


@dataclass
class Setup:
    url: str
    faststream_python: str = ""
    faststream_version: str = ""
    profile_dir: Path | None = None
    warmup: int = WARMUP
    first_minute: bool = False


def end_warm_up(client: redis.Redis) -> None:
    """As a minute after the topic's first subscription: in its first minute a topic
    also keeps each event in its unrouted window (for subscriptions written next,
    docs/redis.md), which a service publishing all day is past."""
    for key in client.scan_iter(match=f"{NAMESPACE}:t:*"):
        client.hdel(key, WARM_FIELD)


def start_consumers(system: str, setup: Setup, processes: int) -> list[Worker]:
    if system in WORKER_MODES:
        modules = ["bench._production_handlers"]
        mode = {"EVENTBUS_REDIS_WORKER": WORKER_MODES[system]}
        return [
            start_worker("eventbus", setup.url, processes, THREADS, modules=modules, extra_env=mode)
        ]
    if system == "dramatiq":
        modules = ["bench._production_actors"]
        return [start_worker(system, setup.url, processes, THREADS, modules=modules)]
    kind = system.removeprefix("faststream-")
    workers: list[Worker] = []
    try:
        for _ in range(processes):  # one at a time: each says when it consumes
            workers.append(start_subscriber(setup.faststream_python, setup.url, f"prod-{kind}"))
    except BaseException:
        for worker in workers:
            worker.stop()
        raise
    return workers


def publisher_command(system: str, setup: Setup) -> list[str]:
    if system.startswith("faststream-"):
        script = str(BENCH / "_faststream_publisher.py")
        kind = system.removeprefix("faststream-")
        return [setup.faststream_python, script, setup.url, "prod", kind]
    kind = "eventbus" if system in WORKER_MODES else system
    return [sys.executable, str(BENCH / "_production_publisher.py"), setup.url, kind]


class Publisher:
    """One connected publisher process for a whole run (``_production_common.serve``)."""

    def __init__(self, system: str, setup: Setup) -> None:
        self.system = system
        env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_REDIS_URL": setup.url}
        self.errors = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed by close())
        self.process = subprocess.Popen(
            publisher_command(system, setup),
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.errors,
            text=True,
        )
        self._line("ready")

    def _line(self, expect: str = "") -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line or (expect and line != expect):
            self.process.wait(10)
            self.errors.seek(0)
            tail = (self.errors.read().strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"{self.system} publisher exit {self.process.returncode}: {tail}")
        return line

    def publish(
        self, n: int, rate: float = 0.0, before: Callable[[], None] = lambda: None
    ) -> dict[str, float]:
        """N events one by one (at ``rate``/s, stamped, unless 0); ``before`` runs right
        before the first.  Returns seconds, started (wall clock), cpu (publisher)."""
        assert self.process.stdin is not None
        before()
        self.process.stdin.write(f"{n} {rate}\n")
        self.process.stdin.flush()
        result: dict[str, float] = json.loads(self._line())
        return result

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.errors.close()


def progress(client: redis.Redis) -> tuple[int, float]:
    """(events handled by all consumer processes, wall clock of the newest one)."""
    count, last = 0, 0.0
    for value in client.hvals(PROGRESS_KEY):
        handled, when = value.split()
        count += int(handled)
        last = max(last, float(when))
    return count, last


def wait_handled(client: redis.Redis, target: int, timeout: float) -> float:
    """Wall clock of the last event once ``target`` events were handled."""
    deadline = time.monotonic() + timeout
    while True:
        count, last = progress(client)
        if count >= target:
            if count > target:
                raise RuntimeError(f"{count} events handled, {target} published")
            return last
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {count} of {target} events handled in {timeout:g}s")
        time.sleep(0.01)


@contextmanager
def profiling(workers: list[Worker], path: Path | None) -> Iterator[None]:
    """py-spy over the workers (and their forked processes) while the block runs."""
    if path is None:
        yield
        return
    beside = Path(sys.executable).with_name("py-spy")
    spy_binary = shutil.which("py-spy") or (str(beside) if beside.exists() else None)
    if spy_binary is None:
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    spies = [
        subprocess.Popen(
            [
                *(spy_binary, "record", "--pid", str(w.process.pid), "--subprocesses"),
                *("--gil", "--nonblocking", "--format", "raw", "--rate", "250"),
                *("--output", f"{path}.{k}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for k, w in enumerate(workers)
    ]
    time.sleep(1.0)  # attached
    try:
        yield
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)


# -- one run ------------------------------------------------------------------------------


@dataclass
class Results:
    systems: tuple[str, ...]
    values: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def put(self, system: str, metric: str, value: float) -> None:
        self.values.setdefault((system, metric), []).append(value)
        log(f"  {system:18} {metric:34} {value:,.2f}")

    def median(self, system: str, metric: str) -> float | None:
        found = self.values.get((system, metric))
        return statistics.median(found) if found else None

    def note(self, text: str) -> None:
        self.notes.append(text)
        log(f"  NOTE: {text}")


def suffix(processes: int) -> str:
    return f", -p {processes}"


def run_once(
    system: str,
    setup: Setup,
    processes: int,
    n: int,
    rates: list[tuple[float, float]],
    out: Results,
    tag: str,
) -> None:
    client = redis.Redis.from_url(setup.url)
    flush(setup.url)
    timeout = max(60.0, n / 200)
    with ExitStack() as stack:
        workers = start_consumers(system, setup, processes)
        for worker in workers:
            stack.callback(worker.stop)
        if system in WORKER_MODES and not setup.first_minute:
            end_warm_up(client)
        publisher = Publisher(system, setup)
        stack.callback(publisher.close)
        publisher.publish(setup.warmup)
        handled = setup.warmup
        wait_handled(client, handled, timeout)

        before: dict[str, float] = {}

        def sample() -> dict[str, float]:
            return {
                "workers": sum(tree_cpu(w.process.pid) for w in workers),
                "redis": redis_cpu(client),
                "commands": command_total(client),
                **{f"cmd:{k}": v for k, v in command_calls(client).items()},
            }

        profile = setup.profile_dir / f"{system}-p{processes}-{tag}" if setup.profile_dir else None
        with profiling(workers, profile if system == "eventbus" else None):
            result = publisher.publish(n, before=lambda: before.update(sample()))
            handled += n
            last = wait_handled(client, handled, timeout)
            after = sample()
        p = suffix(processes)
        out.put(system, PUBLISH + p, n / result["seconds"])
        out.put(system, E2E + p, n / (last - result["started"]))
        cpu = {
            "publisher": result["cpu"],
            "worker(s)": after["workers"] - before["workers"],
            "Redis": after["redis"] - before["redis"],
        }
        cpu["total"] = sum(cpu.values())
        for name in CPU_ROWS:
            out.put(system, f"CPU µs/event {name}{p}", cpu[name] / n * 1e6)
        out.put(system, COMMANDS + p, (after["commands"] - before["commands"]) / n)
        per_command = sorted(
            ((after[k] - before.get(k, 0)) / n, k[4:]) for k in after if k.startswith("cmd:")
        )
        log(
            f"  {system:<18} commands/event, -p {processes}: "
            + ", ".join(f"{name} {v:.2f}" for v, name in reversed(per_command) if v >= 0.01)
        )

        for rate, seconds in rates:
            client.delete(LAGS_KEY)
            count = max(1, int(rate * seconds))
            publisher.publish(count, rate)
            handled += count
            wait_handled(client, handled, timeout)
            lags = [float(x) * 1000 for x in client.lrange(LAGS_KEY, 0, -1)]
            if len(lags) != count:
                raise RuntimeError(f"{len(lags)} latency samples of {count}")
            p50, p99 = percentiles(lags)
            out.put(system, f"p50 ms @{rate:g}/s{p}", p50)
            out.put(system, f"p99 ms @{rate:g}/s{p}", p99)


def metrics(processes: int, rates: list[tuple[float, float]]) -> list[str]:
    p = suffix(processes)
    rows = [PUBLISH + p, E2E + p]
    for rate, _ in rates:
        rows += [f"p50 ms @{rate:g}/s{p}", f"p99 ms @{rate:g}/s{p}"]
    return [*rows, *(f"CPU µs/event {name}{p}" for name in CPU_ROWS), COMMANDS + p]


# -- report -------------------------------------------------------------------------------


def versus(metric: str, ours: float | None, ref: float | None) -> str:
    """eventbus vs a reference, > 1 when eventbus is better (faster, quicker, cheaper)."""
    if metric.startswith(("CPU", COMMANDS)):  # lower is better: the rate ratio upside down
        return ratio(metric, ref, ours)
    return ratio(metric, ours, ref)


def table(out: Results, setup: Setup, n: int, repeat: int, rows: list[str]) -> str:
    fs = f"FastStream {setup.faststream_version or '0.7'}"
    names = {
        "eventbus": "eventbus (redis, loop worker: default)",
        "eventbus-threads": "eventbus (redis, threads worker)",
        "dramatiq": "raw dramatiq 2.2.1",
        "faststream-list": f"{fs} list",
        "faststream-stream": f"{fs} stream (group, acks)",
    }
    phase = "in" if setup.first_minute else "past"
    lines = [
        f"N = {n:,} events published one by one while the consumers run (after "
        f"{setup.warmup} warm-up events; eventbus {phase} its topic's first minute"
        f"); median of {repeat}, systems alternated; "
        f"-t {THREADS} for eventbus and dramatiq; nproc={nproc()}, {cpu_model()}, "
        f"python {platform.python_version()}",
        "",
        "| metric | "
        + " | ".join(names[s] for s in SYSTEMS)
        + " | eventbus vs FastStream list | eventbus vs dramatiq |",
        "|---|" + "---:|" * (len(SYSTEMS) + 2),
    ]
    for metric in rows:
        cells = [out.median(s, metric) for s in SYSTEMS]
        ours, fs_list, dq = (out.median(s, metric) for s in SYSTEMS_COMPARED)
        lines.append(
            f"| {metric} | "
            + " | ".join(fmt(c, metric) for c in cells)
            + f" | {versus(metric, ours, fs_list)} | {versus(metric, ours, dq)} |"
        )
    lines += [
        "",
        "ratios > 1: eventbus faster (rates), quicker (ms) or cheaper (CPU). "
        "-p: worker processes (FastStream: subscriber processes).",
    ]
    if out.notes:
        lines += ["", *(f"- {note}" for note in out.notes)]
    return "\n".join(lines)


def summarize_profiles(directory: Path, top: int = 25) -> str:
    """The py-spy raw profiles' hottest functions: own samples (leaf) and inclusive."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for path in sorted(directory.glob("*.txt")):
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = [f for f in stack.split(";") if not f.startswith("process ")]
            samples = int(count)
            total += samples
            if frames:
                own[frames[-1]] += samples
            for frame in set(frames):
                inclusive[frame] += samples
    if not total:
        return "no py-spy samples"
    lines = [f"py-spy: {total:,} samples"]
    for title, counter in (("own time", own), ("inclusive", inclusive)):
        lines.append(f"\n{title}:")
        for frame, samples in counter.most_common(top):
            lines.append(f"{samples / total:6.1%}  {frame}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="events of the throughput run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--processes", default="1,2", help="worker processes (default 1,2)")
    parser.add_argument(
        "--only", default=",".join(SYSTEMS), help="systems to run (default: %(default)s)"
    )
    parser.add_argument(
        "--latency-seconds",
        type=float,
        nargs=2,
        default=(20.0, 5.0),
        metavar=("AT2", "AT500"),
        help="seconds of the 2/s and the 500/s latency runs (default 20 5)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny run of every path in seconds, one repeat (FastStream only if its venv "
        "exists already); numbers mean nothing",
    )
    parser.add_argument(
        "--first-minute",
        action="store_true",
        help="measure eventbus in its topic's first minute (each event also kept in the "
        "unrouted window); default: past it, as a service publishing all day",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="record the eventbus workers with py-spy into this directory and print their "
        "hottest functions (py-spy's sampling costs CPU: not for the table)",
    )
    args = parser.parse_args()
    only = args.only.split(",")
    systems = tuple(s for s in SYSTEMS if s in only)
    if set(only) - set(SYSTEMS) or not systems:
        parser.error(f"--only takes some of {', '.join(SYSTEMS)}")
    try:
        process_counts = [int(p) for p in args.processes.split(",")]
    except ValueError:
        parser.error("--processes takes comma-separated numbers, e.g. 1,2")
    if any(p < 1 for p in process_counts):
        parser.error("--processes: every count must be at least 1")
    rates = [(2.0, args.latency_seconds[0]), (500.0, args.latency_seconds[1])]
    if args.smoke:
        args.n, args.repeat = SMOKE_N, 1
        rates = [(50.0, SMOKE_SECONDS), (500.0, SMOKE_SECONDS)]
    out = Results(systems)
    setup = Setup(
        url="", warmup=SMOKE_WARMUP if args.smoke else WARMUP, first_minute=args.first_minute
    )
    if any(s.startswith("faststream") for s in systems):
        if args.smoke and not Path(venv_python(FASTSTREAM_VENV)).exists():
            out.note("FastStream not measured (--smoke: its venv is not installed)")
            out.systems = tuple(s for s in systems if not s.startswith("faststream"))
        else:
            try:
                setup.faststream_python, setup.faststream_version = ensure_faststream_venv()
            except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
                out.note(f"FastStream not measured: {exc}")
                out.systems = tuple(s for s in systems if not s.startswith("faststream"))
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        for old in args.profile.glob("*.txt"):
            old.unlink()
        setup.profile_dir = args.profile
    with redis_server() as url:
        setup.url = url
        os.environ["BENCH_REDIS_URL"] = url
        log(f"redis-server at {url}; n={args.n}; systems: {', '.join(out.systems)}")
        for processes in process_counts:
            for k in range(args.repeat):
                for system in out.systems:
                    log(f"{system} -p {processes}, run {k + 1}/{args.repeat} ...")
                    try:
                        run_once(system, setup, processes, args.n, rates, out, f"r{k}")
                    except Exception as exc:
                        out.note(
                            f"{system} -p {processes} run {k + 1}: {type(exc).__name__}: {exc}"
                        )
    rows = [m for p in process_counts for m in metrics(p, rates)]
    print(table(out, setup, args.n, args.repeat, rows))
    if args.profile:
        print()
        print(summarize_profiles(args.profile))


if __name__ == "__main__":
    main()
