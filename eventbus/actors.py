"""Worker entry point: ``dramatiq eventbus.actors [handler modules...]``.

Run it next to your web process, with the same ``EVENTBUS_*`` settings::

    EVENTBUS_BACKEND=redis EVENTBUS_REDIS_URL=redis://localhost:6379/0 \\
        dramatiq eventbus.actors myapp.handlers --processes 2 --threads 8

Importing this module builds the worker's :data:`bus` from the environment
(:class:`~eventbus.config.EventBusSettings`) and makes its broker dramatiq's
global broker, so dramatiq's ``--processes``, ``--threads``, ``--queues`` and
``--watch`` work as usual.  Every ``@on_event`` handler found in the modules
named on the command line or in ``EVENTBUS_HANDLERS`` (comma-separated) becomes
one actor, and the worker consumes every handler's queue.

**Why actors are declared in a ``before_worker_boot`` hook.**  The dramatiq CLI
imports this module first (to find the broker) and the handler modules given on
the command line only *after* it, so no handler exists yet at import time.
Importing the command-line modules from here instead would mean re-parsing
dramatiq's arguments, which breaks with its options (``-p 2 -t 8 mod``) and any
future ones.  Instead, a middleware declares the actors when the Worker boots:
the CLI emits ``before_worker_boot`` after importing every module and before
the Worker creates its consumers, which it does for every queue declared at
that point.  An embedded ``dramatiq.Worker(broker).start()`` triggers the same
hook, so tests and custom runners get the same behaviour.

Nothing here creates a dramatiq default broker: the bus's broker is set as the
global one before any handler module is imported.

``EVENTBUS_WORKER_GC_FREEZE=true`` makes the boot hook call ``gc.collect()`` then
``gc.freeze()`` once the handlers are imported: the long-lived objects leave the
cyclic collector's sight, whose full passes otherwise stall every handler thread
for tens of milliseconds every few thousand messages.  Off by default: a library
does not change the interpreter's collector behind the application's back.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable

import dramatiq
from dramatiq import Middleware
from dramatiq.middleware import MiddlewareError
from pydantic import ValidationError

from eventbus.backends.base import WORKER_STOP_MARGIN
from eventbus.bus import EventBus
from eventbus.config import EventBusSettings
from eventbus.exceptions import ConfigurationError

logger = logging.getLogger(__name__)

#: Seconds the backend gets beyond ``shutdown_timeout`` to settle (commit offsets,
#: acknowledge) and leave.
BRIDGE_STOP_MARGIN = WORKER_STOP_MARGIN


def handler_modules(value: str) -> list[str]:
    """The module names in a comma-separated ``EVENTBUS_HANDLERS`` value."""
    return [name.strip() for name in value.split(",") if name.strip()]


class WorkerBootError(MiddlewareError):
    """A ``dramatiq eventbus.actors`` process could not start handling events."""


class DeclareHandlers(Middleware):
    """Imports the ``EVENTBUS_HANDLERS`` modules and starts the bus (declaring one
    actor per handler) just before a dramatiq Worker boots.

    Parameters:
      bus: The worker's bus.
      modules: Modules to import first.
    """

    def __init__(self, bus: EventBus, modules: list[str]) -> None:
        self.bus = bus
        self.modules = modules
        self._stop_backend: Callable[[float], None] | None = None

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        # dramatiq logs what a hook raises and boots the Worker anyway: a worker
        # whose handlers failed to import would then report "ready for action" and
        # handle nothing.  A MiddlewareError propagates: the process exits non-zero.
        try:
            self._boot(worker)
        except Exception as exc:
            logger.critical("This worker cannot start: %s", exc, exc_info=True)
            raise WorkerBootError(f"this worker cannot start: {exc}") from exc

    def _boot(self, worker: dramatiq.Worker) -> None:
        for name in self.modules:
            importlib.import_module(name)
        self.bus.check_service(consume=True)
        # The backend decides how this process handles events: on Redis the bus
        # declares the actors (the Worker then consumes their queues with its
        # --threads); on Kafka a bridge consumes on its own loop and thread.
        self._stop_backend = self.bus.backend.boot_worker_process(self.bus, worker)
        port = self.bus.settings.metrics_port
        if port is not None:
            from eventbus.prometheus import serve_worker_metrics

            serve_worker_metrics(port)
        if self.bus.settings.worker_gc_freeze:
            # Everything imported so far lives as long as the process: keep it out of
            # the cyclic GC, whose full passes over it otherwise stall every handler
            # thread for tens of milliseconds every few thousand messages.  Opt-in: it
            # changes the collector of the whole process, the user's code included.
            gc.collect()
            gc.freeze()
        handlers = self.bus.registry.all_handlers()
        if not handlers:
            logger.warning(
                "No @on_event handler found: name their modules on the command line "
                "(dramatiq eventbus.actors myapp.handlers) or in EVENTBUS_HANDLERS."
            )
        else:
            logger.info(
                "Service %s: handling %d handler(s) of topic(s) %s.",
                self.bus.subscriptions.service,
                len(handlers),
                ", ".join(sorted({spec.topic for spec in handlers})),
            )

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if self._stop_backend is not None:
            self._stop_backend(self.bus.settings.shutdown_timeout + BRIDGE_STOP_MARGIN)
            self._stop_backend = None

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if self.bus.settings.metrics == "prometheus":
            from eventbus.prometheus import mark_process_dead

            mark_process_dead()


def _exit(reason: str) -> None:
    logger.critical("Stopping this worker process: %s.", reason)
    os.kill(os.getpid(), signal.SIGTERM)


#: Exit status of a worker whose settings are missing or wrong (dramatiq's for a
#: failed import: its master exits with it too).
BAD_SETTINGS = 2


def _settings_problem(exc: Exception) -> str:
    """One line naming what is wrong with the worker's settings."""
    if not isinstance(exc, ValidationError) and "EVENTBUS_BACKEND" not in os.environ:
        return (
            "EVENTBUS_BACKEND is not set: a worker (dramatiq eventbus.actors) needs "
            "EVENTBUS_BACKEND=redis or EVENTBUS_BACKEND=kafka (the default, sync, runs "
            "handlers inside the web process); set it in the environment or in .env "
            "(honcho reads .env; see .env.example)"
        )
    if isinstance(exc, ValidationError):
        parts = []
        for error in exc.errors():
            name = "EVENTBUS_" + "_".join(str(part) for part in error["loc"]).upper()
            parts.append(f"{name}: {error['msg']}")
        return "bad settings: " + "; ".join(parts) + " (set in the environment or in .env)"
    return f"{exc} (set it in the environment or in .env)"


def _build() -> EventBus:
    try:
        settings = EventBusSettings()
        bus = EventBus(settings=settings)
        # Raises ConfigurationError on a backend that cannot feed worker processes.
        bus.backend.prepare_worker_process(_exit)
    except (ConfigurationError, ValidationError) as exc:
        # One line, no traceback: the usual cause is a missing variable (a Procfile
        # run without .env), and dramatiq's master then exits with this status.
        print(f"eventbus worker cannot start: {_settings_problem(exc)}", file=sys.stderr)
        sys.stderr.flush()
        raise SystemExit(BAD_SETTINGS) from None
    dramatiq.set_broker(bus.broker)
    bus.broker.add_middleware(DeclareHandlers(bus, handler_modules(settings.handlers)))
    return bus


#: The worker process's bus (publish follow-up events from handlers with it).
bus: EventBus = _build()
#: The dramatiq broker the CLI runs (also dramatiq's global broker).
broker: dramatiq.Broker = bus.broker
