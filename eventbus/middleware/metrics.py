"""The dramatiq middleware that reports handler attempts to a MetricsCollector."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dramatiq import Middleware

from ..metrics import MetricsCollector
from . import keys

if TYPE_CHECKING:
    from dramatiq import Broker
    from dramatiq.broker import MessageProxy


def takes_keyword(method: Callable[..., Any], name: str) -> bool:
    """Whether ``method`` (a user's collector or tracer method) accepts ``name``."""
    try:
        return name in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


class Metrics(Middleware):
    """Counts each handler attempt once: ``inc_dispatched`` on success,
    ``inc_dispatch_error`` on failure, and observes its duration.

    Collectors whose ``inc_dispatched`` / ``inc_dispatch_error`` /
    ``observe_dispatch_duration`` accept a ``handler`` keyword get the handler's
    actor name too; collectors with ``dispatch_started(topic, handler)`` and
    ``dispatch_finished(topic, handler)`` can keep an in-progress gauge.

    Parameters:
      collector: Where the numbers go.
    """

    def __init__(self, collector: MetricsCollector) -> None:
        self.collector = collector
        self._started: dict[str, float] = {}
        self._with_handler = takes_keyword(collector.inc_dispatched, "handler")
        self._on_start: Callable[[str, str], None] | None = getattr(
            collector, "dispatch_started", None
        )
        self._on_finish: Callable[[str, str], None] | None = getattr(
            collector, "dispatch_finished", None
        )

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
