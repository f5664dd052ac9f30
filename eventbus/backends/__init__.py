"""The backend contract (:class:`Backend`) and the embedded backend.

``EVENTBUS_BACKEND`` names one of :data:`BACKENDS`; :func:`create_backend` builds
it.  ``eventbus dev NAME`` runs one of :data:`DEV_SERVERS`.  Each backend lives
in its own package and needs its extra: both tables name them by import path,
imported on use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from eventbus.backends.base import Backend, DevServer, StoresSubscriptions
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

#: ``eventbus dev NAME`` -> ``"module:attribute"`` of its :class:`DevServer`
#: (imported on use).
DEV_SERVERS: dict[str, str] = {
    "kafka": "eventbus.kafka.dev:SERVER",
}


def _load(target: str) -> Any:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def create_backend(settings: EventBusSettings) -> Backend:
    """The backend ``settings.backend`` names, configured from ``settings``."""
    target = BACKENDS.get(settings.backend)
    if target is None:
        raise ConfigurationError(
            f"EVENTBUS_BACKEND={settings.backend!r} is not available in this version "
            f"(choose one of {', '.join(sorted(BACKENDS))})"
        )
    backend_class: type[Backend] = _load(target)
    return backend_class.from_settings(settings)


def dev_server(name: str) -> DevServer:
    """The local server ``eventbus dev NAME`` runs.

    Raises:
      ConfigurationError: No server of that name (:data:`DEV_SERVERS`).
      MissingExtraError: Its package needs an extra that is not installed.
    """
    target = DEV_SERVERS.get(name)
    if target is None:
        raise ConfigurationError(
            f"no local server {name!r} (choose one of {', '.join(sorted(DEV_SERVERS))})"
        )
    server: DevServer = _load(target)
    return server


__all__ = [
    "BACKENDS",
    "DEV_SERVERS",
    "Backend",
    "DevServer",
    "StoresSubscriptions",
    "SyncBackend",
    "create_backend",
    "dev_server",
]
