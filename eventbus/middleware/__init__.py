"""Dramatiq middlewares: one concern each, one file each."""

from __future__ import annotations

from eventbus.middleware.dead_letters import DeadLetters
from eventbus.middleware.metrics import Metrics
from eventbus.middleware.retries import Retries, RetryPolicy
from eventbus.middleware.tracing import Tracing

__all__ = ["DeadLetters", "Metrics", "Retries", "RetryPolicy", "Tracing"]
