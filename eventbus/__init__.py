"""fastapi-eventbus: durable event-driven pub/sub for FastAPI, built on Dramatiq.

The top level holds what an application uses every day; backends and
integrations live in their modules::

    from eventbus import BaseEvent, EventBus, create_lifespan, get_event_bus, on_event
    from eventbus.redis import RedisBackend      # pip install "fastapi-eventbus[redis]"
    from eventbus.kafka import KafkaBackend      # pip install "fastapi-eventbus[kafka]"
    from eventbus.prometheus import PrometheusMetricsCollector, metrics_router
    from eventbus.otel import OpenTelemetryTracer
    from eventbus.testing import EventBusTestKit

Names that moved keep working from here with a DeprecationWarning naming their
new home.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from eventbus.asgi import EventBusMiddleware
from eventbus.bus import EventBus
from eventbus.config import EventBusSettings
from eventbus.context import CorrelationIdFilter, get_correlation_id, get_current_event
from eventbus.dlq.records import FailedEvent
from eventbus.events import BaseEvent
from eventbus.exceptions import (
    ConfigurationError,
    EventBusError,
    EventDecodeError,
    EventTooLargeError,
    HandlerTimeout,
    PublishError,
    UnroutedError,
)
from eventbus.fastapi import create_lifespan, dlq_router, get_event_bus, health_router
from eventbus.health import HealthResult, HealthStatus
from eventbus.metrics import MetricsCollector
from eventbus.middleware.retries import Retry, RetryPolicy
from eventbus.registry import on_event
from eventbus.tracing import EventTracer

__all__ = [
    "BaseEvent",
    "ConfigurationError",
    "CorrelationIdFilter",
    "EventBus",
    "EventBusError",
    "EventBusMiddleware",
    "EventBusSettings",
    "EventDecodeError",
    "EventTooLargeError",
    "EventTracer",
    "FailedEvent",
    "HandlerTimeout",
    "HealthResult",
    "HealthStatus",
    "MetricsCollector",
    "PublishError",
    "Retry",
    "RetryPolicy",
    "UnroutedError",
    "create_lifespan",
    "dlq_router",
    "get_correlation_id",
    "get_current_event",
    "get_event_bus",
    "health_router",
    "on_event",
]

__version__ = "0.2.0.dev0"

#: Names that left the top level: name -> (module, note).  Reading one still works,
#: with a DeprecationWarning.
_MOVED: dict[str, tuple[str, str]] = {
    "UnknownEvent": ("eventbus.events", ""),
    "decode_event": ("eventbus.events", ""),
    "encode_event": ("eventbus.events", ""),
    "DeadLetterQueue": ("eventbus.dlq", ""),
    "DeadLetterStore": ("eventbus.dlq", ""),
    "MemoryDeadLetterStore": ("eventbus.dlq", ""),
    "ReplayResult": ("eventbus.dlq", ""),
    "BackendError": ("eventbus.exceptions", ""),
    "ShutdownError": ("eventbus.exceptions", ""),
    "HandlerError": ("eventbus.exceptions", "; it is never raised"),
    "RetryExhaustedError": ("eventbus.exceptions", "; it is never raised"),
    "SubscribeError": ("eventbus.exceptions", "; it is never raised"),
    "eventbus_lifespan": ("eventbus.fastapi", "; use create_lifespan(bus)"),
    "InMemoryMetricsCollector": ("eventbus.metrics", ""),
    "NoopMetricsCollector": ("eventbus.metrics", ""),
    "HandlerRegistry": ("eventbus.registry", "; use bus.registry"),
    "HandlerSpec": ("eventbus.registry", ""),
    "EventSpan": ("eventbus.tracing", ""),
    "SpanStatus": ("eventbus.tracing", ""),
    "LoggingTracer": ("eventbus.tracing", ""),
    "NoopTracer": ("eventbus.tracing", ""),
    "get_current_span": ("eventbus.tracing", ""),
}
if TYPE_CHECKING:  # typed for mypy; imported on first use (they need their extra)
    from eventbus.kafka import KafkaBackend as KafkaBackend
    from eventbus.redis import RedisBackend as RedisBackend

#: Backends, importable from the top level without a warning (they need their extra).
_BACKENDS = {
    "RedisBackend": "eventbus.redis",
    "KafkaBackend": "eventbus.kafka",
}


def _lazy(name: str) -> Any:
    """A backend (imported on first use) or a moved name (with a DeprecationWarning)."""
    if name in _BACKENDS:
        return getattr(importlib.import_module(_BACKENDS[name]), name)
    moved = _MOVED.get(name)
    if moved is None:
        raise AttributeError(f"module 'eventbus' has no attribute {name!r}")
    module, note = moved
    warnings.warn(
        f"eventbus.{name} moved: import it from {module}{note}",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(module), name)


if not TYPE_CHECKING:
    # Hidden from type checkers: a module ``__getattr__`` would make mypy accept any
    # name (``from eventbus import EvnetBus``); the moved names are deprecated there.
    __getattr__ = _lazy
