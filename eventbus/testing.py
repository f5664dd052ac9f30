"""Test your app's events: run its handlers in the test, record what it published,
inject the faults production will meet.

:class:`EventBusTestKit` wraps an app's bus for the duration of a ``with`` block.
Whatever backend the app configured (Redis, Kafka, embedded), the bus runs on the
embedded backend meanwhile: no broker is needed, handlers run in the test's
process through the production middleware chain (retries, dead letters, metrics,
tracing), and the bus gets its backend back at the end.  Enter the kit *before*
the app starts::

    from fastapi.testclient import TestClient
    from eventbus.testing import EventBusTestKit

    def test_signup_sends_welcome():
        with EventBusTestKit(bus) as kit, TestClient(app) as client:
            client.post("/users", json={"user_id": 1, "email": "ada@example.org"})
            kit.drain()                                   # the handlers ran
            kit.assert_published(UserCreated, user_id=1)
            assert kit.handler(send_welcome).mock.call_count == 1

Handlers run after the endpoint returned, as in production: :meth:`~EventBusTestKit.drain`
(or ``await kit.adrain()`` in async tests) waits for them, and leaving the app or
the kit drains too.  A handler that fails for good (once its retry policy gives
up) re-raises its exception from ``drain()`` and at the end of the block;
``raise_errors=False`` keeps production's dead-letter behaviour instead.

Faults no other test broker offers: :meth:`~EventBusTestKit.deliver_twice`,
:meth:`~EventBusTestKit.crash_after` (the handler ran, then the event is
redelivered), :meth:`~EventBusTestKit.fail` (the first attempts fail) and
:meth:`~EventBusTestKit.delay`.

With an outbox (``publish(..., session=...)``), an event is recorded as published
when its transaction commits (never after a rollback), ``drain()`` waits for the
relay to send every outbox event committed in the kit, and an outbox event no
handler of the test process takes is recorded and its row sent, not kept.

``EventBusTestKit(bus, with_real=True)`` keeps the bus on its configured backend
(Redis, Kafka): the same assertions then check the real broker, ``drain()`` is the
backend's own drain, and the faults only the in-memory broker can make
(``deliver_twice``, ``crash_after``, ``delay``) raise a ``RuntimeError``.

Limits: handlers run in this process only if their modules are imported by the
test; a fault applies to events delivered after it is set; time is not faked
(a delay of 0.5 s takes 0.5 s).

One concept past ~500 lines: the test kit; its recording, fault injection and
assertions share one state per kit, fed by the two middlewares and the embedded
backend defined at the end of the module.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload
from unittest.mock import MagicMock

from dramatiq import Message, Middleware
from dramatiq.middleware import MiddlewareError

import eventbus.keys as keys
from eventbus.backends.base import CachedHooksBroker, OutgoingEvent
from eventbus.backends.embedded import EmbeddedBroker, SyncBackend
from eventbus.bus import EventBus
from eventbus.context import new_message_id
from eventbus.events import BaseEvent, decode_event
from eventbus.exceptions import EventDecodeError
from eventbus.registry import HandlerSpec
from eventbus.routing import Router, Subscriptions

if TYPE_CHECKING:
    import dramatiq
    from dramatiq.broker import MessageProxy

__all__ = [
    "DEFAULT_DRAIN_TIMEOUT",
    "EventBusTestKit",
    "HandlerCall",
    "HandlerFailure",
    "HandlerRecord",
    "InjectedFault",
    "kit_fixture",
]

E = TypeVar("E", bound=BaseEvent)

#: Seconds :meth:`EventBusTestKit.drain` waits, and the kit waits when the bus stops.
DEFAULT_DRAIN_TIMEOUT = 10.0

#: Seconds between looks at the outbox table while draining.
OUTBOX_POLL_INTERVAL = 0.02

#: Buses a kit is active on.
_active: weakref.WeakSet[EventBus] = weakref.WeakSet()

#: Message option of a redelivery made by ``crash_after``: how many so far.
REDELIVERY = "eventbus_test_redelivery"
#: Message option of the second delivery made by ``deliver_twice``.
DUPLICATE = "eventbus_test_duplicate"

#: Fields every event has; failure messages show the others.
_BASE_FIELDS = frozenset(BaseEvent.model_fields)

#: A handler as the kit's methods take it: the function, its spec or its name.
HandlerRef = object
#: Which events a fault applies to: an event class, a topic, or None for all.
EventFilter = type[BaseEvent] | str | None


# A MiddlewareError: raised from a ``before_process_message`` hook, it fails the
# attempt (dramatiq's brokers log and swallow any other exception raised there).
class InjectedFault(MiddlewareError):
    """The failure :meth:`EventBusTestKit.fail` makes an attempt end with.

    The handler does not run in that attempt; retries and dead letters treat it as
    if the handler had raised it.  ``fail(..., error=ConnectionError)`` raises a
    subclass of both, so retry policies that select exception types see a
    ``ConnectionError``.
    """


_injected_classes: dict[type[Exception], type[InjectedFault]] = {}


def _injected(error: type[Exception]) -> type[InjectedFault]:
    """An InjectedFault that is also an ``error`` (one class per type)."""
    if issubclass(error, InjectedFault):
        return error
    cls = _injected_classes.get(error)
    if cls is None:
        cls = type(f"Injected{error.__name__}", (InjectedFault, error), {})
        _injected_classes[error] = cls
    return cls


@dataclass(frozen=True, slots=True)
class HandlerCall:
    """One attempt of one handler on one event, as the kit saw it.

    Attributes:
      event: The event, decoded as the handler receives it.
      attempt: 1 for the first attempt of a delivery, 2 for its first retry...
        (a redelivery after a crash repeats the number of the run it repeats).
      message_id: The delivery's message id: a retry and a redelivery keep it, the
        second delivery of ``deliver_twice`` has its own.
      error: What the attempt raised; None when it succeeded.
      injected: ``kit.fail()`` failed this attempt: the handler did not run.
      redelivery: 0, or n for the n-th redelivery made by ``crash_after``.
      duplicate: This is the second delivery made by ``deliver_twice``.
      started, finished: ``time.monotonic()`` when the attempt started and ended.
    """

    event: BaseEvent
    attempt: int
    message_id: str
    error: BaseException | None = None
    injected: bool = False
    redelivery: int = 0
    duplicate: bool = False
    started: float = 0.0
    finished: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether the attempt succeeded."""
        return self.error is None


