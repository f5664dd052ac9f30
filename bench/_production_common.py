"""What every system's side of bench/production_bench.py shares (redis-py and the
standard library only: the FastStream scripts, in their own venv, import it too).

:class:`Progress`: how far a consumer got, without a Redis command per event.  Every
handled event calls :meth:`Progress.hit`, which counts it in memory; a daemon
thread writes ``"<count> <wall clock of the last event>"`` under the process id to the
hash :data:`PROGRESS_KEY` every :data:`FLUSH_SECONDS`, and pushes the publish-to-handler
lags of stamped events (``sent`` > 0) to :data:`LAGS_KEY`.  The benchmark sums the
counts: the end-to-end time ends at the newest "last event" once every event is counted.

:func:`serve`: the publisher's loop, driven over stdin, so that the benchmark reads the
CPU counters of the consumers and Redis right before the first publish.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable

import redis

PROGRESS_KEY = "bench:prod:progress"
LAGS_KEY = "bench:prod:lags"
#: Seconds between two writes of a process's progress (only when it changed).
FLUSH_SECONDS = 0.02


class Progress:
    """Per-process count of handled events; thread-safe (dramatiq runs 8 threads)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.count = 0
        self.last = 0.0
        self.lags: list[float] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the writer (in the process that handles: dramatiq forks after import)
        and announce this process with a count of 0."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._flush_forever, daemon=True)
                self._thread.start()

    def hit(self, sent: float = 0.0) -> None:
        """One event handled; ``sent``: its publish wall clock, for the latency rows."""
        now = time.time()
        if self._thread is None:
            self.start()
        with self._lock:
            self.count += 1
            self.last = now
            if sent:
                self.lags.append(now - sent)

    def _flush_forever(self) -> None:
        client = redis.Redis.from_url(self.url)
        field = str(os.getpid())
        written = -1
        while True:
            with self._lock:
                count, last, lags = self.count, self.last, self.lags
                self.lags = []
            if count != written:
                pipe = client.pipeline(transaction=False)
                if lags:  # pushed before the count: a complete count has all its lags
                    pipe.rpush(LAGS_KEY, *lags)
                pipe.hset(PROGRESS_KEY, field, f"{count} {last}")
                pipe.execute()
                written = count
            time.sleep(FLUSH_SECONDS)


async def serve(send: Callable[[int, float], Awaitable[object]]) -> None:
    """The publisher's loop.  Prints ``ready``; then, for each ``N RATE`` line read on
    stdin, ``await send(i, sent)`` for ``i`` in ``range(N)``, one by one: as fast as it
    goes when RATE is 0 (``sent`` 0), else RATE per second with ``sent`` the wall clock;
    and prints one JSON line: ``{"seconds": publishing time, "started": wall clock of
    the first publish, "cpu": this process's CPU seconds while publishing}``.  Returns
    at end of input.  The benchmark reads the consumers' and Redis's CPU counters
    right before it writes a line."""
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        n, rate = int(line.split()[0]), float(line.split()[1])
        interval = 1 / rate if rate else 0.0
        cpu = time.process_time()
        started = time.time()
        start = time.perf_counter()
        for i in range(n):
            if interval:
                delay = start + i * interval - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                await send(i, time.time())
            else:
                await send(i, 0.0)
        seconds = time.perf_counter() - start
        cpu = time.process_time() - cpu
        print(json.dumps({"seconds": seconds, "started": started, "cpu": cpu}), flush=True)
