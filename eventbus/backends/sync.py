"""The embedded backend (``EVENTBUS_BACKEND=sync``): handlers run in the app's process.

Messages go through a dramatiq :class:`StubBroker` and its whole middleware chain,
but no dramatiq ``Worker`` runs them: a dispatcher on the application's event loop
does, so that

* async handlers run on the application's own loop and can share its clients
  and pools (dramatiq's AsyncIO middleware would give them a private loop);
* sync handlers run in a bounded thread pool;
* ``drain()`` knows exactly when everything published so far is done;
* ``stop()`` finishes in-flight work within a bound and leaves no thread behind.

Nothing here survives the process: events still pending when ``stop()`` gives
up are written to the dead-letter store with the reason, and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dramatiq
from dramatiq import Message, Middleware
from dramatiq.broker import MessageProxy
from dramatiq.brokers.stub import StubBroker
from dramatiq.errors import ActorNotFound, QueueNotFound
from dramatiq.middleware import SkipMessage

from ..config import DEFAULT_MAX_CONCURRENCY, DEFAULT_WORKER_THREADS
from ..exceptions import BackendError, HandlerTimeout, ShutdownError
from ..health import HealthResult, HealthStatus
from ..middleware import keys
from ..middleware.dead_letters import DeadLetters
from ..registry import HandlerSpec
from .base import Backend, CachedHooksBroker

logger = logging.getLogger(__name__)

#: Seconds between checks while waiting for handler threads to exit.
_THREAD_POLL = 0.005


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


class _ThreadJob:
    """A sync handler call in the pool, interruptible when its time limit passes."""

    __slots__ = ("envelope", "lock", "spec", "thread_id")

    def __init__(self, spec: HandlerSpec, envelope: Any) -> None:
        self.spec = spec
        self.envelope = envelope
        self.lock = threading.Lock()
        self.thread_id: int | None = None

    def __call__(self) -> None:
        self.thread_id = threading.get_ident()
        try:
            self.spec.run_sync(self.envelope)
        finally:
            with self.lock:
                tid, self.thread_id = self.thread_id, None
                if tid is not None:  # drop an interrupt that arrived too late to matter
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), None)

    def interrupt(self) -> None:
        """Raise HandlerTimeout inside the handler's thread, if it is still running."""
        with self.lock:
            if self.thread_id is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(self.thread_id), ctypes.py_object(HandlerTimeout)
                )


