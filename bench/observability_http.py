"""Observability overhead seen from a FastAPI endpoint that publishes one event per request.

Usage (from the repo root): python bench/observability_http.py [--n 5000] [--repeat 3]

The question a team asks before turning tracing on: what does eventbus's tracing
add to an app that is already traced?  Each configuration runs in a fresh
subprocess: a FastAPI app (embedded backend, ``EventBusMiddleware``) whose
``POST /orders`` publishes one event to one no-op async handler; N requests are
driven through the ASGI interface in-process (no sockets, no HTTP client: what
is measured is the app's own work), then the bus drains.  Configurations:

* ``plain``: nothing instrumented.
* ``fastapi-otel``: ``FastAPIInstrumentor`` on (the HTTP server span), the bus untraced.
* ``fastapi-otel+bus-otel``: the same plus ``OpenTelemetryTracer`` (PRODUCER and
  CONSUMER spans in the request's trace).
* ``all``: the same plus ``PrometheusMetricsCollector``.

The OpenTelemetry SDK has a BatchSpanProcessor and an in-memory exporter.  Prints
requests/s and each configuration's change against ``fastapi-otel`` and ``plain``.
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
CONFIGS = ("plain", "fastapi-otel", "fastapi-otel+bus-otel", "all")
BODY = json.dumps({"item": "book", "quantity": 2}).encode()

sys.path.insert(0, str(ROOT))
from pydantic import BaseModel  # noqa: E402

from eventbus import BaseEvent  # noqa: E402


class OrderIn(BaseModel):
    item: str
    quantity: int


class OrderPlaced(BaseEvent):
    topic: str = "bench.http.order"
    item: str
    quantity: int


async def _measure(n: int, config: str) -> float:
    from fastapi import FastAPI

    from eventbus import (
        EventBus,
        EventBusMiddleware,
        MetricsCollector,
        NoopMetricsCollector,
        NoopTracer,
    )
    from eventbus.tracing import EventTracer

    provider: Any = None
    if config != "plain":
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(InMemorySpanExporter()))
    tracer: EventTracer = NoopTracer()
    metrics: MetricsCollector = NoopMetricsCollector()
    if config in ("fastapi-otel+bus-otel", "all"):
        from eventbus.otel import OpenTelemetryTracer

        tracer = OpenTelemetryTracer(tracer_provider=provider)
    if config == "all":
        from prometheus_client import CollectorRegistry

        from eventbus.prometheus import PrometheusMetricsCollector

        metrics = PrometheusMetricsCollector(registry=CollectorRegistry())

    bus = EventBus(metrics=metrics, tracer=tracer)
    handled = 0

    async def on_order(event: OrderPlaced) -> None:
        nonlocal handled
        handled += 1

    await bus.registry.register("bench.http.order", on_order)
    app = FastAPI()
    app.add_middleware(EventBusMiddleware)

    @app.post("/orders", status_code=202)
    async def place(order: OrderIn) -> dict[str, str]:
        event = OrderPlaced(item=order.item, quantity=order.quantity)
        await bus.publish(event)
        return {"event_id": event.event_id}

    if provider is not None:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/orders",
        "raw_path": b"/orders",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"bench"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await bus.start()
    for _ in range(200):  # warm-up: routes, validators, caches
        await app(dict(scope), receive, send)
    await bus.drain(timeout=60)
    statuses.clear()
    started = time.perf_counter()
    for _ in range(n):
        await app(dict(scope), receive, send)
    await bus.drain(timeout=300)
    elapsed = time.perf_counter() - started
    await bus.stop()
    assert statuses == [202] * n, set(statuses)
    assert handled == n + 200, (handled, n)
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=5_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="tiny run of every row in seconds")
    args = parser.parse_args()
    if args.smoke and not args.child:
        args.n, args.repeat = 100, 1
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
    print(
        f"FastAPI POST /orders publishing one event (embedded backend, one no-op handler), "
        f"N = {args.n:,}, best of {args.repeat}\n"
    )
    print("| configuration | requests/s | vs fastapi-otel | vs plain |")
    print("| --- | ---: | ---: | ---: |")
    for config in CONFIGS:
        rate = best[config]
        print(
            f"| {config} | {rate:,.0f} | {rate / best['fastapi-otel'] - 1:+.0%} "
            f"| {rate / best['plain'] - 1:+.0%} |"
        )


if __name__ == "__main__":
    main()
