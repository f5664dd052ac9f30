"""Observability overhead: throughput with metrics and tracing off and on, in one run.

Usage (from the repo root): python bench/observability.py [--n 20000] [--repeat 3]

Embedded backend, N events to one no-op async handler, four configurations, each
in a fresh subprocess: nothing; PrometheusMetricsCollector; OpenTelemetryTracer
with the SDK and an in-memory exporter; both.  Prints end-to-end events/s and
the loss against "off".
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
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from eventbus.otel import OpenTelemetryTracer

        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps({"rate": asyncio.run(_measure(args.n, args.child))}))
        return

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
    print(f"N = {args.n:,} events, embedded backend, one no-op handler, best of {args.repeat}\n")
    print("| configuration | end-to-end/s | vs off |")
    print("| --- | ---: | ---: |")
    for config in CONFIGS:
        loss = best[config] / best["off"] - 1
        print(f"| {config} | {best[config]:,.0f} | {loss:+.0%} |")


if __name__ == "__main__":
    main()
