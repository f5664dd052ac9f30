"""Backends: ``sync`` (embedded, in-process); ``redis`` and ``kafka`` build on it."""

from __future__ import annotations

from .base import Backend
from .sync import SyncBackend

__all__ = ["Backend", "SyncBackend"]
