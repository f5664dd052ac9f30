"""How long a publisher keeps writing to a demoted Redis primary after a Sentinel failover.

Usage (from the repo root): python bench/redis_failover_window_bench.py [--repeat 3] [--smoke]

Each trial starts its own primary, replica and three sentinels on loopback
(:class:`tests.sentinel_support.SentinelCluster`) and one subscription, then
publishes one event every 5 ms through the ``redis+sentinel://`` URL
(``EVENTBUS_REDIS_MIN_REPLICAS=0``, no worker) while the *third* sentinel runs
``SENTINEL FAILOVER``; the publisher asks the first one, which learns of the
failover from the others' hello messages (every 2 s).  Two shapes:

* **coordinated failover**: the old primary is left alone (Sentinel demotes it
  some 10 s later).  Measured: seconds from the promotion (the third sentinel
  names the replica) until the first publish the new primary took, and the
  publishes the old primary took after the promotion (they vanish when Sentinel
  demotes it, unless a worker took them from there first);
* **demotion under the publisher**: right after the promotion the old primary is
  made a replica (``REPLICAOF``, as Sentinel does later, but without closing its
  clients' connections, which then meet ``READONLY``).  Measured: seconds from
  the ``REPLICAOF`` until a publish is accepted again, and the publishes refused
  meanwhile.

The table shows the median and the range of ``--repeat`` trials of each shape.
``--smoke`` runs one trial of each.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # after PYTHONPATH: another checkout's eventbus can be measured

from eventbus import BaseEvent, EventBus, EventBusSettings, PublishError  # noqa: E402
from eventbus.redis.backend import RedisBackend  # noqa: E402
from eventbus.redis.scripts import bodies_key  # noqa: E402
from eventbus.redis.subscriptions import register  # noqa: E402
from tests.redis_support import HOST  # noqa: E402
from tests.sentinel_support import MASTER, SentinelCluster  # noqa: E402

NAMESPACE = "windowbench"
TOPIC = "bench.window"
SERVICE = "bench"
QUEUE = f"{SERVICE}.eventbus"
ACTOR = f"{TOPIC}:bench.handler"
#: Seconds between two publishes.
INTERVAL = 0.005
#: Seconds the publisher goes on after the promotion (or the demotion).
AFTER = 3.0
#: Seconds a promotion may take.
PROMOTION_TIMEOUT = 20.0
_SEQ = re.compile(rb'"seq":(\d+)')


class Marked(BaseEvent):
    topic: str = TOPIC
    seq: int


def stored(client: redis.Redis) -> set[int]:
    """The events of the subscription's queue on that server."""
    bodies = client.hvals(bodies_key(NAMESPACE, QUEUE))
    return {int(m.group(1)) for body in bodies if (m := _SEQ.search(body))}


async def trial(directory: Path, demote: bool) -> tuple[float, int]:
    """One failover; returns (seconds until publishes land on the new primary, publishes
    lost to the old primary or refused)."""
    cluster = SentinelCluster(directory).start()
    try:
        old = redis.Redis(HOST, cluster.primary.port)
        register(old, NAMESPACE, SERVICE, [(TOPIC, ACTOR, QUEUE)])
        cluster.wait_ready()
        bus = EventBus(
            backend=RedisBackend(url=cluster.url, namespace=NAMESPACE, publish_timeout=1.0),
            settings=EventBusSettings(service=SERVICE, shutdown_timeout=2.0),
        )
        await bus.start()
        accepted: dict[int, float] = {}
        refused: dict[int, float] = {}
        stop = asyncio.Event()

        async def publish() -> None:
            seq = 0
            while not stop.is_set():
                seq += 1
                try:
                    await bus.publish(Marked(seq=seq))
                except PublishError:
                    refused[seq] = time.monotonic()
                else:
                    accepted[seq] = time.monotonic()
                await asyncio.sleep(INTERVAL)

        publisher = asyncio.create_task(publish())
        await asyncio.sleep(1.0)
        leader = cluster.sentinel(2)
        leader.execute_command("SENTINEL", "FAILOVER", MASTER)
        deadline = time.monotonic() + PROMOTION_TIMEOUT
        while True:
            address = leader.sentinel_get_master_addr_by_name(MASTER)
            if address and int(address[1]) != cluster.primary.port:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("no promotion")
            await asyncio.sleep(0.005)
        promoted = time.monotonic()
        new = redis.Redis(HOST, int(address[1]))
        if demote:
            old.replicaof(HOST, int(address[1]))
            promoted = time.monotonic()
        await asyncio.sleep(AFTER)
        stop.set()
        await publisher
        await bus.stop()
        if demote:
            first = min(t for t in accepted.values() if t > promoted)
            return first - promoted, sum(1 for t in refused.values() if t > promoted)
        on_new = stored(new)
        first = min(t for seq, t in accepted.items() if seq in on_new and t > promoted)
        left = [seq for seq, t in accepted.items() if t > promoted and seq not in on_new]
        return first - promoted, len(left)
    finally:
        cluster.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    repeat = 1 if args.smoke else args.repeat
    rows = []
    for demote, title, counted in (
        (False, "coordinated failover", "publishes taken by the old primary after it"),
        (True, "demotion under the publisher", "publishes refused meanwhile"),
    ):
        seconds, counts = [], []
        for _ in range(repeat):
            with tempfile.TemporaryDirectory() as directory:
                s, c = asyncio.run(trial(Path(directory), demote))
            seconds.append(s)
            counts.append(c)
        rows.append((title, seconds, counted, counts))
    import eventbus.redis.resp as resp

    print(
        f"machine: {os.cpu_count()} CPU(s), Python {platform.python_version()}, "
        f"load {os.getloadavg()[0]:.1f}; resp.py: {resp.__file__}"
    )
    print("| shape | seconds until publishes land on the new primary | count | what |")
    print("|---|---:|---:|---|")
    for title, seconds, counted, counts in rows:
        print(
            f"| {title} | {statistics.median(seconds):.2f} ({min(seconds):.2f}-"
            f"{max(seconds):.2f}) | {statistics.median(counts):g} ({min(counts)}-"
            f"{max(counts)}) | {counted} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