class Dispatcher:
    """Runs the messages of an :class:`EmbeddedBroker` on one event loop.

    Parameters:
      broker: The broker whose actors and middleware are used.
      loop: The application's event loop; every handler coroutine runs on it.
      max_concurrency: Handlers running at once.
      worker_threads: Threads for sync handlers.
    """

    def __init__(
        self,
        broker: EmbeddedBroker,
        loop: asyncio.AbstractEventLoop,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        worker_threads: int = DEFAULT_WORKER_THREADS,
    ) -> None:
        self.broker = broker
        self.loop = loop
        self.max_concurrency = max_concurrency
        self.accepting = True
        self._loop_thread = threading.get_ident()
        self._executor = ThreadPoolExecutor(worker_threads, thread_name_prefix="eventbus-handler")
        self._ready: deque[Message[Any]] = deque()
        self._delayed: dict[asyncio.TimerHandle, Message[Any]] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._pending = 0
        self._wakeup: asyncio.Future[None] | None = None
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._task = loop.create_task(self._run(), name="eventbus-dispatcher")

    @property
    def pending(self) -> int:
        """Messages accepted and not yet finished (ready, delayed or running)."""
        return self._pending

    @property
    def task(self) -> asyncio.Task[None]:
        """The dispatcher's consumer task; done means dead."""
        return self._task

    def push(self, message: Message[Any], delay: int | None = None) -> None:
        """Accept ``message``, to run after ``delay`` milliseconds (thread-safe)."""
        if threading.get_ident() != self._loop_thread:
            self.loop.call_soon_threadsafe(self.push, message, delay)
            return
        self._pending += 1
        if delay:
            handle: asyncio.TimerHandle | None = None

            def release() -> None:
                assert handle is not None
                self._delayed.pop(handle, None)
                self._make_ready(message)

            handle = self.loop.call_later(delay / 1000, release)
            self._delayed[handle] = message
        else:
            self._make_ready(message)

    def _make_ready(self, message: Message[Any]) -> None:
        self._ready.append(message)
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def _run(self) -> None:
        ready = self._ready
        running = self._running
        create_task = self.loop.create_task
        while True:
            if not ready or len(running) >= self.max_concurrency:
                self._wakeup = self.loop.create_future()
                await self._wakeup
                self._wakeup = None
                continue
            task = create_task(self._process(ready.popleft()))
            running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._pending -= 1
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)
        if self._pending == 0:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def _process(self, message: Message[Any]) -> None:
        broker = self.broker
        proxy = MessageProxy(message)
        try:
            broker.emit_before("process_message", proxy)
            actor = broker.actors.get(message.actor_name)
            if actor is None:
                raise ActorNotFound(message.actor_name)  # type: ignore[no-untyped-call]
            spec: HandlerSpec = actor.options[keys.HANDLER]
            envelope = message.args[0] if message.args else None
            if spec.is_async:
                if spec.time_limit is None:
                    await spec.run_async(envelope)
                else:
                    await self._run_async_limited(spec, envelope, spec.time_limit)
            else:
                await self._run_in_thread(spec, envelope)
            broker.emit_after("process_message", proxy, result=None)
        except SkipMessage:
            broker.emit_after("skip_message", proxy)
        except asyncio.CancelledError as exc:
            proxy.stuff_exception(ShutdownError("handler cancelled: the bus stopped"))
            proxy.fail()
            broker.emit_after("process_message", proxy, exception=proxy._exception)
            raise exc
        except Exception as exc:
            proxy.stuff_exception(exc)
            broker.emit_after("process_message", proxy, exception=exc)
        signal = "nack" if proxy.failed else "ack"
        broker.emit_before(signal, proxy)
        broker.emit_after(signal, proxy)

    async def _run_async_limited(self, spec: HandlerSpec, envelope: Any, limit: float) -> None:
        try:
            async with asyncio.timeout(limit):
                await spec.run_async(envelope)
        except TimeoutError:
            raise HandlerTimeout(
                f"handler {spec.name} exceeded its {limit:g}s time limit"
            ) from None

    async def _run_in_thread(self, spec: HandlerSpec, envelope: Any) -> None:
        job = _ThreadJob(spec, envelope)
        future = self.loop.run_in_executor(self._executor, _copy_context_run(job))
        if spec.time_limit is None:
            await future
            return
        try:
            await asyncio.wait_for(asyncio.shield(future), spec.time_limit)
        except TimeoutError:
            job.interrupt()
            future.add_done_callback(_consume_result)
            raise HandlerTimeout(
                f"handler {spec.name} exceeded its {spec.time_limit:g}s time limit"
            ) from None

    async def drain(self, timeout: float | None) -> None:
        """Wait until nothing is pending; TimeoutError names what is left."""
        if self._pending == 0:
            return
        waiter = self.loop.create_future()
        self._idle_waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise TimeoutError(
                f"{self._pending} event deliveries still pending after {timeout:g}s"
            ) from None

    async def stop(self, timeout: float) -> list[Message[Any]]:
        """Stop accepting, finish in-flight work within ``timeout``, release threads.

        Returns the messages that could not be delivered (not yet due, not started,
        or cancelled when the bound passed).
        """
        self.accepting = False
        deadline = time.monotonic() + timeout
        undelivered = list(self._delayed.values())
        for handle in self._delayed:
            handle.cancel()
        self._pending -= len(self._delayed)
        self._delayed.clear()

        if self._ready or self._running:
            waiter = self.loop.create_future()
            self._idle_waiters.append(waiter)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, max(0.0, deadline - time.monotonic()))
        self._task.cancel()
        undelivered.extend(self._ready)
        self._ready.clear()
        if self._running:
            logger.warning(
                "Cancelling %d handler(s) still running after %gs.", len(self._running), timeout
            )
            for task in list(self._running):
                task.cancel()
            await asyncio.gather(*self._running, return_exceptions=True)
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._shutdown_threads(deadline)
        return undelivered

    async def _shutdown_threads(self, deadline: float) -> None:
        threads = list(getattr(self._executor, "_threads", ()))
        self._executor.shutdown(wait=False, cancel_futures=True)
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(_THREAD_POLL)
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            logger.error("Sync handler threads still running at shutdown: %s", ", ".join(stuck))


