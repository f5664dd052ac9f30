"""Observability overhead: throughput with metrics and tracing off and on, in one run.

Usage (from the repo root): python bench/observability.py [--n 20000] [--repeat 3]
                            [--backend sync|redis|both]

Four configurations: nothing; PrometheusMetricsCollector; OpenTelemetryTracer
with the SDK, a BatchSpanProcessor (as in production) and an in-memory exporter;
both.  ``sync``: embedded backend, N events to one no-op async handler, each
configuration in a fresh subprocess.
``redis``: its own redis-server, the web side publishing N events one by one to
``dramatiq eventbus.actors -p 2 -t 8`` workers configured the same way
(``EVENTBUS_METRICS`` / ``EVENTBUS_TRACING``), until the last is acked.  Prints
end-to-end events/s and the loss against "off".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("off", "prometheus", "otel", "prometheus+otel")


async def _measure(n: int, config: str) -> float:
    from eventbus import BaseEvent, EventBus, MetricsCollector, NoopMetricsCollector, NoopTracer
    from eventbus.tracing import EventTracer

    metrics: MetricsCollector = NoopMetricsCollector()
    tracer: EventTracer = NoopTracer()
    if "prometheus" in config:
        from prometheus_client import CollectorRegistry

        from eventbus.prometheus import PrometheusMetricsCollector

        metrics = PrometheusMetricsCollector(registry=CollectorRegistry())
    if "otel" in config:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from eventbus.otel import OpenTelemetryTracer

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(InMemorySpanExporter()))
        tracer = OpenTelemetryTracer(tracer_provider=provider)

    class Ev(BaseEvent):
        topic: str = "bench"
        i: int

    handled = 0

    async def handler(event: BaseEvent) -> None:
        nonlocal handled
        handled += 1

    bus = EventBus(metrics=metrics, tracer=tracer)
    await bus.registry.register("bench", handler)
    await bus.start()
    started = time.perf_counter()
    for i in range(n):
        await bus.publish(Ev(i=i))
    await bus.drain(timeout=300)
    elapsed = time.perf_counter() - started
    await bus.stop()
    assert handled == n, (handled, n)
    return n / elapsed


def _redis_rate(url: str, n: int, config: str) -> float:
    from bench import redis_bench as rb

    env = {"BENCH_OTEL_SDK": "1"} if "otel" in config else {}
    if "prometheus" in config:
        env["EVENTBUS_METRICS"] = "prometheus"
    if "otel" in config:
        env["EVENTBUS_TRACING"] = "otel"
    rb.flush(url)
    pending = rb.pending_counter("eventbus", url)
    worker = rb.start_worker("eventbus", url, 2, 8, extra_env=env)
    try:
        child = subprocess.run(
            [sys.executable, __file__, "--n", str(n), "--child", config, "--redis-url", url],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        )
        started = json.loads(child.stdout)["started"]
        _, done = rb.wait_drained(pending, n + 1)
    finally:
        worker.stop()
    return n / (done - started)


async def _redis_publish(n: int, config: str, url: str) -> float:
    """Child: publish N events with the configured bus; returns the start time."""
    from bench import _redis_bench_handlers as handlers
    from eventbus import EventBus, EventBusSettings
    from eventbus.backends.redis import RedisBackend

    if "otel" in config:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(InMemorySpanExporter()))
        trace.set_tracer_provider(provider)
    settings = EventBusSettings(
        metrics="prometheus" if "prometheus" in config else "none",
        tracing="otel" if "otel" in config else "none",
    )
    bus = EventBus(backend=RedisBackend(url=url, namespace="bench"), settings=settings)
    await bus.start()
    events = [handlers.Noop(i=i) for i in range(n)]
    started = time.perf_counter()
    for event in events:
        await bus.publish(event)
    await bus.stop()
    return started


def _table(title: str, best: dict[str, float]) -> None:
    print(title + "\n")
    print("| configuration | end-to-end/s | vs off |")
    print("| --- | ---: | ---: |")
    for config in CONFIGS:
        loss = best[config] / best["off"] - 1
        print(f"| {config} | {best[config]:,.0f} | {loss:+.0%} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backend", choices=("sync", "redis", "both"), default="both")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child and args.redis_url:
        sys.path.insert(0, str(ROOT))
        print(
            json.dumps({"started": asyncio.run(_redis_publish(args.n, args.child, args.redis_url))})
        )
        return
    if args.child:
        print(json.dumps({"rate": asyncio.run(_measure(args.n, args.child))}))
        return

    if args.backend in ("sync", "both"):
        best: dict[str, float] = {}
        for _ in range(args.repeat):
            for config in CONFIGS:
                out = subprocess.run(
                    [sys.executable, __file__, "--n", str(args.n), "--child", config],
                    cwd=ROOT,
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                best[config] = max(best.get(config, 0.0), json.loads(out)["rate"])
        _table(f"Embedded backend, N = {args.n:,}, one no-op handler, best of {args.repeat}", best)
    if args.backend in ("redis", "both"):
        sys.path.insert(0, str(ROOT))
        from bench import redis_bench as rb

        best = {}
        with rb.redis_server() as url:
            for _ in range(args.repeat):
                for config in CONFIGS:
                    best[config] = max(best.get(config, 0.0), _redis_rate(url, args.n, config))
        _table(
            f"Redis backend, N = {args.n:,}, workers -p 2 -t 8, one no-op handler, "
            f"best of {args.repeat}",
            best,
        )


if __name__ == "__main__":
    main()
