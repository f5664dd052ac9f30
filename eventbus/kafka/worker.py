"""Kafka worker processes: ``python -m eventbus.kafka MODULE...``,
:func:`run_worker` for a process of your own, :func:`start_worker_thread` for
hosts that own the main thread (``dramatiq eventbus.actors``)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from eventbus.config import EventBusSettings
from eventbus.exceptions import ConfigurationError

if TYPE_CHECKING:
    from eventbus.backends.base import HostedBus

logger = logging.getLogger("eventbus.kafka")


async def run_worker(bus: HostedBus, stop: asyncio.Event | None = None) -> None:
    """Run ``bus`` (on the Kafka backend) until ``stop`` is set or SIGTERM/SIGINT.

    This is what a Kafka worker process does: start the bus (the bridge joins the
    consumer group and handles the subscribed topics), wait, then stop it within
    ``settings.shutdown_timeout`` (in-flight handlers finish, offsets committed).
    """
    if bus.backend.name != "kafka":  # KafkaBackend.name (not imported: it imports us)
        raise ConfigurationError(
            f"run_worker needs the kafka backend, not {bus.backend.name!r} "
            "(set EVENTBUS_BACKEND=kafka)"
        )
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, stop.set)
            installed.append(signum)
    try:
        await bus.start(consume=True)
        logger.info("Kafka worker consuming %s", ", ".join(bus.topics) or "(no topics yet)")
        await stop.wait()
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
        await bus.stop()


def start_worker_thread(bus: HostedBus) -> Callable[[float], None]:
    """Run :func:`run_worker` for ``bus`` on its own event loop in a new thread.

    For hosts that own the main thread, such as dramatiq's CLI (call it from a
    ``before_worker_boot`` hook).  Returns ``stop(timeout)``, which ends the worker
    (in-flight handlers finish, offsets committed) and joins the thread.
    """
    loop = asyncio.new_event_loop()
    stop_event = asyncio.Event()
    thread = threading.Thread(
        target=loop.run_until_complete,
        args=(run_worker(bus, stop_event),),
        name="eventbus-kafka-worker",
        # A daemon: a worker process that exits without stop() (dramatiq's second
        # SIGTERM) must not hang on it; its uncommitted records are redelivered.
        daemon=True,
    )
    thread.start()

    def stop(timeout: float) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(stop_event.set)
        thread.join(timeout)
        if not thread.is_alive():
            loop.close()

    return stop


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m eventbus.kafka MODULE...``: a Kafka worker process.

    Imports each MODULE (registering its ``@on_event`` handlers), then runs a bus
    with ``EVENTBUS_BACKEND=kafka`` settings from the environment until SIGTERM.
    """
    from eventbus.bus import EventBus

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(main.__doc__)
        return 0 if args else 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"
    )
    for module in args:
        importlib.import_module(module)
    settings = EventBusSettings(backend="kafka")
    bus = EventBus(settings=settings)
    bus.check_service(consume=True)  # a generic derived service name is refused
    asyncio.run(run_worker(bus))
    return 0