def _copy_context_run(job: _ThreadJob) -> Callable[[], None]:
    import contextvars

    context = contextvars.copy_context()
    return lambda: context.run(job)


def _consume_result(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class SyncBackend(Backend):
    """The embedded, in-process backend (the default).

    Parameters:
      max_concurrency: Handlers running at once on the application's loop.
      worker_threads: Threads for sync handlers.
    """

    name = "sync"

    def __init__(
        self,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        worker_threads: int = DEFAULT_WORKER_THREADS,
    ) -> None:
        self.max_concurrency = max_concurrency
        self.worker_threads = worker_threads
        self.broker: EmbeddedBroker | None = None
        self.dispatcher: Dispatcher | None = None

    def bind(self, middleware: list[Middleware]) -> dramatiq.Broker:
        if self.broker is None:
            self.broker = EmbeddedBroker(middleware)
        return self.broker

    def _require_broker(self) -> EmbeddedBroker:
        if self.broker is None:
            raise BackendError("backend not bound to a bus", backend=self.name)
        return self.broker

    async def start(self) -> None:
        broker = self._require_broker()
        if self.dispatcher is not None and not self.dispatcher.task.done():
            return
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

    def _dead_letter_undelivered(self, messages: list[Message[Any]]) -> None:
        logger.warning("%d event deliveries were still pending at shutdown.", len(messages))
        broker = self._require_broker()
        recorders = [m for m in broker.middleware if isinstance(m, DeadLetters)]
        error = ShutdownError("the bus stopped before this event was handled")
        for message in messages:
            for recorder in recorders:
                recorder.record(message, error)

    def replay(self, message: Message[Any]) -> None:
        broker = self._require_broker()
        if message.actor_name not in broker.actors:
            raise BackendError(
                f"handler {message.actor_name!r} is not registered on this bus", backend=self.name
            )
        broker.enqueue(message)

    async def enqueue(self, messages: list[Message[Any]]) -> None:
        broker = self._require_broker()
        dispatcher = self.dispatcher
        if dispatcher is None or not dispatcher.accepting:
            raise BackendError("the embedded backend is not running", backend=self.name)
        for message in messages:
            if message.queue_name not in broker.queues:
                raise QueueNotFound(message.queue_name)  # type: ignore[no-untyped-call]
        for message in messages:
            broker.enqueue(message)

    def backlog(self) -> dict[str, int]:
        dispatcher = self.dispatcher
        return {"embedded": dispatcher.pending if dispatcher is not None else 0}

    async def drain(self, timeout: float | None = None) -> None:
        if self.dispatcher is not None:
            await self.dispatcher.drain(timeout)

    async def health(self) -> list[HealthResult]:
        dispatcher = self.dispatcher
        if dispatcher is None:
            return [HealthResult(self.name, HealthStatus.UNHEALTHY, "not started")]
        task = dispatcher.task
        if task.done():
            reason = "cancelled" if task.cancelled() else repr(task.exception())
            return [
                HealthResult(self.name, HealthStatus.UNHEALTHY, f"dispatcher is dead: {reason}")
            ]
        detail = f"{dispatcher.pending} pending"
        return [HealthResult(self.name, HealthStatus.HEALTHY, detail)]
