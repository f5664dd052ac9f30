"""Observability across processes: a web app publishing on Redis, handlers in real
``dramatiq eventbus.actors`` workers.  One trace from the HTTP request to every
handler, exact Prometheus counts summed over worker processes, correlation ids in
the worker's log records and follow-up events."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from eventbus import EventBus, EventBusMiddleware, EventBusSettings, create_lifespan
from eventbus.otel import OpenTelemetryTracer
from eventbus.prometheus import PrometheusMetricsCollector, metrics_router
from eventbus.redis.backend import RedisBackend
from tests import otel_handlers as h

pytest.register_assert_rewrite("tests.redis_support")
from tests.redis_support import (  # noqa: E402
    TEST_REDELIVERY_TIMEOUT,
    Workers,
    free_port,
    wait_until,
)

pytest_plugins = ["tests.redis_support"]
pytestmark = pytest.mark.timeout(120)


def web_app(bus: EventBus) -> FastAPI:
    app = FastAPI(lifespan=create_lifespan(bus))
    app.add_middleware(EventBusMiddleware)

    @app.post("/orders/{mode}")
    async def place(mode: str) -> dict[str, str]:
        event = h.OrderPlaced(mode=mode)
        await bus.publish(event)
        return {"event_id": event.event_id}

    return app


def test_one_trace_from_the_http_request_to_each_handler_in_the_worker(
    redis_url: str,
    namespace: str,
    workers: Workers,
    tmp_path: Path,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, memory = spans
    spans_file = tmp_path / "worker-spans.jsonl"
    workers.start(
        ("tests.otel_handlers",),
        threads=2,
        env={"EVENTBUS_TRACING": "otel", "OBS_SPANS_FILE": str(spans_file)},
    )
    bus = EventBus(
        backend=RedisBackend(
            url=redis_url, namespace=namespace, redelivery_timeout=TEST_REDELIVERY_TIMEOUT
        ),
        tracer=OpenTelemetryTracer(tracer_provider=provider),
        settings=EventBusSettings(shutdown_timeout=2),
    )
    app = web_app(bus)
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
    r = redis.Redis.from_url(redis_url)

    with TestClient(app) as client:
        response = client.post("/orders/ok", headers={"X-Correlation-ID": "order-req-1"})
    event_id = response.json()["event_id"]
    wait_until(lambda: r.llen(h.key("follow-ups", namespace)) == 1, 20, "the follow-up event")

    worker_spans = [json.loads(line) for line in spans_file.read_text().splitlines()]
    web_spans = memory.get_finished_spans()
    server = next(s for s in web_spans if s.kind.name == "SERVER")
    [producer] = [s for s in web_spans if s.kind.name == "PRODUCER"]
    trace_id = f"{server.context.trace_id:032x}"
    producer_id = f"{producer.context.span_id:016x}"
    assert producer.parent is not None and producer.parent.span_id == server.context.span_id

    consumers = [s for s in worker_spans if s["kind"] == "CONSUMER" and s["parent"] == producer_id]
    assert sorted(s["attributes"]["eventbus.handler"] for s in consumers) == [
        "obs.order:audit",
        "obs.order:mailer",
    ]
    assert {s["trace_id"] for s in worker_spans} == {trace_id}  # incl. the follow-up's spans
    assert all(s["attributes"]["messaging.message.id"] == event_id for s in consumers)
    assert all(s["attributes"]["eventbus.correlation_id"] == "order-req-1" for s in consumers)

    # the follow-up published inside the audit handler keeps the request's correlation id
    [follow_up] = [json.loads(x) for x in r.lrange(h.key("follow-ups", namespace), 0, -1)]
    assert follow_up["correlation_id"] == "order-req-1"
    assert follow_up["context_cid"] == "order-req-1"
    assert follow_up["causation_id"] == event_id
    # and log records inside the handler carry it
    assert r.lrange(h.key("log-cids", namespace), 0, -1) == [b"order-req-1"]


def test_metrics_from_two_worker_processes_add_up_exactly(
    redis_url: str, namespace: str, workers: Workers, tmp_path: Path
) -> None:
    multiproc = tmp_path / "prom"
    multiproc.mkdir()
    port = free_port()
    workers.start(
        ("tests.otel_handlers",),
        processes=2,
        threads=2,
        env={
            "EVENTBUS_METRICS": "prometheus",
            "EVENTBUS_METRICS_PORT": str(port),
            "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
        },
    )
    registry = CollectorRegistry()
    bus = EventBus(
        backend=RedisBackend(
            url=redis_url, namespace=namespace, redelivery_timeout=TEST_REDELIVERY_TIMEOUT
        ),
        metrics=PrometheusMetricsCollector(registry=registry),
        settings=EventBusSettings(shutdown_timeout=2),
    )
    app = web_app(bus)
    app.include_router(metrics_router(registry))
    r = redis.Redis.from_url(redis_url)

    with TestClient(app) as client:
        for mode in ["ok"] * 8 + ["once", "always"]:
            client.post(f"/orders/{mode}")
        wait_until(lambda: r.llen(h.key("follow-ups", namespace)) == 10, 30, "10 follow-ups")
        wait_until(lambda: r.llen(h.key("mailed", namespace)) == 9, 30, "9 mails")
        wait_until(lambda: bus.dlq.size() == 1, 30, "one dead letter")
        web = samples(client.get("/metrics").text)

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return samples(resp.read().decode())

    def value(data: dict[Any, float], name: str, **labels: str) -> float:
        return data.get((name, tuple(sorted(labels.items()))), 0.0)

    # the dead letter is counted once its record is written; give the counter a moment
    deadline = time.monotonic() + 10
    while True:
        worker = scrape()
        if value(worker, "eventbus_dlq_total", topic=h.ORDER) == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)

    assert value(web, "eventbus_published_total", topic=h.ORDER) == 10
    assert value(worker, "eventbus_published_total", topic=h.FOLLOW_UP) == 10
    assert (
        value(worker, "eventbus_dispatched_total", topic=h.ORDER, handler="obs.order:audit") == 10
    )
    assert (
        value(worker, "eventbus_dispatched_total", topic=h.ORDER, handler="obs.order:mailer") == 9
    )
    assert value(worker, "eventbus_errors_total", topic=h.ORDER, handler="obs.order:mailer") == 3
    assert value(worker, "eventbus_retries_total", topic=h.ORDER) == 2
    assert value(worker, "eventbus_dlq_total", topic=h.ORDER) == 1
    assert (
        value(worker, "eventbus_dispatched_total", topic=h.FOLLOW_UP, handler="obs.followup:record")
        == 10
    )
    assert (
        value(worker, "eventbus_dispatch_seconds_count", topic=h.ORDER, handler="obs.order:mailer")
        == 12
    )
    pids = {p.name for p in multiproc.iterdir()}
    assert len({name.rsplit("_", 1)[-1] for name in pids}) >= 2  # both processes wrote metrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    result: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (
                sample.name,
                tuple(sorted((k, v) for k, v in sample.labels.items() if k != "pid")),
            )
            result[key] = result.get(key, 0.0) + sample.value
    return result
