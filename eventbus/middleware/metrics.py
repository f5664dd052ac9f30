"""The dramatiq middleware that reports handler attempts to a MetricsCollector."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dramatiq import Middleware

import eventbus.keys as keys
from eventbus.metrics import LabelsHandlers, MetricsCollector, TracksInProgress

if TYPE_CHECKING:
    from dramatiq import Broker
    from dramatiq.broker import MessageProxy


class Metrics(Middleware):
    """Counts each handler attempt once: ``inc_dispatched`` on success,
    ``inc_dispatch_error`` on failure, and observes its duration.

    Collectors that declare :class:`~eventbus.metrics.LabelsHandlers` get the
    handler's actor name too; those implementing
    :class:`~eventbus.metrics.TracksInProgress` can keep an in-progress gauge.

    Parameters:
      collector: Where the numbers go.
    """

    def __init__(self, collector: MetricsCollector) -> None:
        self.collector = collector
        self._started: dict[str, float] = {}
        self._with_handler = isinstance(collector, LabelsHandlers) and collector.labels_handlers
        self._on_start: Callable[[str, str], None] | None = None
        self._on_finish: Callable[[str, str], None] | None = None
        if isinstance(collector, TracksInProgress):
            self._on_start = collector.dispatch_started
            self._on_finish = collector.dispatch_finished

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        self._started[message.message_id] = time.perf_counter()
        if self._on_start is not None:
            self._on_start(str(message.options.get(keys.TOPIC, "")), message.actor_name)

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
        collector = self.collector
        extra: dict[str, Any] = {"handler": message.actor_name} if self._with_handler else {}
        if exception is None:
            collector.inc_dispatched(topic, **extra)
        else:
            collector.inc_dispatch_error(topic, **extra)
        if started is not None:
            collector.observe_dispatch_duration(topic, time.perf_counter() - started, **extra)
            if self._on_finish is not None:
                self._on_finish(topic, message.actor_name)

    def after_skip_message(self, broker: Broker, message: MessageProxy) -> None:
        if self._started.pop(message.message_id, None) is not None and self._on_finish:
            self._on_finish(str(message.options.get(keys.TOPIC, "")), message.actor_name)
