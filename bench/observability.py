"""Observability overhead: throughput with metrics and tracing off and on, in one run.

Usage (from the repo root): python bench/observability.py [--n 20000] [--repeat 3]
                            [--backend sync|redis|both] [--workload noop|write|both]

Configurations: nothing; PrometheusMetricsCollector; OpenTelemetryTracer on the SDK
with a BatchSpanProcessor (as in production) and an in-memory exporter, every
trace sampled; the same at 10 % (``ParentBased(TraceIdRatioBased(0.1))``, what a
busy service runs); Prometheus with each.

Workloads: ``noop``, a handler that does nothing (the worst case: the whole cost
of an event is the bus's); ``write``, a handler that stores the event as JSON in
Redis (one SET round trip, what many handlers do).

``sync``: embedded backend, N events to one async handler, each configuration in a
fresh subprocess.  ``redis``: the web side publishing N events one by one to
``dramatiq eventbus.actors -p 2 -t 8`` workers configured the same way
(``EVENTBUS_METRICS`` / ``EVENTBUS_TRACING``), until the last is acked.  Both use
their own redis-server.  Prints end-to-end events/s and the loss against "off".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = (
    "off",
    "prometheus",
    "otel",
    "prometheus+otel",
    "otel@10%",
    "prometheus+otel@10%",
)
#: The configurations a --smoke run measures: every instrumentation (Prometheus, OTel
#: sampling all, OTel sampling a ratio) once, next to the uninstrumented baseline.
SMOKE_CONFIGS = ("off", "prometheus+otel", "otel@10%")
WORKLOADS = ("noop", "write")
SAMPLED_RATIO = 0.1


def _ratio(config: str) -> float:
    return SAMPLED_RATIO if config.endswith("@10%") else 1.0


def _tracer_provider(config: str) -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(_ratio(config))))
    provider.add_span_processor(BatchSpanProcessor(InMemorySpanExporter()))
    return provider


async def _measure(n: int, config: str, workload: str, url: str) -> float:
    """Child: embedded backend, N events, one handler; returns events/s."""
    import redis.asyncio as aioredis

    from eventbus import BaseEvent, EventBus, MetricsCollector
    from eventbus.metrics import NoopMetricsCollector
    from eventbus.tracing import EventTracer, NoopTracer

    # Not bench._redis_bench_handlers: its @on_event handlers would join this bus.
    class Noop(BaseEvent):
        topic: str = "bench.embedded.noop"
        i: int

    class Order(BaseEvent):
        topic: str = "bench.embedded.write"
        i: int
        customer: str = "c-1042"
        items: list[str] = ["book", "pen", "lamp"]
        total_cents: int = 4599

    metrics: MetricsCollector = NoopMetricsCollector()
    tracer: EventTracer = NoopTracer()
    if "prometheus" in config:
        from prometheus_client import CollectorRegistry

        from eventbus.prometheus import PrometheusMetricsCollector

        metrics = PrometheusMetricsCollector(registry=CollectorRegistry())
    if "otel" in config:
        from eventbus.otel import OpenTelemetryTracer

        tracer = OpenTelemetryTracer(tracer_provider=_tracer_provider(config))

    # A bounded pool, as a service would configure it: 256 handlers at once would
    # otherwise open 256 connections (or fail with "Too many connections").
    client = aioredis.Redis(
        connection_pool=aioredis.BlockingConnectionPool.from_url(url, max_connections=16)
    )
    handled = 0

    async def noop(event: BaseEvent) -> None:
        nonlocal handled
        handled += 1

    async def write(event: Order) -> None:
        nonlocal handled
        await client.set(f"bench:order:{event.i}", event.model_dump_json())
        handled += 1

    event_type: type[Noop | Order] = Noop if workload == "noop" else Order
    bus = EventBus(metrics=metrics, tracer=tracer)
    await bus.registry.register(
        event_type.model_fields["topic"].default, noop if workload == "noop" else write
    )
    await bus.start()
    events = [event_type(i=i) for i in range(n)]
    started = time.perf_counter()
    for event in events:
        await bus.publish(event)
    await bus.drain(timeout=300)
    elapsed = time.perf_counter() - started
    await bus.stop()
    await client.aclose()
    assert handled == n, (handled, n)
    return n / elapsed


def _sync_rate(url: str, n: int, config: str, workload: str) -> float:
    from bench import redis_bench as rb

    rb.flush(url)
    args = ["--n", str(n), "--child", config, "--workload", workload, "--redis-url", url]
    out = subprocess.run(
        [sys.executable, __file__, *args, "--embedded"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(json.loads(out)["rate"])


def _redis_rate(url: str, n: int, config: str, workload: str) -> float:
    from bench import redis_bench as rb

    env: dict[str, str] = {}
    if "prometheus" in config:
        env["EVENTBUS_METRICS"] = "prometheus"
    if "otel" in config:
        env.update(
            BENCH_OTEL_SDK="1", BENCH_OTEL_RATIO=str(_ratio(config)), EVENTBUS_TRACING="otel"
        )
    rb.flush(url)
    worker = rb.start_worker("eventbus", url, 2, 8, extra_env=env)
    try:
        args = ["--n", str(n), "--child", config, "--workload", workload, "--redis-url", url]
        child = subprocess.run(
            [sys.executable, __file__, *args],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        )
        started = json.loads(child.stdout)["started"]
        with rb.pending_counter("eventbus", url) as pending:
            _, done, _ = rb.wait_drained(pending, n + 1)
    finally:
        worker.stop()
    return n / (done - started)


async def _redis_publish(n: int, config: str, workload: str, url: str) -> float:
    """Child: publish N events with the configured bus; returns the start time."""
    from bench import _redis_bench_handlers as handlers
    from eventbus import BaseEvent, EventBus, EventBusSettings
    from eventbus.redis.backend import RedisBackend

    if "otel" in config:
        from opentelemetry import trace

        trace.set_tracer_provider(_tracer_provider(config))
    settings = EventBusSettings(
        metrics="prometheus" if "prometheus" in config else "none",
        tracing="otel" if "otel" in config else "none",
    )
    bus = EventBus(backend=RedisBackend(url=url, namespace="bench"), settings=settings)
    await bus.start()
    event_type = handlers.Noop if workload == "noop" else handlers.Order
    events: list[BaseEvent] = [event_type(i=i) for i in range(n)]
    started = time.perf_counter()
    for event in events:
        await bus.publish(event)
    await bus.stop()
    return started


def _table(
    title: str,
    best: dict[tuple[str, str], float],
    workloads: list[str],
    configs: tuple[str, ...] = CONFIGS,
) -> None:
    print(title + "\n")
    header = " | ".join(f"{w}/s | vs off" for w in workloads)
    print(f"| configuration | {header} |")
    print("| --- |" + " ---: | ---: |" * len(workloads))
    for config in configs:
        cells = []
        for workload in workloads:
            rate, off = best[(config, workload)], best[("off", workload)]
            cells.append(f"{rate:,.0f} | {rate / off - 1:+.0%}")
        print(f"| {config} | {' | '.join(cells)} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backend", choices=("sync", "redis", "both"), default="both")
    parser.add_argument("--workload", choices=(*WORKLOADS, "both"), default="both")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--embedded", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="tiny run of every row in seconds")
    args = parser.parse_args()
    if args.smoke and not args.child:
        args.n, args.repeat = 100, 1
    sys.path.insert(0, str(ROOT))
    if args.child:
        if args.embedded:
            rate = asyncio.run(_measure(args.n, args.child, args.workload, args.redis_url))
            print(json.dumps({"rate": rate}))
        else:
            started = asyncio.run(_redis_publish(args.n, args.child, args.workload, args.redis_url))
            print(json.dumps({"started": started}))
        return

    from bench import redis_bench as rb

    configs = SMOKE_CONFIGS if args.smoke else CONFIGS
    workloads = list(WORKLOADS) if args.workload == "both" else [args.workload]
    runs = [("sync", _sync_rate), ("redis", _redis_rate)]
    with rb.redis_server() as url:
        for backend, rate_of in runs:
            if args.backend not in (backend, "both"):
                continue
            best: dict[tuple[str, str], float] = {}
            for _ in range(args.repeat):
                for workload in workloads:
                    for config in configs:
                        rate = rate_of(url, args.n, config, workload)
                        key = (config, workload)
                        best[key] = max(best.get(key, 0.0), rate)
            if backend == "sync":
                title = "Embedded backend, one async handler"
            else:
                title = "Redis backend, workers -p 2 -t 8, one handler"
            _table(f"{title}, N = {args.n:,}, best of {args.repeat}", best, workloads, configs)


if __name__ == "__main__":
    main()