@dataclass(slots=True)
class HandlerRecord:
    """What one handler did while the kit was active.

    Attributes:
      name: The handler's name (its dramatiq actor).
      calls: Every attempt, in the order they finished.
      mock: A ``MagicMock`` called with the event each time the handler is about
        to run (not for attempts ``kit.fail()`` failed): ``assert_called_once()``,
        ``call_args``...  Something it raises (``side_effect``) fails the attempt
        as an :class:`InjectedFault` caused by it.
    """

    name: str
    calls: list[HandlerCall] = field(default_factory=list)
    mock: MagicMock = field(default_factory=MagicMock)

    @property
    def events(self) -> list[BaseEvent]:
        """The events of the attempts that succeeded, in order."""
        return [call.event for call in self.calls if call.error is None]


@dataclass(frozen=True, slots=True)
class HandlerFailure:
    """A delivery that failed for good (its retry policy gave up), or deliveries
    still pending when the bus stopped (``handler`` None, ``exception`` a
    TimeoutError)."""

    handler: str | None
    event: BaseEvent | None
    attempts: int
    exception: BaseException


@dataclass(frozen=True, slots=True)
class _Fault:
    kind: Literal["twice", "crash", "fail", "delay"]
    event: EventFilter
    handler: HandlerRef | None
    times: int = 1
    seconds: float = 0.0
    error: type[InjectedFault] = InjectedFault

    def matches(self, spec: HandlerSpec, event: BaseEvent) -> bool:
        if self.handler is not None and not spec.matches(self.handler):
            return False
        if self.event is None:
            return True
        if isinstance(self.event, str):
            return event.topic == self.event
        return isinstance(event, self.event)


