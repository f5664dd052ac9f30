"""In-process dispatch: run dramatiq messages on the application's event loop.

The embedded backend and the Kafka bridge hand their messages to a
:class:`Dispatcher`, which runs each through the broker's whole dramatiq
middleware chain (retries, dead letters, metrics, tracing) without a dramatiq
``Worker``:

* async handlers run on the application's own loop and can share its clients
  and pools (dramatiq's AsyncIO middleware would give them a private loop);
* sync handlers run in a bounded thread pool;
* ``drain()`` knows exactly when everything accepted so far is done;
* ``stop()`` finishes in-flight work within a bound and leaves no thread behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ctypes
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dramatiq
from dramatiq import Message
from dramatiq.broker import MessageProxy
from dramatiq.errors import ActorNotFound
from dramatiq.middleware import SkipMessage

from .config import DEFAULT_MAX_CONCURRENCY, DEFAULT_WORKER_THREADS
from .exceptions import HandlerTimeout, ShutdownError
from .middleware import keys
from .registry import HandlerSpec

logger = logging.getLogger(__name__)

#: Seconds between checks while waiting for handler threads to exit.
_THREAD_POLL = 0.005


class ThreadJob:
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
    """Runs the messages of a broker on one event loop.

    Parameters:
      broker: The broker whose actors and middleware are used (its ``enqueue``
        must hand messages back to :meth:`push`).
      loop: The application's event loop; every handler coroutine runs on it.
      max_concurrency: Handlers running at once.
      worker_threads: Threads for sync handlers.
    """

    def __init__(
        self,
        broker: dramatiq.Broker,
        loop: asyncio.AbstractEventLoop,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        worker_threads: int = DEFAULT_WORKER_THREADS,
    ) -> None:
        self.broker = broker
        self.loop = loop
        self.max_concurrency = max_concurrency
        self.accepting = True
        self._loop_thread = threading.get_ident()
        self._threads: list[threading.Thread] = []
        self._executor = ThreadPoolExecutor(
            worker_threads,
            thread_name_prefix="eventbus-handler",
            initializer=self._register_thread,
        )
        self._ready: deque[Message[Any]] = deque()
        self._delayed: dict[asyncio.TimerHandle, Message[Any]] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._pending = 0
        self._wakeup: asyncio.Future[None] | None = None
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._task = loop.create_task(self._run(), name="eventbus-dispatcher")

    def _register_thread(self) -> None:
        # Runs first in every pool thread: the pool's own thread list is private.
        self._threads.append(threading.current_thread())

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
        except asyncio.CancelledError:
            error = ShutdownError("handler cancelled: the bus stopped")
            proxy.stuff_exception(error)
            proxy.fail()
            broker.emit_after("process_message", proxy, exception=error)
            raise
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
        job = ThreadJob(spec, envelope)
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
        threads = list(self._threads)
        self._executor.shutdown(wait=False, cancel_futures=True)
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(_THREAD_POLL)
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            logger.error("Sync handler threads still running at shutdown: %s", ", ".join(stuck))


def _copy_context_run(job: ThreadJob) -> Callable[[], None]:
    context = contextvars.copy_context()
    return lambda: context.run(job)


def _consume_result(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
