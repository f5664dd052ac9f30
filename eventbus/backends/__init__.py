"""The backend contract (:class:`Backend`) and the embedded backend.

``EVENTBUS_BACKEND`` names one of :data:`BACKENDS`; :func:`create_backend` builds
it.  Each backend lives in its own package and needs its extra.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..exceptions import ConfigurationError
from .base import Backend
from .sync import SyncBackend

if TYPE_CHECKING:
    from ..config import EventBusSettings

#: ``EVENTBUS_BACKEND`` value -> ``"module:Class"`` of the backend (imported on use).
BACKENDS: dict[str, str] = {
    "sync": "eventbus.backends.sync:SyncBackend",
    "redis": "eventbus.backends.redis:RedisBackend",
    "kafka": "eventbus.backends.kafka:KafkaBackend",
}


def create_backend(settings: EventBusSettings) -> Backend:
    """The backend ``settings.backend`` names, configured from ``settings``."""
    target = BACKENDS.get(settings.backend)
    if target is None:
        raise ConfigurationError(
            f"EVENTBUS_BACKEND={settings.backend!r} is not available in this version "
            f"(choose one of {', '.join(sorted(BACKENDS))})"
        )
    module, name = target.split(":")
    backend_class: type[Backend] = getattr(importlib.import_module(module), name)
    return backend_class.from_settings(settings)


__all__ = ["BACKENDS", "Backend", "SyncBackend", "create_backend"]