class EventBusTestKit:
    """Runs an app's bus in the test: handlers in-process, publishes recorded, faults
    injected on demand.

    Use it as ``with EventBusTestKit(bus) as kit:`` (or ``async with``) around the
    block that starts the app (``TestClient(app)``, the app's lifespan), or through
    :func:`kit_fixture`.  For the block's duration the bus runs on the embedded
    backend whatever it was configured with, with a fresh in-memory ``bus.dlq``;
    everything is restored at the end.  The bus must not be running when the kit
    is entered.

    Parameters:
      bus: The app's bus.
      raise_errors: Re-raise, from :meth:`drain` / :meth:`adrain` and at the end of
        the block, the exception of each delivery that failed for good (after its
        retry policy gave up).  With False, failures only become dead letters in
        ``bus.dlq``, as in production; :attr:`failures` lists them either way.
      backoff: Wait the retry policy's delays between attempts.  By default retries
        run at once: the number of attempts is production's, the waiting is not.
      drain_timeout: Seconds :meth:`drain` waits by default, and the kit waits for
        pending deliveries when the bus stops.
      with_real: Keep the bus on its own backend (Redis, Kafka) and its dead-letter
        store, as FastStream's ``TestRedisBroker(broker, with_real=True)``: publishes
        are recorded as they reach the real broker, handlers running in this process
        (``EVENTBUS_CONSUME=true`` or ``bus.start(consume=True)``) are recorded and
        take :meth:`fail`, and :meth:`drain` waits for the backend's queues (on Redis,
        whichever process consumes them).

    With an outbox on the bus, events published with ``session=`` are recorded when
    their transaction commits and :meth:`drain` waits for its relay (see the module
    docstring).

    ``EventBusTestKit(bus, raise_errors=False, backoff=True)`` fails as production
    does.
    """

    def __init__(
        self,
        bus: EventBus,
        *,
        raise_errors: bool = True,
        backoff: bool = False,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        with_real: bool = False,
    ) -> None:
        self.bus = bus
        self.with_real = with_real
        self.raise_errors = raise_errors
        self.backoff = backoff
        self.drain_timeout = drain_timeout
        #: Deliveries that failed for good, in order.
        self.failures: list[HandlerFailure] = []
        self._raised = 0
        self._published: list[BaseEvent] = []
        self._records: dict[str, HandlerRecord] = {}
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self._backend: _TestBackend | None = None
        self._restore_bus: Callable[[], None] | None = None
        # Per message id, on the bus's loop: the attempt in progress, crashes
        # injected, the second delivery held until the first is done.
        self._running: dict[str, HandlerCall] = {}
        self._crashes: dict[str, int] = {}
        self._held: dict[str, Message[Any]] = {}
        # The outbox: events written per open transaction (by its sync connection),
        # the event ids committed in this kit and those the relay is done with.
        self._uncommitted: weakref.WeakKeyDictionary[Any, list[tuple[str, BaseEvent]]] = (
            weakref.WeakKeyDictionary()
        )
        self._committed: dict[str, None] = {}
        self._relayed: set[str] = set()
        # With ``with_real``: the loop the bus runs on, the kit's middlewares on the
        # bus's own broker, and what to undo on leaving.
        self._bus_loop: asyncio.AbstractEventLoop | None = None
        self._undo: list[Callable[[], None]] = []

    # -- entering and leaving ------------------------------------------------------

    def __enter__(self) -> EventBusTestKit:
        self._install()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self.bus.started:
                self._on_loop(self.bus.stop, "leaving the kit")
        finally:
            self._restore()
        if exc_type is None:
            self._raise_failures()

    async def __aenter__(self) -> EventBusTestKit:
        self._install()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self.bus.started:
                await self._aon_loop(self.bus.stop)
        finally:
            self._restore()
        if exc_type is None:
            self._raise_failures()

    def _install(self) -> None:
        bus = self.bus
        if bus in _active:
            raise RuntimeError("an EventBusTestKit is already active on this bus")
        if bus.started:
            raise RuntimeError(
                "the bus is already running: enter the kit before the app starts, "
                "`with EventBusTestKit(bus) as kit, TestClient(app) as client:`"
            )
        if self.with_real:
            self._install_real()
        else:
            self._install_embedded()
        self._install_outbox()
        _active.add(bus)

    def _install_embedded(self) -> None:
        bus = self.bus
        backend = _TestBackend(
            self,
            max_concurrency=bus.settings.max_concurrency,
            worker_threads=bus.settings.worker_threads,
        )
        # The production chain on a fresh dead-letter store, between the kit's two;
        # drain while the bus still runs (handlers finishing may still publish).
        self._restore_bus = bus.run_on(
            backend,
            outer=[_Outcomes(self)],
            inner=[_Injections(self)],
            before_stop=self._drain_before_stop,
        )
        self._backend = backend

    def _install_real(self) -> None:
        """Keep the bus's own backend and broker: add the kit's two middlewares to
        its chain, record what its backend publishes, and note the bus's loop."""
        bus = self.bus
        backend, broker = bus.backend, bus.broker
        if not isinstance(broker, CachedHooksBroker):
            raise TypeError(
                f"EventBusTestKit(with_real=True) cannot attach to the {backend.name} "
                f"backend's broker ({type(broker).__name__}); use EventBusTestKit(bus)"
            )
        outcomes, injections = _Outcomes(self), _Injections(self)
        broker.add_middleware(outcomes, before=type(broker.middleware[0]))
        broker.add_middleware(injections)
        self._undo.append(lambda: broker.remove_middleware(outcomes))
        self._undo.append(lambda: broker.remove_middleware(injections))
        publish, start = backend.publish, backend.start

        async def recording_publish(
            events: list[OutgoingEvent], *, strict: bool = False
        ) -> set[str]:
            unrouted = await publish(events, strict=strict)
            self._on_published(events)
            return unrouted

        async def noting_start(consume: bool) -> None:
            self._bus_loop = asyncio.get_running_loop()
            await start(consume)

        # Instance attributes over the class's methods, deleted on leaving.
        setattr(backend, "publish", recording_publish)  # noqa: B010
        setattr(backend, "start", noting_start)  # noqa: B010
        self._undo.append(lambda: delattr(backend, "publish"))
        self._undo.append(lambda: delattr(backend, "start"))
        # The bus's own dead-letter store; the kit drains before the bus stops.
        self._restore_bus = bus.run_on(
            backend, dead_letter_store=bus.dlq.store, before_stop=self._drain_before_stop
        )

    def _install_outbox(self) -> None:
        """Record the events written to the bus's outbox when their transaction commits."""
        outbox = self.bus.outbox
        if outbox is None:
            return
        hook = self._on_outbox_write
        outbox.write_hooks.append(hook)
        self._undo.append(lambda: outbox.write_hooks.remove(hook))

    async def _drain_before_stop(self) -> None:
        """Run by ``bus.stop()`` while the kit is active: drain everything first."""
        if self.bus.started:
            try:
                await self._drain_all(self.drain_timeout)
            except (TimeoutError, RuntimeError) as exc:
                self._on_failure(HandlerFailure(None, None, 0, exc))

    def _restore(self) -> None:
        _active.discard(self.bus)
        undo, self._undo = self._undo, []
        for step in reversed(undo):
            step()
        if self._restore_bus is not None:
            self._restore_bus()
            self._restore_bus = None

    # -- waiting for handlers --------------------------------------------------------

    def drain(self, timeout: float | None = None) -> None:
        """Wait until every event published so far is handled or dead-lettered, then
        re-raise the first new failure (unless ``raise_errors=False``).

        Outbox events committed in the kit are waited for too: first until the relay
        sent their rows, then until their handlers are done (and again for what those
        handlers publish).  With ``with_real=True`` this is the backend's own drain.

        For tests that run the app in another thread (``with TestClient(app)``); in
        ``async def`` tests use :meth:`adrain`.  Does nothing but re-raise when the
        bus is not running.

        Raises:
          TimeoutError: Deliveries still pending after ``timeout`` seconds
            (default ``drain_timeout``).
          RuntimeError: Called on the event loop the bus runs on, or outbox events
            wait and no relay runs in this process.
        """
        if self.bus.started:
            limit = self.drain_timeout if timeout is None else timeout
            self._on_loop(lambda: self._drain_all(limit), "kit.drain()")
        self._raise_failures()

    async def adrain(self, timeout: float | None = None) -> None:
        """:meth:`drain` for ``async def`` tests (``httpx.AsyncClient``)."""
        if self.bus.started:
            limit = self.drain_timeout if timeout is None else timeout
            await self._aon_loop(lambda: self._drain_all(limit))
        self._raise_failures()

    async def _drain_all(self, timeout: float) -> None:
        """On the bus's loop: the relay sent every outbox event committed in this kit,
        and the backend delivered everything; again while handlers add more."""
        deadline = time.monotonic() + timeout
        while True:
            await self._wait_outbox(deadline)
            await self.bus.backend.drain(max(0.0, deadline - time.monotonic()))
            # A real broker can count a message done before the kit's last hook
            # recorded its attempt (Kafka commits from another task).
            while self._running and time.monotonic() < deadline:  # noqa: ASYNC110 (set by threads)
                await asyncio.sleep(OUTBOX_POLL_INTERVAL)
            if not self._outstanding():
                return

    def _outstanding(self) -> list[str]:
        with self._lock:
            return [i for i in self._committed if i not in self._relayed]

    async def _wait_outbox(self, deadline: float) -> None:
        """Wait until no outbox row of an event committed in this kit is pending."""
        outbox = self.bus.outbox
        ids = self._outstanding()
        if outbox is None or not ids:
            return
        while True:
            relay = outbox.relay
            if relay is None or not relay.running:
                raise RuntimeError(
                    f"kit.drain(): {len(ids)} outbox event(s) committed in this test wait "
                    "for the outbox relay, and none runs in this process (Outbox(bus, "
                    "engine) with relay=True starts one with the bus; "
                    "EVENTBUS_OUTBOX_RELAY=false turns it off)"
                )
            relay.wake()
            pending = await outbox.pending_events(ids)
            with self._lock:
                self._relayed.update(i for i in ids if i not in pending)
            ids = [i for i in ids if i in pending]
            if not ids:
                return
            if time.monotonic() >= deadline:
                why = f"; the relay's last error: {relay.last_error}" if relay.last_error else ""
                if relay.unrouted:  # with_real: the real backend has no subscription yet
                    why += f"; no subscription handles {', '.join(sorted(relay.unrouted))} yet"
                raise TimeoutError(
                    f"{len(ids)} outbox event(s) committed in this test were not relayed "
                    f"in time (first: {ids[0]}){why}"
                )
            await asyncio.sleep(OUTBOX_POLL_INTERVAL)

    def _loop(self) -> asyncio.AbstractEventLoop | None:
        if self.with_real:
            return self._bus_loop
        backend = self._backend
        dispatcher = backend.dispatcher if backend is not None else None
        return dispatcher.loop if dispatcher is not None else None

    def _on_loop(self, call: Callable[[], Coroutine[Any, Any, None]], what: str) -> None:
        """Run the coroutine ``call()`` makes on the bus's loop, from another thread."""
        loop = self._loop()
        if loop is None:
            return
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if current is loop:
            raise RuntimeError(
                f"{what} would block the event loop the bus runs on: in async tests use "
                "`async with EventBusTestKit(bus)` and `await kit.adrain()`"
            )
        if not loop.is_running():
            raise RuntimeError(
                f"{what}: the event loop the bus runs on is not running; stop the app "
                "first (leave `with TestClient(app)` or the lifespan), or await kit.adrain() "
                "inside the async test"
            )
        asyncio.run_coroutine_threadsafe(call(), loop).result()

    async def _aon_loop(self, call: Callable[[], Coroutine[Any, Any, None]]) -> None:
        loop = self._loop()
        if loop is None:
            return
        if loop is asyncio.get_running_loop():
            await call()
        else:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call(), loop))

    def _raise_failures(self) -> None:
        with self._lock:
            new = self.failures[self._raised :]
            self._raised = len(self.failures)
        if not new or not self.raise_errors:
            return
        first = new[0]
        error = first.exception
        if first.handler is not None:
            event = first.event
            what = f"{type(event).__name__} {event.event_id}" if event else "an event"
            error.add_note(
                f"eventbus.testing: handler {first.handler} failed on {what} after "
                f"{first.attempts} attempt(s); EventBusTestKit(raise_errors=False) keeps it "
                "as a dead letter in bus.dlq instead"
            )
        if len(new) > 1:
            others = ", ".join(f.handler or "pending deliveries" for f in new[1:])
            error.add_note(f"eventbus.testing: {len(new) - 1} more failure(s): {others}")
        raise error

    # -- what was published ------------------------------------------------------------

    @overload
    def published(self, event: type[E]) -> list[E]: ...
    @overload
    def published(self, event: str | None = None) -> list[BaseEvent]: ...
    def published(self, event: type[BaseEvent] | str | None = None) -> list[Any]:
        """The events published so far (by endpoints and by handlers), in order,
        decoded as a consumer receives them (metadata included).

        Parameters:
          event: Only instances of this class, or only events of this topic.
        """
        with self._lock:
            events = list(self._published)
        if event is None:
            return events
        if isinstance(event, str):
            return [e for e in events if e.topic == event]
        return [e for e in events if isinstance(e, event)]

    @overload
    def assert_published(self, event: type[E], /, **fields: Any) -> E: ...
    @overload
    def assert_published(self, event: str, /, **fields: Any) -> BaseEvent: ...
    def assert_published(self, event: type[BaseEvent] | str, /, **fields: Any) -> BaseEvent:
        """Assert that an event of this class (or topic) with these field values was
        published; return the first one that matches.

        Example::

            created = kit.assert_published(UserCreated, user_id=1)
            assert created.metadata["correlation_id"] == "req-1"

        Raises:
          AssertionError: None matches; the message lists, for each event of that
            class, the fields that differ.
          TypeError: A field the class does not have.
        """
        _check_fields(event, fields)
        candidates = self.published(event)
        for candidate in candidates:
            if not _differences(candidate, fields):
                return candidate
        wanted = _describe(event, fields)
        if not candidates:
            raise AssertionError(f"{wanted} was not published: {self._summary()}")
        lines = [f"{wanted} was not published; the {len(candidates)} published differ:"]
        for i, candidate in enumerate(candidates, 1):
            diffs = ", ".join(
                f"{name}={actual!r} (expected {expected!r})"
                for name, actual, expected in _differences(candidate, fields)
            )
            lines.append(f"  #{i} {type(candidate).__name__} {candidate.event_id}: {diffs}")
        raise AssertionError("\n".join(lines))

    def assert_not_published(self, event: type[BaseEvent] | str, /, **fields: Any) -> None:
        """Assert that no event of this class (or topic) with these field values was
        published (with no fields: none at all).

        Raises:
          AssertionError: One was; the message shows each.
          TypeError: A field the class does not have.
        """
        _check_fields(event, fields)
        found = [e for e in self.published(event) if not _differences(e, fields)]
        if found:
            shown = "\n".join(f"  #{i} {_show(e)}" for i, e in enumerate(found, 1))
            raise AssertionError(
                f"{_describe(event, fields)} was published {len(found)} time(s):\n{shown}"
            )

    def _summary(self) -> str:
        events = self.published()
        if not events:
            return "nothing was published"
        counts: dict[str, int] = {}
        for e in events:
            counts[type(e).__name__] = counts.get(type(e).__name__, 0) + 1
        return "published: " + ", ".join(f"{n} x{c}" for n, c in counts.items())

    # -- what handlers did ------------------------------------------------------------

    def handler(self, handler: HandlerRef) -> HandlerRecord:
        """The record of ``handler`` (its function, spec or name): its calls and mock.

        Example::

            welcome = kit.handler(send_welcome)
            welcome.mock.assert_called_once()
            assert [c.attempt for c in welcome.calls] == [1, 2]

        Raises:
          LookupError: It is not a handler of this bus, or the function handles
            several topics (pass the name then).
        """
        specs = self._specs(handler)
        if len(specs) > 1:
            names = ", ".join(s.name for s in specs)
            raise LookupError(f"{handler!r} handles several topics; pass one name: {names}")
        return self._record(specs[0].name)

    def _specs(self, handler: HandlerRef) -> list[HandlerSpec]:
        specs = [s for s in self.bus.registry.all_handlers() if s.matches(handler)]
        if not specs:
            names = [s.name for s in self.bus.registry.all_handlers()]
            known = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if names[10:] else "")
            raise LookupError(
                f"{handler!r} is not a handler of this bus (handlers: {known or 'none'})"
            )
        return specs

    def _record(self, name: str) -> HandlerRecord:
        with self._lock:
            record = self._records.get(name)
            if record is None:
                record = self._records[name] = HandlerRecord(name, mock=MagicMock(name=name))
            return record

    # -- faults -----------------------------------------------------------------------

    def deliver_twice(
        self, event: EventFilter = None, *, handler: HandlerRef | None = None
    ) -> None:
        """Deliver each matching event twice to each matching handler.

        The second delivery is a message of its own (new message id, its own retry
        budget, the same ``event_id``), released once the first is done, succeeded
        or dead-lettered.  A handler that is idempotent on ``event.event_id`` does its
        work once.

        Parameters:
          event: An event class or a topic (default: every event).
          handler: Only for this handler (default: every handler).
        """
        self._broker_only("deliver_twice")
        self._add(_Fault("twice", event, self._checked(handler)))

    def crash_after(
        self, event: EventFilter = None, *, handler: HandlerRef | None = None, times: int = 1
    ) -> None:
        """Crash after the handler ran: its successful attempt is not acknowledged,
        and the same message is delivered again (``times`` times), as a broker does
        when a worker dies before its ack.

        The handler runs ``times + 1`` times per event; each redelivery starts after
        the previous run finished.  Metrics count the runs as successes.
        """
        _positive("times", times)
        self._broker_only("crash_after")
        self._add(_Fault("crash", event, self._checked(handler), times=times))

    def fail(
        self,
        event: EventFilter = None,
        *,
        handler: HandlerRef | None = None,
        times: int = 1,
        error: type[Exception] = InjectedFault,
    ) -> None:
        """Fail the first ``times`` attempts of every matching delivery, before the
        handler runs; retries and dead letters follow the handler's retry policy.

        With the default policy (3 retries), ``times=3`` succeeds on the last attempt
        and ``times=4`` dead-letters the event (and re-raises, unless
        ``raise_errors=False``).

        Parameters:
          error: The exception type the attempts fail with; the kit raises a subclass
            of it and of :class:`InjectedFault`.
        """
        _positive("times", times)
        fault = _Fault("fail", event, self._checked(handler), times=times, error=_injected(error))
        self._add(fault)

    def delay(
        self, event: EventFilter = None, *, handler: HandlerRef | None = None, seconds: float
    ) -> None:
        """Hold each matching delivery ``seconds`` before its first attempt (publish
        returns at once; retries are not delayed further)."""
        if seconds <= 0:
            raise ValueError(f"seconds must be > 0, got {seconds}")
        self._broker_only("delay")
        self._add(_Fault("delay", event, self._checked(handler), seconds=seconds))

    def clear_faults(self) -> None:
        """Deliver normally from now on (deliveries already held keep their fault)."""
        with self._lock:
            self._faults = []

    def _broker_only(self, method: str) -> None:
        if self.with_real:
            raise RuntimeError(
                f"kit.{method}() needs the kit's in-memory broker, which decides every "
                "delivery; with with_real=True the real broker delivers. Test it with "
                "EventBusTestKit(bus) (kit.fail() works in both modes)"
            )

    def _checked(self, handler: HandlerRef | None) -> HandlerRef | None:
        if handler is not None:
            self._specs(handler)
        return handler

    def _add(self, fault: _Fault) -> None:
        with self._lock:
            self._faults = [*self._faults, fault]

    def _fault(self, kind: str, spec: HandlerSpec, event: BaseEvent) -> _Fault | None:
        for fault in self._faults:
            if fault.kind == kind and fault.matches(spec, event):
                return fault
        return None

    # -- called by the backend and middleware, on the bus's loop ------------------------

    def _on_published(self, events: list[OutgoingEvent]) -> None:
        """Record ``events``; those the outbox relay sends were recorded at commit."""
        with self._lock:
            committed = self._committed
            relayed = [o.event.event_id for o in events if o.event.event_id in committed]
            self._relayed.update(relayed)
            fresh = [o for o in events if o.event.event_id not in committed]
        decoded = [decode_event(o.envelope, type(o.event)) for o in fresh]
        with self._lock:
            self._published.extend(decoded)

    def _is_relayed(self, event_id: str) -> bool:
        with self._lock:
            return event_id in self._committed

    async def _on_outbox_write(self, session: Any, events: list[OutgoingEvent]) -> None:
        """The outbox wrote ``events`` in ``session``'s transaction: record them when
        it commits, forget them when it rolls back."""
        from sqlalchemy import event as sa_event
        from sqlalchemy.ext.asyncio import AsyncSession

        conn = await session.connection() if isinstance(session, AsyncSession) else session
        sync = conn.sync_connection
        outbox = self.bus.outbox
        table = outbox.table.fullname if outbox is not None else "eventbus_outbox"
        decoded = [(table, decode_event(o.envelope, type(o.event))) for o in events]
        for name, fn in (("commit", self._on_commit), ("rollback", self._on_rollback)):
            if not sa_event.contains(sync, name, fn):  # once per connection; never removed
                sa_event.listen(sync, name, fn)  # (removing one inside a commit breaks it)
        with self._lock:
            self._uncommitted.setdefault(sync, []).extend(decoded)

    def _on_commit(self, sync: Any) -> None:
        """The transaction commits: record its outbox events whose rows it holds (a
        row written in a savepoint rolled back since is not there)."""
        from sqlalchemy import text
        from sqlalchemy.exc import SQLAlchemyError

        with self._lock:
            written = self._uncommitted.pop(sync, [])
        if not written:
            return
        kept: set[str] = set()
        for table in {table for table, _ in written}:
            ids = [e.event_id for t, e in written if t == table]
            query = text(f"SELECT event_id FROM {table} WHERE event_id = ANY(CAST(:ids AS text[]))")
            try:  # still in the transaction: the commit event comes before the COMMIT
                kept.update(sync.execute(query, {"ids": ids}).scalars())
            except SQLAlchemyError:  # an aborted transaction: its COMMIT rolls back
                return
        events = [e for _, e in written if e.event_id in kept]
        with self._lock:
            self._published.extend(events)
            self._committed.update(dict.fromkeys(e.event_id for e in events))

    def _on_rollback(self, sync: Any) -> None:
        with self._lock:
            self._uncommitted.pop(sync, None)

    def _on_failure(self, failure: HandlerFailure) -> None:
        with self._lock:
            self.failures.append(failure)


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_fields(event: type[BaseEvent] | str, fields: dict[str, Any]) -> None:
    if isinstance(event, str):
        return
    unknown = [name for name in fields if name not in event.model_fields]
    if unknown:
        raise TypeError(
            f"{event.__name__} has no field {', '.join(map(repr, unknown))} "
            f"(its fields: {', '.join(event.model_fields)})"
        )


