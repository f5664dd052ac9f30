"""Pluggable metrics: a small protocol the bus and the dispatch middleware feed.

The default :class:`NoopMetricsCollector` costs nothing.  Implement
:class:`MetricsCollector` to feed Prometheus, StatsD or Datadog, or use
:class:`InMemoryMetricsCollector` in tests.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    from eventbus.bus import EventBus


@runtime_checkable
class MetricsCollector(Protocol):
    """What the bus reports.  Every method takes the event's topic.

    ``inc_retry`` is called once per scheduled retry, ``inc_dlq`` once per dead
    letter, ``inc_dispatch_error`` once per failed handler attempt.  A collector may
    implement the optional protocols below as well: :class:`CountsUnrouted`,
    :class:`LabelsHandlers`, :class:`TracksInProgress`, :class:`ReadsTheBus`.
    """

    def inc_published(self, topic: str) -> None: ...

    def inc_dispatched(self, topic: str) -> None: ...

    def inc_dispatch_error(self, topic: str) -> None: ...

    def inc_retry(self, topic: str, attempt: int) -> None: ...

    def inc_dlq(self, topic: str) -> None: ...

    def observe_dispatch_duration(self, topic: str, duration: float) -> None: ...

    def observe_publish_duration(self, topic: str, duration: float) -> None: ...


@runtime_checkable
class CountsUnrouted(Protocol):
    """A collector that counts events published to a topic nobody subscribes."""

    def inc_unrouted(self, topic: str) -> None: ...


@runtime_checkable
class CountsSchemaMismatches(Protocol):
    """A collector that counts events published while a live subscriber's stored
    schema would reject their class (``EVENTBUS_SCHEMA_CHECK=warn``); ``subscriber``
    is ``<service>/<handler>``."""

    def inc_schema_mismatch(self, topic: str, subscriber: str) -> None: ...


@runtime_checkable
class LabelsHandlers(Protocol):
    """A collector whose ``inc_dispatched``, ``inc_dispatch_error`` and
    ``observe_dispatch_duration`` take a ``handler`` keyword (the handler's name).

    Declare it with the class attribute ``labels_handlers = True``.
    """

    labels_handlers: ClassVar[bool]


@runtime_checkable
class TracksInProgress(Protocol):
    """A collector told when each handler attempt starts and ends (an in-progress gauge)."""

    def dispatch_started(self, topic: str, handler: str) -> None: ...

    def dispatch_finished(self, topic: str, handler: str) -> None: ...


@runtime_checkable
class ReadsTheBus(Protocol):
    """A collector given its bus once (to read the backlog and dead letters at scrape time)."""

    def attach(self, bus: EventBus) -> None: ...


class NoopMetricsCollector:
    """The default collector: records nothing."""

    def inc_published(self, topic: str) -> None:
        pass

    def inc_dispatched(self, topic: str) -> None:
        pass

    def inc_dispatch_error(self, topic: str) -> None:
        pass

    def inc_retry(self, topic: str, attempt: int) -> None:
        pass

    def inc_dlq(self, topic: str) -> None:
        pass

    def observe_dispatch_duration(self, topic: str, duration: float) -> None:
        pass

    def observe_publish_duration(self, topic: str, duration: float) -> None:
        pass


class InMemoryMetricsCollector:
    """Counts in plain dicts, for tests and debugging; safe across threads.

    Example::

        metrics = InMemoryMetricsCollector()
        bus = EventBus(metrics=metrics)
        ...
        metrics.snapshot()
        # {'published': {'user.created': 10}, 'dispatched': {'user.created': 10}, ...}
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.published: dict[str, int] = defaultdict(int)
        self.dispatched: dict[str, int] = defaultdict(int)
        self.dispatch_errors: dict[str, int] = defaultdict(int)
        self.retries: dict[str, int] = defaultdict(int)
        self.dlq_count: dict[str, int] = defaultdict(int)
        self.unrouted: dict[str, int] = defaultdict(int)
        #: Events published that a live subscriber's schema would reject, by
        #: ``(topic, "<service>/<handler>")``.
        self.schema_mismatches: dict[tuple[str, str], int] = defaultdict(int)
        self.dispatch_durations: dict[str, list[float]] = defaultdict(list)
        self.publish_durations: dict[str, list[float]] = defaultdict(list)

    def _inc(self, counter: dict[str, int], topic: str) -> None:
        with self._lock:
            counter[topic] += 1

    def inc_published(self, topic: str) -> None:
        self._inc(self.published, topic)

    def inc_dispatched(self, topic: str) -> None:
        self._inc(self.dispatched, topic)

    def inc_dispatch_error(self, topic: str) -> None:
        self._inc(self.dispatch_errors, topic)

    def inc_retry(self, topic: str, attempt: int) -> None:
        self._inc(self.retries, topic)

    def inc_dlq(self, topic: str) -> None:
        self._inc(self.dlq_count, topic)

    def inc_unrouted(self, topic: str) -> None:
        self._inc(self.unrouted, topic)

    def inc_schema_mismatch(self, topic: str, subscriber: str) -> None:
        with self._lock:
            self.schema_mismatches[topic, subscriber] += 1

    def observe_dispatch_duration(self, topic: str, duration: float) -> None:
        with self._lock:
            self.dispatch_durations[topic].append(duration)

    def observe_publish_duration(self, topic: str, duration: float) -> None:
        with self._lock:
            self.publish_durations[topic].append(duration)

    def snapshot(self) -> dict[str, dict[str, int]]:
        """The counters as plain dicts."""
        with self._lock:
            return {
                "published": dict(self.published),
                "dispatched": dict(self.dispatched),
                "dispatch_errors": dict(self.dispatch_errors),
                "retries": dict(self.retries),
                "dlq_count": dict(self.dlq_count),
                "unrouted": dict(self.unrouted),
            }

    def reset(self) -> None:
        """Zero every counter."""
        with self._lock:
            for counter in (
                self.published,
                self.dispatched,
                self.dispatch_errors,
                self.retries,
                self.dlq_count,
                self.unrouted,
            ):
                counter.clear()
            self.schema_mismatches.clear()
            self.dispatch_durations.clear()
            self.publish_durations.clear()
