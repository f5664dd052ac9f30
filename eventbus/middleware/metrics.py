"""The dramatiq middleware that reports handler attempts to a MetricsCollector."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from dramatiq import Middleware

from ..metrics import MetricsCollector
from . import keys

if TYPE_CHECKING:
    from dramatiq import Broker
    from dramatiq.broker import MessageProxy


class Metrics(Middleware):
    """Counts each handler attempt once: ``inc_dispatched`` on success,
    ``inc_dispatch_error`` on failure, and observes its duration.

    Parameters:
      collector: Where the numbers go.
    """

    def __init__(self, collector: MetricsCollector) -> None:
        self.collector = collector
        self._started: dict[str, float] = {}

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        self._started[message.message_id] = time.perf_counter()

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        started = self._started.pop(message.message_id, None)
        topic = str(message.options.get(keys.TOPIC, ""))
        if exception is None:
            self.collector.inc_dispatched(topic)
        else:
            self.collector.inc_dispatch_error(topic)
        if started is not None:
            self.collector.observe_dispatch_duration(topic, time.perf_counter() - started)

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        self._started.pop(message.message_id, None)
