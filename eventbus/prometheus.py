"""Prometheus metrics: a collector on prometheus-client, a ``/metrics`` route, a worker exporter.

Example::

    from eventbus.prometheus import PrometheusMetricsCollector, metrics_router

    bus = EventBus(metrics=PrometheusMetricsCollector())
    app.include_router(metrics_router())

Worker processes (``dramatiq eventbus.actors --processes N``) each count their own
handler attempts.  Set ``PROMETHEUS_MULTIPROC_DIR`` (an empty directory, the same
for every process) and ``EVENTBUS_METRICS_PORT``: one worker process serves the
sum of all of them on that port, and another takes over if it dies.

Dramatiq's own Prometheus middleware is not used: it double-counts retries, leaks
a gauge and records nothing when prometheus_client was imported first.
"""

from __future__ import annotations

from eventbus.extras import requires_extra

with requires_extra("prometheus", __name__):
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        REGISTRY,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        generate_latest,
        start_http_server,
    )
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector

import logging
import os
import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

from fastapi import APIRouter
from starlette.responses import Response

if TYPE_CHECKING:
    from eventbus.bus import EventBus

logger = logging.getLogger(__name__)

#: Histogram buckets, in seconds: publishing and handling are sub-millisecond to minutes.
DEFAULT_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
)  # fmt: skip
#: Seconds between attempts of a worker process to take over the metrics port.
EXPORTER_RETRY_INTERVAL = 5.0
#: The environment variable prometheus-client reads for multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class _Metrics:
    """The metric objects of one registry (created once per registry)."""

    def __init__(self, registry: CollectorRegistry, buckets: tuple[float, ...]) -> None:
        def counter(name: str, text: str, labels: list[str]) -> Counter:
            return Counter(name, text, labels, registry=registry)

        self.published = counter("eventbus_published_total", "Events published", ["topic"])
        self.unrouted = counter(
            "eventbus_unrouted_total", "Events published to a topic without handlers", ["topic"]
        )
        self.schema_mismatch = counter(
            "eventbus_schema_mismatch_total",
            "Events published that a live subscriber's stored schema would reject",
            ["topic", "subscriber"],
        )
        self.dispatched = counter(
            "eventbus_dispatched_total", "Handler attempts that succeeded", ["topic", "handler"]
        )
        self.errors = counter(
            "eventbus_errors_total", "Handler attempts that failed", ["topic", "handler"]
        )
        self.retries = counter("eventbus_retries_total", "Retries scheduled", ["topic"])
        self.dlq = counter("eventbus_dlq_total", "Events dead-lettered", ["topic"])
        self.publish_seconds = Histogram(
            "eventbus_publish_seconds",
            "Seconds to hand an event to the backend",
            ["topic"],
            buckets=buckets,
            registry=registry,
        )
        self.dispatch_seconds = Histogram(
            "eventbus_dispatch_seconds",
            "Seconds a handler attempt took",
            ["topic", "handler"],
            buckets=buckets,
            registry=registry,
        )
        self.in_progress = Gauge(
            "eventbus_in_progress",
            "Handler attempts running now",
            ["topic", "handler"],
            registry=registry,
            multiprocess_mode="livesum",
        )


_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _Metrics] = weakref.WeakKeyDictionary()
_by_registry_lock = threading.Lock()


class _BusCollector(Collector):
    """Scrape-time gauges read from a bus: backlog per queue and dead letters stored."""

    def __init__(self) -> None:
        self.bus: weakref.ref[EventBus] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        bus = self.bus() if self.bus is not None else None
        if bus is None:
            return
        backlog = GaugeMetricFamily(
            "eventbus_backlog", "Messages waiting to be handled", labels=["queue"]
        )
        try:
            for queue, depth in bus.backend.backlog().items():
                backlog.add_metric([queue], depth)
        except Exception as exc:  # a scrape must not fail because the broker is down
            logger.warning("Could not read the backlog for metrics: %s", exc)
        yield backlog
        size = GaugeMetricFamily("eventbus_dlq_size", "Dead letters in the store")
        try:
            size.add_metric([], bus.dlq.size())
        except Exception as exc:
            logger.warning("Could not read the dead-letter store size for metrics: %s", exc)
        yield size


