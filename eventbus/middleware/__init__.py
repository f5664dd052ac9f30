"""Dramatiq middlewares: one concern each, one file each."""

from __future__ import annotations

from .dead_letters import DeadLetters
from .metrics import Metrics
from .retries import Retries, RetryPolicy
from .tracing import Tracing

__all__ = ["DeadLetters", "Metrics", "Retries", "RetryPolicy", "Tracing"]
