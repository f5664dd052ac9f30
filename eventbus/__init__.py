"""fastapi-eventbus: durable event-driven pub/sub for FastAPI, built on Dramatiq."""

from __future__ import annotations

from .asgi import EventBusMiddleware, get_correlation_id
from .bus import EventBus
from .config import EventBusSettings
from .context import get_current_event
from .dlq import DeadLetterQueue, DeadLetterStore, FailedEvent, MemoryDeadLetterStore, ReplayResult
from .events import BaseEvent, UnknownEvent, decode_event, encode_event
from .exceptions import (
    BackendError,
    ConfigurationError,
    EventBusError,
    EventDecodeError,
    EventTooLargeError,
    HandlerError,
    HandlerTimeout,
    PublishError,
    RetryExhaustedError,
    ShutdownError,
    SubscribeError,
)
from .fastapi import create_lifespan, dlq_router, eventbus_lifespan, get_event_bus
from .health import HealthResult, HealthStatus
from .metrics import InMemoryMetricsCollector, MetricsCollector, NoopMetricsCollector
from .middleware.retries import Retry, RetryPolicy
from .registry import HandlerRegistry, HandlerSpec, on_event
from .tracing import EventSpan, EventTracer, LoggingTracer, NoopTracer, SpanStatus, get_current_span

__all__ = [
    "BackendError",
    "BaseEvent",
    "ConfigurationError",
    "DeadLetterQueue",
    "DeadLetterStore",
    "EventBus",
    "EventBusError",
    "EventBusMiddleware",
    "EventBusSettings",
    "EventDecodeError",
    "EventSpan",
    "EventTooLargeError",
    "EventTracer",
    "FailedEvent",
    "HandlerError",
    "HandlerRegistry",
    "HandlerSpec",
    "HandlerTimeout",
    "HealthResult",
    "HealthStatus",
    "InMemoryMetricsCollector",
    "LoggingTracer",
    "MemoryDeadLetterStore",
    "MetricsCollector",
    "NoopMetricsCollector",
    "NoopTracer",
    "PublishError",
    "ReplayResult",
    "Retry",
    "RetryExhaustedError",
    "RetryPolicy",
    "ShutdownError",
    "SpanStatus",
    "SubscribeError",
    "UnknownEvent",
    "create_lifespan",
    "decode_event",
    "dlq_router",
    "encode_event",
    "eventbus_lifespan",
    "get_correlation_id",
    "get_current_event",
    "get_current_span",
    "get_event_bus",
    "on_event",
]

__version__ = "0.2.0.dev0"
