"""The backend contract (:class:`Backend`) and the embedded backend.

``EVENTBUS_BACKEND`` names one of :data:`BACKENDS`; :func:`create_backend` builds
it.  Each backend lives in its own package and needs its extra.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from eventbus.backends.base import Backend
from eventbus.backends.embedded import SyncBackend
from eventbus.exceptions import ConfigurationError

if TYPE_CHECKING:
    from eventbus.config import EventBusSettings

#: ``EVENTBUS_BACKEND`` value -> ``"module:Class"`` of the backend (imported on use).
BACKENDS: dict[str, str] = {
    "sync": "eventbus.backends.embedded:SyncBackend",
    "redis": "eventbus.redis.backend:RedisBackend",
    "kafka": "eventbus.kafka.backend:KafkaBackend",
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
