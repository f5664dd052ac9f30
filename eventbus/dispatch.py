"""In-process dispatch: run dramatiq messages on the application's event loop.

The embedded backend and the Kafka bridge hand their messages to a
:class:`Dispatcher`, which runs each through the broker's whole dramatiq
middleware chain (retries, dead letters, metrics, tracing) without a dramatiq
``Worker``:

* async handlers run on the application's own loop and can share its clients
  and pools (dramatiq's AsyncIO middleware would give them a private loop);
* sync handlers run in a bounded thread pool;
* ``drain()`` knows exactly when everything accepted so far is done;
* ``stop()`` finishes in-flight work within a bound and leaves no thread behind;
* a failed attempt whose retry and dead letter could not be written (see
  :class:`~eventbus.middleware.retries.Outcome`) is neither acked nor nacked: it
  runs again :data:`~eventbus.middleware.retries.UNRECORDED_REDELIVERY_DELAY`
  seconds later (after ``stop()`` began, it is returned as undelivered).
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
from dramatiq.middleware import (
    Interrupt,
    Shutdown,
    SkipMessage,
    TimeLimitExceeded,
    raise_thread_exception,
)

import eventbus.keys as keys
from eventbus.config import DEFAULT_MAX_CONCURRENCY, DEFAULT_WORKER_THREADS
from eventbus.exceptions import HandlerTimeout, ShutdownError
from eventbus.middleware.retries import UNRECORDED_REDELIVERY_DELAY, unrecorded
from eventbus.registry import HandlerSpec

logger = logging.getLogger(__name__)

#: Seconds between checks while waiting for handler threads to exit.
_THREAD_POLL = 0.005
#: Seconds a sync handler may run on after its time-limit interrupt before a
#: warning says it is blocked (an interrupt cannot cut a system call short).
STUCK_WARNING_DELAY = 1.0
#: Seconds sync handlers interrupted by ``stop()`` get to unwind (their ``finally``
#: blocks run) on top of the shutdown timeout, before their threads are reported.
UNWIND_GRACE = 0.5


class ThreadJob:
    """One attempt of a sync handler, run by a pool thread.

    * It never starts once given up (:meth:`give_up`, or ``halt`` set by
      :meth:`Dispatcher.stop`), even when a thread picks it up later: an attempt
      whose failure is recorded never starts afterwards.
    * Its time limit counts from the moment a thread starts it, not from when it
      was queued behind busy threads.
    * It is interrupted with dramatiq's own exceptions, raised in its thread:
      ``TimeLimitExceeded`` when the time limit passes, ``Shutdown`` when the bus
      gives up on it.  Both are ``BaseException`` subclasses (dramatiq's
      ``Interrupt``), so ``except Exception`` in handler code cannot swallow them.
      They are dramatiq's rather than a private class so that a handler meets, at
      its time limit, the very exception a dramatiq worker raises on the Redis
      backend: cleanup written for one backend works on the other.
    * The attempt itself fails with :class:`~eventbus.HandlerTimeout`, which stays
      an ``EventBusError`` (an ``Exception``): the middleware chain, retry policies
      (``retryable_exceptions=(Exception,)``) and ``except EventBusError`` in
      callers treat it as an ordinary failure, under the one name dead letters use
      on every backend.  Its traceback shows where the handler was stopped.

    An interrupt lands when the thread next runs Python code: a handler blocked in
    a system call (``time.sleep``, a socket read without timeout) stops only once
    the call returns, and its attempt ends (retry or dead letter) then, as on a
    dramatiq worker; a warning says so ``STUCK_WARNING_DELAY`` seconds after the
    interrupt.
    """

    __slots__ = (
        "envelope",
        "given_up",
        "halt",
        "interrupted",
        "lock",
        "loop",
        "spec",
        "thread_id",
        "timer",
    )

    def __init__(
        self,
        spec: HandlerSpec,
        envelope: Any,
        loop: asyncio.AbstractEventLoop,
        halt: threading.Event,
    ) -> None:
        self.spec = spec
        self.envelope = envelope
        self.loop = loop
        self.halt = halt
        self.lock = threading.Lock()
        self.thread_id: int | None = None
        self.given_up = False
        self.interrupted = False
        self.timer: asyncio.TimerHandle | None = None

    def __call__(self) -> None:
        with self.lock:
            if self.given_up or self.halt.is_set():
                return  # given up while waiting for a thread; its outcome is recorded
            self.thread_id = threading.get_ident()
        try:
            if self.spec.time_limit is not None:
                self.loop.call_soon_threadsafe(self._start_clock, time.monotonic())
            self.spec.run_sync(self.envelope)
        finally:
            with self.lock:
                tid, self.thread_id = self.thread_id, None
                if tid is not None:  # withdraw an interrupt sent too late to land
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), None)

    def interrupt(self, exception: type[Interrupt]) -> bool:
        """Raise ``exception`` in the handler's thread, once; whether it was sent."""
        with self.lock:
            if self.thread_id is None or self.interrupted:
                return False
            self.interrupted = True
            raise_thread_exception(self.thread_id, exception)  # type: ignore[no-untyped-call]
            return True

    def give_up(self) -> None:
        """Never start; interrupt with ``Shutdown`` if already running (on the loop)."""
        with self.lock:
            self.given_up = True
        self.stop_clock()
        self.interrupt(Shutdown)

    def stop_clock(self) -> None:
        """Cancel the pending time-limit check, if any (on the loop)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _start_clock(self, started: float) -> None:
        # On the loop, before the attempt's result: the thread asked first (FIFO).
        limit = self.spec.time_limit
        if limit is None or self.given_up:
            return
        delay = max(0.0, started + limit - time.monotonic())
        self.timer = self.loop.call_later(delay, self._time_up)

    def _time_up(self) -> None:
        self.timer = None
        if self.interrupt(TimeLimitExceeded):
            self.timer = self.loop.call_later(STUCK_WARNING_DELAY, self._warn_stuck)

    def _warn_stuck(self) -> None:
        self.timer = None
        logger.warning(
            "Handler %s passed its %gs time limit %gs ago and is still running: the "
            "interrupt lands when its blocking call (sleep, socket read, C code) returns.",
            self.spec.name,
            self.spec.time_limit,
            STUCK_WARNING_DELAY,
        )


class Dispatcher:
    """Runs the messages of a broker on one event loop.

    Parameters:
      broker: The broker whose actors and middleware are used (its ``enqueue``
        must hand messages back to :meth:`push`).
      loop: The application's event loop; every handler coroutine runs on it.
      max_concurrency: Handlers running at once.
      worker_threads: Threads for sync handlers.
      settle: Called on the loop with each message once its outcome is recorded
        (after the ``ack``/``nack`` middleware signals), by a backend whose broker
        keeps messages until told (Redis: the worker's in-flight list).  It must
        not block: hand the work to a thread.  With it, an attempt whose retry and
        dead letter could not be written is settled too (the backend hands it
        over again later), and a handler cancelled by :meth:`stop` is settled with
        its outcome.
      prepare: Called on the loop with each message before its middleware chain;
        returns None, or a blocking call to run in a thread first (a Redis worker
        takes a slot of a handler's concurrency limit there: waiting for one on the
        loop would stall the handlers that hold them).
    """

    def __init__(
        self,
        broker: dramatiq.Broker,
        loop: asyncio.AbstractEventLoop,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        worker_threads: int = DEFAULT_WORKER_THREADS,
        settle: Callable[[MessageProxy], None] | None = None,
        prepare: Callable[[MessageProxy], Callable[[], None] | None] | None = None,
    ) -> None:
        self.broker = broker
        self.settle = settle
        self.prepare = prepare
        self.loop = loop
        self.max_concurrency = max_concurrency
        self.accepting = True
        self._loop_thread = threading.get_ident()
        self._threads: list[threading.Thread] = []
        # Set when stop() gives up on in-flight work: no sync job starts from then on.
        self._halt = threading.Event()
        self._executor = ThreadPoolExecutor(
            worker_threads,
            thread_name_prefix="eventbus-handler",
            initializer=self._register_thread,
        )
        self._ready: deque[Message[Any] | MessageProxy] = deque()
        # Failed attempts that could not be recorded once stop() began.
        self._returned: list[Message[Any] | MessageProxy] = []
        self._delayed: dict[asyncio.TimerHandle, Message[Any] | MessageProxy] = {}
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

    def push(self, message: Message[Any] | MessageProxy, delay: int | None = None) -> None:
        """Accept ``message`` (or a broker's proxy of it, handed back to ``settle``),
        to run after ``delay`` milliseconds (thread-safe)."""
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

    def push_many(self, messages: list[MessageProxy]) -> None:
        """Accept ``messages`` to run now, in one hand-over to the loop (thread-safe)."""
        if threading.get_ident() != self._loop_thread:
            self.loop.call_soon_threadsafe(self.push_many, messages)
            return
        self._pending += len(messages)
        for message in messages:
            self._make_ready(message)

    def _make_ready(self, message: Message[Any] | MessageProxy) -> None:
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

    async def _process(self, message: Message[Any] | MessageProxy) -> None:
        broker = self.broker
        proxy = message if isinstance(message, MessageProxy) else MessageProxy(message)
        try:
            if self.prepare is not None:
                blocking = self.prepare(proxy)
                if blocking is not None:
                    await self.loop.run_in_executor(None, blocking)
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
            if self.settle is not None:
                self._settle(proxy, self.settle)
            raise
        except Exception as exc:
            proxy.stuff_exception(exc)
            broker.emit_after("process_message", proxy, exception=exc)
        if self.settle is not None:
            self._settle(proxy, self.settle)
            return
        if unrecorded(proxy):
            self._run_again_later(message)
            return
        signal = "nack" if proxy.failed else "ack"
        broker.emit_before(signal, proxy)
        broker.emit_after(signal, proxy)

    def _settle(self, proxy: MessageProxy, settle: Callable[[MessageProxy], None]) -> None:
        signal = "nack" if proxy.failed else "ack"
        self.broker.emit_before(signal, proxy)
        settle(proxy)
        self.broker.emit_after(signal, proxy)

    def _run_again_later(self, message: Message[Any] | MessageProxy) -> None:
        """Neither a retry nor a dead letter of ``message`` is written: run it again
        later rather than drop it (returned by :meth:`stop` once stopping)."""
        if not self.accepting:
            self._returned.append(message)
            return
        logger.warning(
            "Neither a retry nor a dead letter could be written for event %s of handler "
            "%s; it runs again in %gs.",
            message.message_id,
            message.actor_name,
            UNRECORDED_REDELIVERY_DELAY,
        )
        self.push(message, int(UNRECORDED_REDELIVERY_DELAY * 1000))

    async def _run_async_limited(self, spec: HandlerSpec, envelope: Any, limit: float) -> None:
        # The handler sees the timeout as CancelledError, a BaseException that
        # ``except Exception`` in its code cannot swallow (as on a dramatiq worker).
        try:
            async with asyncio.timeout(limit):
                await spec.run_async(envelope)
        except TimeoutError as exc:
            raise _timeout(spec, exc.__context__) from None

    async def _run_in_thread(self, spec: HandlerSpec, envelope: Any) -> None:
        job = ThreadJob(spec, envelope, self.loop, self._halt)
        try:
            # Cancelling this await also takes the job out of the pool's queue.
            await self.loop.run_in_executor(self._executor, _copy_context_run(job))
        except TimeLimitExceeded as exc:
            raise _timeout(spec, exc) from None
        except asyncio.CancelledError:
            job.give_up()
            raise
        finally:
            job.stop_clock()

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

    async def stop(self, timeout: float) -> list[Message[Any] | MessageProxy]:
        """Stop accepting, finish in-flight work within ``timeout``, release threads.

        Handlers still running when the bound passes are cancelled: async ones
        get CancelledError, sync ones dramatiq's ``Shutdown`` (a BaseException)
        and up to ``UNWIND_GRACE`` more seconds to unwind; a sync job still
        waiting for a thread never starts.

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
            self._halt.set()
            for task in list(self._running):
                task.cancel()
            await asyncio.gather(*self._running, return_exceptions=True)
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        undelivered.extend(self._returned)
        self._returned.clear()
        await self._shutdown_threads(deadline)
        return undelivered

    async def _shutdown_threads(self, deadline: float) -> None:
        threads = list(self._threads)
        self._executor.shutdown(wait=False, cancel_futures=True)
        deadline += UNWIND_GRACE
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(_THREAD_POLL)
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            logger.error("Sync handler threads still running at shutdown: %s", ", ".join(stuck))


def _copy_context_run(job: ThreadJob) -> Callable[[], None]:
    context = contextvars.copy_context()
    return lambda: context.run(job)


def _timeout(spec: HandlerSpec, interrupted: BaseException | None) -> HandlerTimeout:
    """The HandlerTimeout of an attempt, traced to where its handler was stopped."""
    error = HandlerTimeout(f"handler {spec.name} exceeded its {spec.time_limit:g}s time limit")
    if interrupted is None:
        return error
    return error.with_traceback(interrupted.__traceback__)
