"""Dead-letter console: server time of its pages with 100,000 dead letters in Redis.

Usage (from the repo root): python bench/console_bench.py [--n 100000] [--runs 20]

Starts its own redis-server on a free loopback port (no persistence), writes N
dead letters (5 topics, 12 handlers, 6 error types, ~600 bytes of payload and
traceback each), then requests each console page ``--runs`` times through the
ASGI app in-process and reports the server time the page's ``Server-Timing``
header gives (store reads, rendering), median and p95, and the Redis commands
one request sends.

Reference in the same run: the same pages over the same records when the store
is searched by a full scan (:class:`eventbus.dlq.search.ScanSearch`, what a
store without indexes gets), 2 runs each.  The target (issue 15) is the list
and group pages in <= 300 ms of server time.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from bench.redis_bench import redis_server  # noqa: E402
from eventbus import EventBus, EventBusSettings, FailedEvent  # noqa: E402
from eventbus.console.routes import dlq_console  # noqa: E402
from eventbus.dlq.queue import DeadLetterQueue  # noqa: E402
from eventbus.redis.backend import RedisBackend  # noqa: E402
from eventbus.redis.dlq import RedisDeadLetterStore  # noqa: E402

#: The issue's budget for the list and group pages, in milliseconds of server time.
BUDGET_MS = 300.0
TOPICS = ["orders.paid", "orders.refunded", "users.created", "mail.bounced", "stock.moved"]
ERRORS = ["ConnectionError", "TimeoutError", "KeyError", "ValueError", "HandlerTimeout", "OSError"]
NAMESPACE = "consolebench"


def records(n: int, now: datetime) -> Iterator[FailedEvent]:
    rng = random.Random(15)
    handlers = [(t, f"{t}:{name}") for t in TOPICS for name in ("book", "notify")][:12]
    handlers += [(TOPICS[0], f"{TOPICS[0]}:audit"), (TOPICS[1], f"{TOPICS[1]}:audit")]
    for i in range(n):
        topic, handler = handlers[i % len(handlers)]
        error_type = ERRORS[rng.randrange(len(ERRORS))]
        at = now - timedelta(seconds=(n - i) * 2.5)  # ~3 days of failures
        envelope = {
            "type": "bench.events.Order",
            "event": {
                "event_id": f"{i:032x}",
                "topic": topic,
                "timestamp": at.isoformat(),
                "metadata": {"correlation_id": f"req-{i}"},
                "order_id": i,
                "amount_cents": rng.randrange(100, 100_000),
                "note": "x" * 120,
            },
        }
        yield FailedEvent(
            id=f"{i:08x}-bench",
            event=None,
            envelope=envelope,
            topic=topic,
            handler=handler,
            queue="bench.default",
            attempts=4,
            error=f"{error_type.lower()} while handling order {i}",
            error_type=error_type,
            traceback="Traceback (most recent call last):\n" + '  File "/app/x.py", line 1\n' * 8,
            first_failed_at=at - timedelta(seconds=3),
            last_failed_at=at,
            correlation_id=f"req-{i}",
            trace_id=f"{i:032x}",
        )


class Unindexed:
    """The Redis store seen through the plain DeadLetterStore protocol only."""

    def __init__(self, store: RedisDeadLetterStore) -> None:
        self.store = store
        self.blocking = True
        self.audit = store.audit

    def __getattr__(self, name: str) -> Any:
        if name in ("search", "failure_groups", "select"):
            raise AttributeError(name)
        return getattr(self.store, name)

    def add(self, record: FailedEvent) -> None:
        self.store.add(record)

    def find(self, limit: int | None = 10, **filters: Any) -> list[FailedEvent]:
        return self.store.find(limit, **filters)

    def get(self, record_id: str) -> FailedEvent | None:
        return self.store.get(record_id)

    def remove(self, record_id: str) -> FailedEvent | None:
        return self.store.remove(record_id)

    def size(self) -> int:
        return self.store.size()

    def clear(self) -> None:
        self.store.clear()

    def claim(self, record_id: str) -> FailedEvent | None:
        return self.store.claim(record_id)

    def release(self, record: FailedEvent) -> None:
        self.store.release(record)

    def complete(self, record_id: str) -> None:
        self.store.complete(record_id)


def commands(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(v["calls"]) for v in stats.values())  # type: ignore[union-attr]


def measure(
    http: TestClient, client: redis.Redis, path: str, runs: int
) -> tuple[float, float, int]:
    """Median and p95 server milliseconds of ``path``, and Redis commands per request."""
    times = []
    sent = 0
    for _ in range(runs):
        before = commands(client)
        answer = http.get(path)
        sent = commands(client) - before - 1  # the INFO itself counts once
        if answer.status_code != 200:
            raise SystemExit(f"{path}: HTTP {answer.status_code}: {answer.text[:300]}")
        times.append(float(answer.headers["server-timing"].split("dur=")[1]))
    times.sort()
    p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
    return statistics.median(times), p95, sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--reference-runs", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny run of every row in seconds")
    args = parser.parse_args()
    if args.smoke:
        args.n, args.runs, args.reference_runs = 300, 2, 1

    with redis_server() as url:
        client = redis.Redis.from_url(url)
        backend = RedisBackend(url=url, namespace=NAMESPACE)
        bus = EventBus(backend=backend, settings=EventBusSettings(dlq_max_size=args.n * 2))
        store = bus.dlq.store
        assert isinstance(store, RedisDeadLetterStore)
        now = datetime.now(UTC)
        started = time.perf_counter()
        store.add_many(records(args.n, now))
        load_s = time.perf_counter() - started
        print(
            f"wrote {args.n:,} dead letters in {load_s:.1f} s ({args.n / load_s:,.0f}/s); "
            f"Redis uses {client.info('memory')['used_memory_human']}",
            file=sys.stderr,
        )

        scan_bus = EventBus(settings=EventBusSettings())
        scan_bus.dlq = DeadLetterQueue(Unindexed(store))  # type: ignore[arg-type]
        app = FastAPI()
        app.include_router(dlq_console(bus, allow_unauthenticated=True))
        app.include_router(dlq_console(scan_bus, allow_unauthenticated=True, prefix="/scan"))

        middle = client.zrange(f"{NAMESPACE}:dlq:ix", args.n // 2, args.n // 2, withscores=True)
        cursor = f"{int(middle[0][1])}:{middle[0][0].decode()}"
        since = (now - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S")
        record_id = f"{args.n // 3:08x}-bench"
        pages = [
            ("list, newest 50", "/?limit=50", True),
            ("list, 50 at the middle (cursor)", f"/?limit=50&cursor={cursor}", True),
            ("list, topic", f"/?topic={TOPICS[2]}", True),
            ("list, handler + error type", f"/?handler={TOPICS[0]}:book&error_type=KeyError", True),
            (
                "list, topic + error type (no shared index)",
                f"/?topic={TOPICS[1]}&error_type=OSError",
                True,
            ),
            ("list, last hour", f"/?since={since}", True),
            ("groups", "/groups", True),
            ("groups, last hour", f"/groups?since={since}", True),
            ("record detail", f"/record?id={record_id}", False),
        ]
        with TestClient(app) as http:
            http.get("/eventbus/console/")  # templates compiled, index checked
            rows = []
            for name, path, budgeted in pages:
                median, p95, sent = measure(http, client, "/eventbus/console" + path, args.runs)
                reference = None
                if path.startswith(("/?", "/groups")) and name in (
                    "list, newest 50",
                    "groups",
                    "list, topic",
                ):
                    reference = measure(http, client, "/scan" + path, args.reference_runs)[0]
                rows.append((name, median, p95, sent, reference, budgeted))

    print(
        f"\nConsole pages, {args.n:,} dead letters in Redis, server time (Server-Timing), "
        f"{args.runs} runs; Python {sys.version.split()[0]}, {os.cpu_count()} CPUs\n"
    )
    print("| page | median ms | p95 ms | Redis commands | full scan ms | ratio | <= 300 ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | :---: |")
    for name, median, p95, sent, reference, budgeted in rows:
        ref = f"{reference:,.0f}" if reference is not None else "-"
        ratio = f"{reference / median:,.0f}x" if reference is not None else "-"
        verdict = ("yes" if p95 <= BUDGET_MS else "NO") if budgeted else "-"
        print(f"| {name} | {median:.1f} | {p95:.1f} | {sent} | {ref} | {ratio} | {verdict} |")


if __name__ == "__main__":
    main()