class PrometheusMetricsCollector:
    """A :class:`~eventbus.metrics.MetricsCollector` on prometheus-client.

    Metrics (the seed's names): ``eventbus_published_total{topic}``,
    ``eventbus_dispatched_total{topic,handler}``, ``eventbus_errors_total{topic,handler}``
    (one per failed attempt), ``eventbus_retries_total{topic}`` (one per scheduled
    retry), ``eventbus_dlq_total{topic}``, ``eventbus_unrouted_total{topic}``,
    ``eventbus_schema_mismatch_total{topic,subscriber}`` (``EVENTBUS_SCHEMA_CHECK=warn``),
    ``eventbus_publish_seconds{topic}``, ``eventbus_dispatch_seconds{topic,handler}``,
    ``eventbus_in_progress{topic,handler}``; and, read at scrape time from the bus,
    ``eventbus_backlog{queue}`` and ``eventbus_dlq_size``.

    Parameters:
      registry: Where to register (default: prometheus-client's global registry).
        Collectors on the same registry share their metric objects.
      buckets: Histogram buckets in seconds.
    """

    #: Its dispatch methods take the handler's name (see LabelsHandlers).
    labels_handlers: ClassVar[bool] = True

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        buckets: tuple[float, ...] = DEFAULT_BUCKETS,
    ) -> None:
        self.registry = registry if registry is not None else REGISTRY
        with _by_registry_lock:
            metrics = _by_registry.get(self.registry)
            if metrics is None:
                metrics = _by_registry[self.registry] = _Metrics(self.registry, buckets)
        self._m = metrics
        self._children: dict[tuple[int | str, ...], Any] = {}
        self._bus_collector: _BusCollector | None = None

    def attach(self, bus: EventBus) -> None:
        """Read backlog and dead-letter gauges from ``bus`` (the bus calls this).

        Skipped in multiprocess mode, where scrape-time collectors of one process
        would be summed with nothing.
        """
        if os.environ.get(MULTIPROC_ENV):
            return
        if self._bus_collector is None:
            self._bus_collector = _BusCollector()
            try:
                self.registry.register(self._bus_collector)
            except ValueError:  # another collector of this registry already reports them
                self._bus_collector = None
                return
        self._bus_collector.bus = weakref.ref(bus)

    def _child(self, metric: Any, *labels: str) -> Any:
        # labels() costs ~1.5 us (lock, validation); the children never change.
        key: tuple[int | str, ...] = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def inc_published(self, topic: str) -> None:
        self._child(self._m.published, topic).inc()

    def inc_unrouted(self, topic: str) -> None:
        self._child(self._m.unrouted, topic).inc()

    def inc_schema_mismatch(self, topic: str, subscriber: str) -> None:
        self._child(self._m.schema_mismatch, topic, subscriber).inc()

    def inc_dispatched(self, topic: str, handler: str = "") -> None:
        self._child(self._m.dispatched, topic, handler).inc()

    def inc_dispatch_error(self, topic: str, handler: str = "") -> None:
        self._child(self._m.errors, topic, handler).inc()

    def inc_retry(self, topic: str, attempt: int) -> None:
        self._child(self._m.retries, topic).inc()

    def inc_dlq(self, topic: str) -> None:
        self._child(self._m.dlq, topic).inc()

    def observe_publish_duration(self, topic: str, duration: float) -> None:
        self._child(self._m.publish_seconds, topic).observe(duration)

    def observe_dispatch_duration(self, topic: str, duration: float, handler: str = "") -> None:
        self._child(self._m.dispatch_seconds, topic, handler).observe(duration)

    def dispatch_started(self, topic: str, handler: str) -> None:
        self._child(self._m.in_progress, topic, handler).inc()

    def dispatch_finished(self, topic: str, handler: str) -> None:
        self._child(self._m.in_progress, topic, handler).dec()


def exposition_registry(registry: CollectorRegistry | None = None) -> CollectorRegistry:
    """The registry to expose: ``registry``, else the multiprocess view when
    ``PROMETHEUS_MULTIPROC_DIR`` is set, else the global registry."""
    if registry is not None:
        return registry
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return merged
    return REGISTRY


def metrics_router(
    registry: CollectorRegistry | None = None, *, path: str = "/metrics", **kwargs: Any
) -> APIRouter:
    """A router serving the Prometheus text format at ``path``.

    Parameters:
      registry: The registry to expose (see :func:`exposition_registry`).
      kwargs: Passed to ``APIRouter`` (``dependencies=[...]`` to protect it).
    """
    router = APIRouter(**kwargs)

    @router.get(path, include_in_schema=False)
    def metrics() -> Response:
        return Response(
            generate_latest(exposition_registry(registry)), media_type=CONTENT_TYPE_LATEST
        )

    return router


def serve_worker_metrics(port: int, addr: str = "127.0.0.1") -> threading.Thread:
    """Serve metrics of this worker process (of all of them in multiprocess mode) on ``port``.

    Every worker process calls this; in multiprocess mode the first to bind the
    port serves the merged view and the others keep trying every
    :data:`EXPORTER_RETRY_INTERVAL` seconds, so one takes over if it dies.
    Returns the (daemon) thread that keeps trying.
    """
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                start_http_server(port, addr=addr, registry=exposition_registry())
            except OSError as exc:
                if not os.environ.get(MULTIPROC_ENV):
                    logger.warning(
                        "Port %d is taken (%s); with several worker processes set %s so "
                        "one of them serves the sum of all.",
                        port,
                        exc,
                        MULTIPROC_ENV,
                    )
                stop.wait(EXPORTER_RETRY_INTERVAL)
                continue
            logger.info(
                "Serving eventbus worker metrics on %s:%d (pid %d)", addr, port, os.getpid()
            )
            return

    thread = threading.Thread(target=serve, name="eventbus-metrics-exporter", daemon=True)
    thread.start()
    return thread


def mark_process_dead(pid: int | None = None) -> None:
    """Tell multiprocess mode that a worker process is gone (drops its live gauges)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid if pid is not None else os.getpid())  # type: ignore[no-untyped-call]
