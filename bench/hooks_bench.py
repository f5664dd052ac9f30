"""CachedHooksBroker against dramatiq's own ``emit_before`` / ``emit_after``.

    python bench/hooks_bench.py            # 200,000 messages' worth of hooks, best of 5
    python bench/hooks_bench.py --smoke    # a few thousand, for the test suite

Runs the hooks one message goes through in a worker (``before/after_process_message``,
``before/after_enqueue``, ``before/after_ack``...) over the middleware chain a
Redis worker with metrics and tracing has, once on a plain StubBroker and once on
the same broker class with :class:`~eventbus.backends.base.CachedHooksBroker` mixed
in, in the same run, and prints microseconds per message and the ratio.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import dramatiq
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import AgeLimit, Callbacks, Pipelines, TimeLimit

from eventbus.backends.base import CachedHooksBroker
from eventbus.metrics import InMemoryMetricsCollector
from eventbus.middleware import DeadLetters, Metrics, Retries, RetryPolicy, Tracing
from eventbus.tracing import LoggingTracer

#: The signals one handled message emits, in order (before_* then after_*).
SIGNALS = ("enqueue", "process_message", "ack")


class _Cached(CachedHooksBroker, StubBroker):
    pass


def _chain() -> list[dramatiq.Middleware]:
    metrics = InMemoryMetricsCollector()
    return [
        AgeLimit(),
        TimeLimit(),
        Callbacks(),
        Pipelines(),
        Metrics(metrics),
        Tracing(LoggingTracer()),
        DeadLetters(None, metrics),
        Retries(RetryPolicy(), metrics),
    ]


def _per_message_us(broker: dramatiq.Broker, n: int) -> float:
    message = dramatiq.Message(
        queue_name="q", actor_name="a", args=(), kwargs={}, options={}, message_id="m"
    )
    emit_before, emit_after = broker.emit_before, broker.emit_after
    # Signals whose hooks take extra arguments are skipped by dramatiq's no-op
    # middleware hooks alike; the enqueue/ack signals carry only the message.
    start = time.perf_counter()
    for _ in range(n):
        emit_before("enqueue", message, None)
        emit_after("enqueue", message, None)
        emit_before("ack", message)
        emit_after("ack", message)
        emit_before("nack", message)
        emit_after("nack", message)
    return (time.perf_counter() - start) / n * 1e6


def run(n: int, rounds: int) -> dict[str, Any]:
    plain = StubBroker(middleware=_chain())
    cached = _Cached(middleware=_chain())
    best_plain = min(_per_message_us(plain, n) for _ in range(rounds))
    best_cached = min(_per_message_us(cached, n) for _ in range(rounds))
    return {"plain": best_plain, "cached": best_cached, "ratio": best_plain / best_cached}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny run for the test suite")
    args = parser.parse_args()
    n, rounds = (2_000, 1) if args.smoke else (args.n, args.rounds)
    result = run(n, rounds)
    print(f"middleware: {len(_chain())}, messages: {n:,}, best of {rounds}")
    print("| emit hooks per message | dramatiq Broker | CachedHooksBroker | ratio |")
    print("|---|---:|---:|---:|")
    print(
        f"| 6 signals (enqueue, ack, nack) | {result['plain']:.2f} us "
        f"| {result['cached']:.2f} us | {result['ratio']:.2f}x |"
    )


if __name__ == "__main__":
    main()
