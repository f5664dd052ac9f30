"""The embedded backend (``EVENTBUS_BACKEND=sync``): handlers run in the app's process.

Here, and only here, the publisher routes: it is the subscriber.  Each event
becomes one dramatiq message per subscribed handler, run through the broker's
whole middleware chain by a :class:`~eventbus.dispatch.Dispatcher` on the
application's event loop (async handlers share the app's loop; sync ones run in
a bounded thread pool).

Nothing here survives the process: events still pending when ``stop()`` gives
up are written to the dead-letter store with the reason, and logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import dramatiq
from dramatiq import Message, Middleware
from dramatiq.broker import MessageProxy
from dramatiq.brokers.stub import StubBroker
from dramatiq.errors import QueueNotFound
from pydantic_core import from_json

from eventbus.backends.base import (
    Backend,
    CachedHooksBroker,
    Operations,
    OutgoingEvent,
    SubscriptionState,
    WorkerState,
    handler_message,
    replay_message,
)
from eventbus.config import DEFAULT_MAX_CONCURRENCY, DEFAULT_WORKER_THREADS
from eventbus.dispatch import Dispatcher
from eventbus.exceptions import BackendError, ConfigurationError, ShutdownError, UnroutedError
from eventbus.health import HealthResult, dispatcher_liveness
from eventbus.middleware.dead_letters import DeadLetters
from eventbus.routing import Router, Subscriptions

if TYPE_CHECKING:
    from collections.abc import Callable

    from eventbus.config import EventBusSettings
    from eventbus.dlq.records import FailedEvent

logger = logging.getLogger(__name__)


class EmbeddedBroker(CachedHooksBroker, StubBroker):
    """A StubBroker whose messages are delivered by the in-process :class:`Dispatcher`."""

    def __init__(self, middleware: list[Middleware]) -> None:
        super().__init__(middleware=middleware)
        self.dispatcher: Dispatcher | None = None

    def enqueue(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        if message.queue_name not in self.queues:
            raise QueueNotFound(message.queue_name)  # type: ignore[no-untyped-call]
        dispatcher = self.dispatcher
        if dispatcher is None or not dispatcher.accepting:
            raise BackendError("the embedded backend is not running", backend="sync")
        self.emit_before("enqueue", message, delay)
        dispatcher.push(message, delay)
        self.emit_after("enqueue", message, delay)
        return message


class SyncBackend(Backend):
    """The embedded, in-process backend (the default).

    Parameters:
      max_concurrency: Handlers running at once on the application's loop.
      worker_threads: Threads for sync handlers.
    """

    name = "sync"
    always_consumes = True

    def __init__(
        self,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        worker_threads: int = DEFAULT_WORKER_THREADS,
    ) -> None:
        self.max_concurrency = max_concurrency
        self.worker_threads = worker_threads
        self.broker: EmbeddedBroker | None = None
        self.router: Router | None = None
        self.dispatcher: Dispatcher | None = None

    @classmethod
    def from_settings(cls, settings: EventBusSettings) -> SyncBackend:
        return cls(max_concurrency=settings.max_concurrency, worker_threads=settings.worker_threads)

    def bind(self, middleware: list[Middleware], subscriptions: Subscriptions) -> dramatiq.Broker:
        if self.broker is None:
            self.broker = EmbeddedBroker(middleware)
            self.router = Router(subscriptions, self.broker, subscriptions.queue_of)
        return self.broker

    def _require_router(self) -> Router:
        if self.router is None:
            raise BackendError("backend not bound to a bus", backend=self.name)
        return self.router

    async def start(self, consume: bool) -> None:
        router = self._require_router()
        broker = self.broker
        assert broker is not None
        if self.dispatcher is not None and not self.dispatcher.task.done():
            return
        router.declare()
        self.dispatcher = Dispatcher(
            broker,
            asyncio.get_running_loop(),
            max_concurrency=self.max_concurrency,
            worker_threads=self.worker_threads,
        )
        broker.dispatcher = self.dispatcher

    async def stop(self, timeout: float) -> None:
        dispatcher, self.dispatcher = self.dispatcher, None
        if dispatcher is None:
            return
        undelivered = await dispatcher.stop(timeout)
        if undelivered:
            self._dead_letter_undelivered(undelivered)

    def _dead_letter_undelivered(self, messages: list[Message[Any] | MessageProxy]) -> None:
        logger.warning("%d event deliveries were still pending at shutdown.", len(messages))
        assert self.broker is not None
        recorders = [m for m in self.broker.middleware if isinstance(m, DeadLetters)]
        error = ShutdownError("the bus stopped before this event was handled")
        for message in messages:
            for recorder in recorders:
                recorder.record(message, error)

    def replay(self, record: FailedEvent, handler: str | None = None) -> None:
        refusal = self.replay_refusal(record, handler)
        if refusal is not None:
            raise BackendError(refusal, backend=self.name)
        actor = self._require_router().actor(handler or record.handler)
        assert self.broker is not None and actor is not None
        self.broker.enqueue(replay_message(record, actor.queue_name, handler))

    def replay_refusal(self, record: FailedEvent, handler: str | None = None) -> str | None:
        name = handler or record.handler
        if self._require_router().actor(name) is None:
            return f"handler {name!r} is not registered on this bus"
        if handler is not None and handler not in (self.replay_targets(record) or []):
            return f"handler {handler!r} does not subscribe to topic {record.topic!r}"
        return None

    def replay_targets(self, record: FailedEvent) -> list[str] | None:
        router = self._require_router()
        return sorted({actor.actor_name for actor in router.actors(record.topic)})

    async def publish(self, events: list[OutgoingEvent], *, strict: bool = False) -> set[str]:
        router = self._require_router()
        dispatcher = self.dispatcher
        if dispatcher is None or not dispatcher.accepting:
            raise BackendError("the embedded backend is not running", backend=self.name)
        routed = []
        unrouted: set[str] = set()
        for outgoing in events:
            actors = router.actors(outgoing.topic)
            if actors:
                routed.append((outgoing, actors))
            else:
                unrouted.add(outgoing.topic)
        if strict and unrouted:
            raise UnroutedError(
                f"no handler subscribes to topic(s) {', '.join(sorted(unrouted))}; "
                "nothing was published",
                sorted(unrouted),
            )
        enqueue = self.broker.enqueue  # type: ignore[union-attr]
        now_ms = int(time.time() * 1000)
        for outgoing, actors in routed:
            envelope = from_json(outgoing.envelope)
            options = outgoing.options
            # Delayed (publish(..., delay=...)): a timer on the loop; lost with the
            # process like anything pending here (dead-lettered at stop).
            delay = outgoing.delay_ms(now_ms) or None
            for actor in actors:
                enqueue(handler_message(actor, envelope, options), delay=delay)
        return unrouted

    def backlog(self) -> dict[str, int]:
        dispatcher = self.dispatcher
        return {"embedded": dispatcher.pending if dispatcher is not None else 0}

    async def operations(self) -> Operations:
        """This process: its handlers, and its deliveries not finished yet."""
        import os
        import socket
        from datetime import UTC, datetime

        from eventbus.fingerprint import code_fingerprint, eventbus_version

        router = self._require_router()
        router.declare()
        service = router.subscriptions.service
        name = f"{socket.gethostname()}:{os.getpid()}"
        running = self.dispatcher is not None and not self.dispatcher.task.done()
        rows, code = [], {}
        for spec in router.subscriptions.handlers():
            fingerprint = code_fingerprint(spec.fn)
            code[f"{service}|{spec.topic}|{spec.name}"] = fingerprint
            rows.append(
                SubscriptionState(
                    service,
                    spec.topic,
                    spec.name,
                    router.subscriptions.queue_of(spec),
                    live_workers=1 if running else 0,
                    code={fingerprint: [name]} if running else {},
                )
            )
        workers = []
        if running:
            assert self.dispatcher is not None
            workers.append(
                WorkerState(
                    name,
                    0.0,
                    tuple(sorted({r.queue for r in rows})),
                    self.dispatcher.pending,
                    eventbus_version(),
                    code,
                )
            )
        note = (
            "handlers run in this process (EVENTBUS_BACKEND=sync): its deliveries not "
            "finished yet are its worker's in-flight count; no backlog per handler is kept"
        )
        return Operations(self.name, self.address(), datetime.now(UTC), rows, workers, notes=[note])

    async def drain(self, timeout: float | None = None) -> None:
        if self.dispatcher is not None:
            await self.dispatcher.drain(timeout)

    async def health(self) -> list[HealthResult]:
        return self.liveness()

    def liveness(self) -> list[HealthResult]:
        return [dispatcher_liveness(self.name, self.dispatcher)]

    def dead_letters_out_of_reach(self) -> str:
        return (
            "EVENTBUS_BACKEND=sync keeps dead letters in the application's memory; the "
            "CLI needs a durable backend (redis, kafka). Use dlq_router() in the app."
        )

    def subscriptions_home(self) -> str:
        return (
            "each process routes its events to the handlers it registered itself, in its "
            "own memory (nothing to list from outside it)"
        )

    def prepare_worker_process(self, on_failure: Callable[[str], None]) -> None:
        raise ConfigurationError(
            "dramatiq eventbus.actors needs a shared backend: set EVENTBUS_BACKEND=redis "
            "(or kafka); the sync backend runs handlers inside the web process"
        )
