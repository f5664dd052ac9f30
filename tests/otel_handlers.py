"""Handlers for the cross-process observability tests (tests/test_observability_redis.py).

Run by ``dramatiq eventbus.actors tests.otel_handlers`` with ``EVENTBUS_TRACING=otel``.
When ``OBS_SPANS_FILE`` is set (only in the worker) this module installs a global
TracerProvider that appends every finished span to that file as a JSON line, so
the test can join the worker's spans with its own.  Handlers record what they
saw in Redis under ``<namespace>:test:*``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

from eventbus import BaseEvent, EventBus, get_correlation_id, get_current_event, on_event
from eventbus.context import CorrelationIdFilter
from tests.redis_keys import client, key

ORDER = "obs.order"
FOLLOW_UP = "obs.followup"


class OrderPlaced(BaseEvent):
    topic: str = ORDER
    #: "ok", "once" (the mailer fails its first attempt) or "always" (it never succeeds).
    mode: str = "ok"


class OrderAudited(BaseEvent):
    topic: str = FOLLOW_UP


class _RedisLogHandler(logging.Handler):
    """Pushes the correlation id of every record to a Redis list."""

    def emit(self, record: logging.LogRecord) -> None:
        client().rpush(key("log-cids"), getattr(record, "correlation_id", "<missing>"))


log = logging.getLogger("tests.otel_handlers")


def _install_worker_observability() -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    path = os.environ["OBS_SPANS_FILE"]

    class FileExporter(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            with open(path, "a") as out:
                for span in spans:
                    out.write(
                        json.dumps(
                            {
                                "name": span.name,
                                "kind": span.kind.name,
                                "trace_id": f"{span.context.trace_id:032x}",
                                "span_id": f"{span.context.span_id:016x}",
                                "parent": f"{span.parent.span_id:016x}" if span.parent else None,
                                "status": span.status.status_code.name,
                                "attributes": dict(span.attributes or {}),
                                "events": [e.name for e in span.events],
                            }
                        )
                        + "\n"
                    )
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(FileExporter()))
    trace.set_tracer_provider(provider)

    handler = _RedisLogHandler()
    handler.addFilter(CorrelationIdFilter())
    log.addHandler(handler)
    log.setLevel(logging.INFO)


if os.environ.get("OBS_SPANS_FILE"):
    _install_worker_observability()


def _worker_bus() -> EventBus:
    from eventbus.actors import bus

    return bus


@on_event(OrderPlaced, name="obs.order:audit")
async def audit(event: OrderPlaced) -> None:
    log.info("auditing %s", event.event_id)
    client().rpush(key("audited"), event.event_id)
    await _worker_bus().publish(OrderAudited())


@on_event(OrderPlaced, name="obs.order:mailer", max_retries=1)
def mailer(event: OrderPlaced) -> None:
    attempts = client().incr(key(f"mailer-attempts:{event.event_id}"))
    if event.mode == "always" or (event.mode == "once" and attempts == 1):
        raise ConnectionError("smtp down")
    client().rpush(key("mailed"), event.event_id)


@on_event(OrderAudited, name="obs.followup:record")
def record_follow_up(event: OrderAudited) -> None:
    current = get_current_event()
    client().rpush(
        key("follow-ups"),
        json.dumps(
            {
                "correlation_id": event.metadata.get("correlation_id"),
                "causation_id": event.metadata.get("causation_id"),
                "context_cid": get_correlation_id(),
                "current": current.event_id if current else None,
            }
        ),
    )
