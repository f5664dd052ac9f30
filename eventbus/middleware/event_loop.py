"""The event loop thread of async handlers in dramatiq worker processes."""

from __future__ import annotations

from typing import Any

from dramatiq.asyncio import EventLoopThread, set_event_loop_thread
from dramatiq.middleware import AsyncIO


class DaemonAsyncIO(AsyncIO):
    """Dramatiq's :class:`~dramatiq.middleware.AsyncIO`, with a daemon loop thread.

    Dramatiq's loop thread is not a daemon: when a worker process exits without
    ``worker.stop()`` (dramatiq does so on a second SIGTERM, which systemd and
    container runtimes send when they signal the whole process group), the
    interpreter waits for that thread forever, while the process's heartbeat
    thread keeps telling Redis it is alive.  As a daemon it dies with the process,
    and the messages it held are redelivered.
    """

    def before_worker_boot(self, broker: Any, worker: Any) -> None:
        thread = EventLoopThread(self.logger)
        thread.daemon = True
        thread.start(timeout=1.0)
        set_event_loop_thread(thread)