_MISSING = object()


def _differences(event: BaseEvent, fields: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(name, actual, expected) of each field of ``event`` that differs."""
    diffs = []
    for name, expected in fields.items():
        actual = getattr(event, name, _MISSING)
        if actual is _MISSING or actual != expected:
            diffs.append((name, "<missing>" if actual is _MISSING else actual, expected))
    return diffs


def _describe(event: type[BaseEvent] | str, fields: dict[str, Any]) -> str:
    name = event.__name__ if isinstance(event, type) else f"an event of topic {event!r}"
    if not fields:
        return name
    return f"{name} with " + ", ".join(f"{k}={v!r}" for k, v in fields.items())


def _show(event: BaseEvent) -> str:
    own = {k: v for k, v in event if k not in _BASE_FIELDS}
    shown = ", ".join(f"{k}={v!r}" for k, v in own.items())
    return f"{type(event).__name__}({shown}) event_id={event.event_id}"


def _spec_and_event(
    broker: dramatiq.Broker, message: Message[Any] | MessageProxy
) -> tuple[HandlerSpec, BaseEvent] | None:
    actor = broker.actors.get(message.actor_name)
    spec: HandlerSpec | None = actor.options.get(keys.HANDLER) if actor is not None else None
    if spec is None or not message.args:
        return None
    try:
        return spec, decode_event(message.args[0], spec.event_type)
    except EventDecodeError:
        return None


class _TestBroker(EmbeddedBroker):
    """The embedded broker, applying the kit's delivery faults and retry timing."""

    def __init__(self, kit: EventBusTestKit, middleware: list[Middleware]) -> None:
        super().__init__(middleware)
        self.kit = kit

    def enqueue(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        kit = self.kit
        options = message.options
        if keys.ATTEMPTS in options or REDELIVERY in options:  # a retry or a redelivery
            return super().enqueue(message, delay=delay if kit.backoff else None)
        found = _spec_and_event(self, message) if kit._faults else None
        if found is not None:
            spec, event = found
            late = kit._fault("delay", spec, event)
            if late is not None:
                delay = int(late.seconds * 1000)
            if DUPLICATE not in options and kit._fault("twice", spec, event) is not None:
                second = message.copy(message_id=new_message_id(), options={DUPLICATE: True})
                kit._held[message.message_id] = second
        return super().enqueue(message, delay=delay)


class _TestBackend(SyncBackend):
    """The embedded backend, recording what is published."""

    def __init__(self, kit: EventBusTestKit, max_concurrency: int, worker_threads: int) -> None:
        super().__init__(max_concurrency=max_concurrency, worker_threads=worker_threads)
        self.kit = kit

    def bind(self, middleware: list[Middleware], subscriptions: Subscriptions) -> dramatiq.Broker:
        if self.broker is None:
            self.broker = _TestBroker(self.kit, middleware)
            self.router = Router(subscriptions, self.broker, subscriptions.queue_of)
        return self.broker

    async def publish(self, events: list[OutgoingEvent], *, strict: bool = False) -> set[str]:
        """Deliver ``events`` and record them.  An outbox event the relay sends, of a
        topic no handler of this process subscribes, counts as delivered: it was
        recorded as published at commit, and the relay deletes its row as sent."""
        kit, router = self.kit, self._require_router()
        deliver = [
            o for o in events if router.actors(o.topic) or not kit._is_relayed(o.event.event_id)
        ]
        unrouted = await super().publish(deliver, strict=strict) if deliver else set()
        kit._on_published(events)
        return unrouted


class _Injections(Middleware):
    """Last in the chain: starts each attempt's record, fails injected attempts,
    calls the handler's mock."""

    def __init__(self, kit: EventBusTestKit) -> None:
        self.kit = kit

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        kit = self.kit
        found = _spec_and_event(broker, message)
        if found is None:
            return
        spec, event = found
        options = message.options
        attempt = int(options.get(keys.ATTEMPTS, 0)) + 1
        call = HandlerCall(
            event=event,
            attempt=attempt,
            message_id=message.message_id,
            redelivery=int(options.get(REDELIVERY, 0)),
            duplicate=bool(options.get(DUPLICATE, False)),
            started=time.monotonic(),
        )
        kit._running[message.message_id] = call
        fault = kit._fault("fail", spec, event)
        if fault is not None and attempt <= fault.times:
            raise fault.error(
                f"injected failure of {spec.name}: attempt {attempt} of the first {fault.times}"
            )
        try:
            kit._record(spec.name).mock(event)
        except Exception as exc:
            raise InjectedFault(f"the mock of {spec.name} raised {exc!r}") from exc


class _Outcomes(Middleware):
    """First in the chain, so its ``after_`` hooks run last, once retries decided:
    records each attempt and failure, redelivers after injected crashes, releases
    held second deliveries."""

    def __init__(self, kit: EventBusTestKit) -> None:
        self.kit = kit

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        kit = self.kit
        call = kit._running.pop(message.message_id, None)
        if call is not None:
            injected = isinstance(exception, InjectedFault)
            call = replace(call, error=exception, injected=injected, finished=time.monotonic())
            kit._record(message.actor_name).calls.append(call)
        if exception is None:
            if call is not None and self._crash(broker, message, call):
                return  # redelivered: not done yet
        elif not message.failed:
            return  # a retry is scheduled
        else:
            event = call.event if call is not None else None
            attempts = int(message.options.get(keys.ATTEMPTS, 0)) + 1
            kit._on_failure(HandlerFailure(message.actor_name, event, attempts, exception))
        self._done(broker, message)

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        self.kit._running.pop(message.message_id, None)
        self._done(broker, message)

    def _crash(self, broker: dramatiq.Broker, message: MessageProxy, call: HandlerCall) -> bool:
        kit = self.kit
        spec_event = _spec_and_event(broker, message)
        if spec_event is None:
            return False
        fault = kit._fault("crash", *spec_event)
        crashes = kit._crashes.get(message.message_id, 0)
        if fault is None or crashes >= fault.times:
            kit._crashes.pop(message.message_id, None)
            return False
        kit._crashes[message.message_id] = crashes + 1
        broker.enqueue(message.copy(options={REDELIVERY: crashes + 1}))
        return True

    def _done(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        second = self.kit._held.pop(message.message_id, None)
        if second is not None:
            broker.enqueue(second)


def kit_fixture(
    bus: EventBus, *, name: str | None = None, **options: Any
) -> Callable[..., Iterator[EventBusTestKit]]:
    """A pytest fixture that wraps each test in ``EventBusTestKit(bus, **options)``.

    In ``conftest.py``::

        from eventbus.testing import kit_fixture
        from myapp.main import app, bus

        kit = kit_fixture(bus)

        @pytest.fixture
        def client(kit):                   # the kit first: it must see the app start
            with TestClient(app) as client:
                yield client

    A handler failure nobody drained is raised at the test's teardown.

    Parameters:
      name: The fixture's name (default: the name you assign it to).
      options: Passed to :class:`EventBusTestKit`.
    """
    import pytest

    def fixture() -> Iterator[EventBusTestKit]:
        with EventBusTestKit(bus, **options) as kit:
            yield kit

    return pytest.fixture(fixture, name=name)
