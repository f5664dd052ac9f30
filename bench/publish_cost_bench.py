"""Publisher cost per event of the Redis backend: commands, Redis CPU, publisher CPU.

On a private ``redis-server``, with the subscriptions of bench/redis_bench.py's
handlers written (no worker running: what is published stays queued), publishes
``--n`` events per row and reports, per event: the Redis commands run (``INFO
commandstats`` deltas, a script's commands included; the top commands listed),
Redis CPU (``INFO cpu``), this process's CPU, and events/s.  Rows: one by one,
64 concurrent callers (group commit), one by one to a topic with 5 handlers,
publish_many; each while the topic warms up (the minute after its first
subscription: every event is also kept in the unrouted window) and in the steady
state (the warm-up mark removed).  CPU per event and commands per event are the stable figures on a
shared machine; events/s moves with the load.

    .venv/bin/python bench/publish_cost_bench.py --n 5000 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _redis_bench_fanout as fanout
from bench.redis_bench import (
    CALLERS,
    NAMESPACE,
    eventbus_publish,
    fresh_subscriptions,
    redis_server,
)
from eventbus.redis.scripts import WARM_FIELD

ROWS = tuple(
    (f"{name}, {phase}", mode, fan, phase == "steady")
    for phase in ("warm-up", "steady")
    for name, mode, fan in (
        ("publish/s (one by one)", "publish", 1),
        (f"publish {CALLERS} concurrent/s", "concurrent", 1),
        ("publish, 5 handlers/s", "publish", fanout.HANDLERS),
        ("publish_many/s", "many", 1),
    )
)


def commandstats(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def measure(url: str, n: int, mode: str, fan: int, steady: bool) -> dict[str, object]:
    client = redis.Redis.from_url(url)
    fresh_subscriptions(url)
    if steady:  # as if the topics' warm-up (a minute after their first subscription) were over
        for key in client.scan_iter(match=f"{NAMESPACE}:t:*"):
            client.hdel(key, WARM_FIELD)
    before, cpu0, mine0 = commandstats(client), redis_cpu(client), time.process_time()
    _, seconds = asyncio.run(eventbus_publish(url, n, mode, fan))
    mine, cpu = time.process_time() - mine0, redis_cpu(client) - cpu0
    after = commandstats(client)
    delta = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    delta.pop("info", None)  # this bench's own
    return {
        "rate": n / seconds,
        "commands": sum(delta.values()) / n,
        "redis_us": cpu / n * 1e6,
        "publisher_us": mine / n * 1e6,
        "top": sorted(((v / n, k) for k, v in delta.items()), reverse=True)[:12],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3, help="runs per row (median)")
    parser.add_argument("--smoke", action="store_true", help="tiny run of every row in seconds")
    args = parser.parse_args()
    if args.smoke:
        args.n, args.repeat = 200, 1
    runs: dict[str, list[dict[str, object]]] = {row[0]: [] for row in ROWS}
    with redis_server() as url:
        for _ in range(args.repeat):
            for name, mode, fan, steady in ROWS:
                runs[name].append(measure(url, args.n, mode, fan, steady))
    print(f"n={args.n}, repeat={args.repeat} (medians)\n")
    print("| row | events/s | Redis commands/event | Redis CPU µs/event | publisher CPU µs/event |")
    print("|---|---:|---:|---:|---:|")
    medians: dict[str, float] = {}
    for name, results in runs.items():
        med = {
            k: statistics.median(float(r[k]) for r in results)  # type: ignore[arg-type]
            for k in ("rate", "commands", "redis_us", "publisher_us")
        }
        medians[name] = med["rate"]
        print(
            f"| {name} | {med['rate']:.0f} | {med['commands']:.2f} | "
            f"{med['redis_us']:.1f} | {med['publisher_us']:.1f} |"
        )
    for k in (0, 4):
        one, five = medians[ROWS[k][0]], medians[ROWS[k + 2][0]]
        print(f"\nfan-out x5 ratio, {ROWS[k][0]}: {five / one:.2f}")
    for name, results in runs.items():
        top = results[-1]["top"]
        print(f"\n{name}: " + ", ".join(f"{k} {v:.2f}" for v, k in top))  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
