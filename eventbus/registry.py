"""Handlers: the ``@on_event`` decorator, handler specs and the per-bus registry.

Each (topic, handler) pair becomes one dramatiq actor named by its
:attr:`HandlerSpec.name`, so a failing handler is retried alone.  Decorated
handlers live in a process-wide list that is only ever read, never consumed:
every bus in the process sees them.

A handler's signature is checked when it is registered: the event comes first,
every other parameter is a FastAPI-style dependency (see :mod:`eventbus.dependencies`).
"""

from __future__ import annotations

import asyncio
import inspect
import re
import threading
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

from eventbus.context import correlation_id_var, current_event_var, get_current_event
from eventbus.dependencies import DependencyOverrides, HandlerDependencies, handler_dependencies
from eventbus.events import CORRELATION_ID, BaseEvent, decode_event
from eventbus.exceptions import ConfigurationError

if TYPE_CHECKING:
    from eventbus.middleware.retries import RetryPolicy

#: A handler: takes the event first, then its dependencies (by keyword).
Handler = Callable[..., Awaitable[None]] | Callable[..., None]
F = TypeVar("F", bound=Callable[..., Any])

#: Valid queue names (dramatiq's rule).
QUEUE_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9._-]*")
#: Valid topic names: printable, no whitespace, at most 249 characters (Kafka's limit).
TOPIC_NAME = re.compile(r"[A-Za-z0-9._:/@+-]{1,249}")
#: Longest handler (actor) name.
MAX_NAME_LENGTH = 512
#: Seconds a sync handler's thread waits for a free slot of its concurrency limit
#: at a time before checking again (so that an interrupt can land meanwhile).
LIMIT_WAIT_SLICE = 0.05

__all__ = ["HandlerRegistry", "HandlerSpec", "get_current_event", "make_spec", "on_event"]


def validate_topic(topic: object) -> str:
    """Topics are 1-249 letters, digits or ``. _ : / @ + -`` (Kafka's limit and more)."""
    if not isinstance(topic, str) or not TOPIC_NAME.fullmatch(topic):
        raise ConfigurationError(
            f"invalid topic {topic!r}: use 1-249 letters, digits or . _ : / @ + -"
        )
    return topic


def validate_queue(queue: object) -> str:
    """Return ``queue`` if it is a valid dramatiq queue name, else raise ConfigurationError."""
    if not isinstance(queue, str) or not QUEUE_NAME.fullmatch(queue):
        raise ConfigurationError(
            f"invalid queue name {queue!r}: start with a letter or _, then letters, "
            "digits, '.', '_' or '-'"
        )
    return queue


class LocalLimit:
    """At most ``limit`` runs at once of one handler in this process.

    Async handlers wait on an ``asyncio.Semaphore`` of the loop they run on (a
    handler runs on one loop per process: the application's, or a worker's); sync
    ones on a thread semaphore, in slices so that a time limit or a shutdown
    interrupt lands while they wait.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._threads = threading.BoundedSemaphore(limit)
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        semaphore = self._loops.get(loop)
        if semaphore is None:
            semaphore = self._loops[loop] = asyncio.Semaphore(self.limit)
        return semaphore

    async def run_async(self, call: Callable[[], Awaitable[None]]) -> None:
        """Await ``call()`` once a slot is free."""
        async with self._semaphore():
            await call()

    def run_sync(self, call: Callable[[], None]) -> None:
        """Run ``call()`` once a slot is free (blocking this thread meanwhile)."""
        while not self._threads.acquire(timeout=LIMIT_WAIT_SLICE):
            pass
        try:
            call()
        finally:
            self._threads.release()


def _is_async(fn: Callable[..., Any]) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - callable objects with async __call__
    return call is not None and inspect.iscoroutinefunction(call)


@dataclass(frozen=True, eq=False)
class HandlerSpec:
    """One handler of one topic, and how to run it.

    Attributes:
      topic: The topic it handles.
      fn: The handler, ``async def`` or plain ``def`` taking the event (then its
        dependencies).
      name: The dramatiq actor name: stable and unique per bus.
      queue: The dramatiq queue, or None for the bus's default queue.
      event_type: When set, every payload is validated into this class.
      max_retries: Overrides the bus policy's ``max_retries``.
      time_limit: Seconds an attempt may run before it fails with HandlerTimeout.
      retry: A whole retry policy for this handler (wins over ``max_retries``).
      ordered: On a keyed backend (Kafka), events with the same partition key reach
        this handler one after another, each once the previous one succeeded or was
        dead-lettered.  Other backends ignore it.
      concurrency: At most this many runs of the handler at once: across every
        worker of the service on Redis, in each process on the embedded and Kafka
        backends; None: no limit.
      limit: The limit in this process (shared by the copies of a spec that
        :func:`dataclasses.replace` makes); set from ``concurrency``.
      dependencies: The handler's dependencies, resolved for each attempt; None when
        it takes only the event (it is then called without the resolver).
    """

    topic: str
    fn: Handler
    name: str
    queue: str | None = None
    event_type: type[BaseEvent] | None = None
    max_retries: int | None = None
    time_limit: float | None = None
    retry: RetryPolicy | None = None
    ordered: bool = False
    concurrency: int | None = None
    limit: LocalLimit | None = field(default=None, repr=False)
    dependencies: HandlerDependencies | None = field(default=None, repr=False)
    is_async: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "is_async", _is_async(self.fn))
        if self.concurrency is not None and self.limit is None:
            object.__setattr__(self, "limit", LocalLimit(self.concurrency))

    def decode(self, envelope: Any) -> BaseEvent:
        """The event in ``envelope``, as ``event_type`` when the handler declared one."""
        return decode_event(envelope, self.event_type)

    async def run_async(self, envelope: Any) -> None:
        """Decode ``envelope`` and run the (async) handler with the event's context set."""
        event = self.decode(envelope)
        cid = correlation_id_var.set(event.metadata.get(CORRELATION_ID, ""))
        current = current_event_var.set(event)
        try:
            if self.limit is not None:
                await self.limit.run_async(lambda: self._call_async(event))
            elif self.dependencies is None:
                await self.fn(event)  # type: ignore[misc]
            else:
                await self.dependencies.run_async(self.fn, event)
        finally:
            current_event_var.reset(current)
            correlation_id_var.reset(cid)

    def run_sync(self, envelope: Any) -> None:
        """Decode ``envelope`` and run the (sync) handler with the event's context set."""
        event = self.decode(envelope)
        cid = correlation_id_var.set(event.metadata.get(CORRELATION_ID, ""))
        current = current_event_var.set(event)
        try:
            if self.limit is not None:
                self.limit.run_sync(lambda: self._call_sync(event))
            elif self.dependencies is None:
                self.fn(event)
            else:
                self.dependencies.run_sync(self.fn, event)
        finally:
            current_event_var.reset(current)
            correlation_id_var.reset(cid)

    async def _call_async(self, event: BaseEvent) -> None:
        if self.dependencies is None:
            await self.fn(event)  # type: ignore[misc]
        else:
            await self.dependencies.run_async(self.fn, event)

    def _call_sync(self, event: BaseEvent) -> None:
        if self.dependencies is None:
            self.fn(event)
        else:
            self.dependencies.run_sync(self.fn, event)

    def matches(self, handler: object) -> bool:
        """Whether ``handler`` (a function, a spec or a name) designates this spec."""
        if isinstance(handler, HandlerSpec):  # the same handler, maybe bound to another bus
            return handler.name == self.name and handler.fn is self.fn
        return handler is self.fn or handler == self.name


def make_spec(
    topic_or_event: str | type[BaseEvent],
    fn: Handler,
    *,
    name: str | None = None,
    queue: str | None = None,
    max_retries: int | None = None,
    time_limit: float | None = None,
    retry: RetryPolicy | None = None,
    ordered: bool = False,
    concurrency: int | None = None,
) -> HandlerSpec:
    """Validate the options and the signature of a handler and build its spec.

    Raises:
      ConfigurationError: An invalid option, or a signature the bus cannot call (see
        :func:`~eventbus.dependencies.handler_dependencies`).
    """
    if not callable(fn):
        raise TypeError(f"a handler must be callable, got {fn!r}")
    event_type: type[BaseEvent] | None = None
    if isinstance(topic_or_event, type) and issubclass(topic_or_event, BaseEvent):
        event_type = topic_or_event
        default = topic_or_event.default_topic()
        if default is None:
            raise ConfigurationError(
                f"{topic_or_event.__name__} has no default topic; give its 'topic' field a "
                "default or pass the topic string to on_event()"
            )
        topic = default
    else:
        topic = topic_or_event
    validate_topic(topic)
    if queue is not None:
        validate_queue(queue)
    if max_retries is not None and max_retries < 0:
        raise ConfigurationError(f"max_retries must be >= 0, got {max_retries}")
    if time_limit is not None and time_limit <= 0:
        raise ConfigurationError(f"time_limit must be > 0 seconds, got {time_limit}")
    if concurrency is not None and (
        not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1
    ):
        raise ConfigurationError(
            f"concurrency must be a whole number >= 1 (runs at once), got {concurrency!r}"
        )
    if name is None:
        qualname = getattr(fn, "__qualname__", type(fn).__qualname__)
        name = f"{topic}:{getattr(fn, '__module__', '_')}.{qualname}"
    if not name or len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise ConfigurationError(f"invalid handler name {name!r}")
    dependencies = handler_dependencies(
        fn, handler=name, is_async=_is_async(fn), event_type=event_type
    )
    return HandlerSpec(
        topic=topic,
        fn=fn,
        name=name,
        queue=queue,
        event_type=event_type,
        max_retries=max_retries,
        time_limit=time_limit,
        retry=retry,
        ordered=ordered,
        concurrency=concurrency,
        dependencies=dependencies,
    )


_decorated: list[HandlerSpec] = []
_decorated_version = 0


def decorated_handlers() -> list[HandlerSpec]:
    """Every handler registered with ``@on_event`` in this process (a copy)."""
    return list(_decorated)


def on_event(
    topic: str | type[BaseEvent],
    *,
    name: str | None = None,
    queue: str | None = None,
    max_retries: int | None = None,
    time_limit: float | None = None,
    retry: RetryPolicy | None = None,
    ordered: bool = False,
    concurrency: int | None = None,
) -> Callable[[F], F]:
    """Register the decorated function as a handler of ``topic``, for every bus.

    ``topic`` is a topic string, or an event class: then the topic is the class's
    default ``topic`` and each payload is validated into that class.  With a topic
    string, the event parameter's annotation changes nothing at run time: the handler
    gets the class the payload names among the event classes of this process (or an
    :class:`UnknownEvent`), so a topic may carry several event types; pass the class
    to validate into it.

    The handler takes the event as its first parameter; any other parameter is a
    dependency declared with FastAPI's ``Depends``, resolved for each attempt (see
    :mod:`eventbus.dependencies`).  The signature is checked here: a parameter that
    is neither the event nor a dependency (nor has a default) raises
    ConfigurationError now, not at the first event.

    Parameters:
      name: The actor name (default ``"<topic>:<module>.<qualname>"``).  Set it to
        keep in-flight messages routable when you rename the function.
      queue: The dramatiq queue (default ``EVENTBUS_DEFAULT_QUEUE``).
      max_retries: Retries for this handler (default: the bus's policy).
      time_limit: Seconds an attempt may run.
      retry: A whole :class:`RetryPolicy` for this handler.
      ordered: On the Kafka backend, events with the same partition key reach this
        handler one after another (see :meth:`BaseEvent.partition_key`).
      concurrency: At most this many runs of the handler at once.  On Redis, across
        every worker process of the service (a Redis semaphore: two round trips per
        event of this handler, none for handlers without a limit); an event that
        finds no free slot waits in Redis and comes back shortly, without using a
        retry.  On the embedded and Kafka backends, per process.

    Example::

        @on_event("user.created")
        async def send_welcome(event: BaseEvent) -> None: ...

        @on_event(UserCreated, max_retries=5, time_limit=30)
        def index_user(event: UserCreated) -> None: ...   # runs in a thread

        @on_event(UserCreated)
        async def audit(event: UserCreated, db: Annotated[DB, Depends(get_db)]) -> None: ...
    """

    def decorator(fn: F) -> F:
        global _decorated_version
        spec = make_spec(
            topic,
            fn,
            name=name,
            queue=queue,
            max_retries=max_retries,
            time_limit=time_limit,
            retry=retry,
            ordered=ordered,
            concurrency=concurrency,
        )
        for i, existing in enumerate(_decorated):
            if existing.name == spec.name:
                _decorated[i] = spec  # a re-executed module replaces its handler
                break
        else:
            _decorated.append(spec)
        _decorated_version += 1
        return fn

    return decorator


class HandlerRegistry:
    """The handlers one bus dispatches to: decorated ones plus its own.

    Registering and unregistering here affects only this bus, and so do its
    :attr:`dependency_overrides`: the handlers it returns resolve their dependencies
    with this bus's overrides.
    """

    def __init__(self) -> None:
        self._local: list[HandlerSpec] = []
        self._hidden: set[str] = set()
        self._version = 0
        self._overrides = DependencyOverrides()
        # Decorated handlers with dependencies, rebuilt on this bus's overrides (once each).
        self._bound: weakref.WeakKeyDictionary[HandlerSpec, HandlerSpec] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def dependency_overrides(self) -> DependencyOverrides:
        """``{dependency: replacement}`` for this bus's handlers, as FastAPI's
        ``app.dependency_overrides``::

            bus.registry.dependency_overrides[get_db] = get_test_db
            ...
            bus.registry.dependency_overrides.clear()

        A replacement applies from the next attempt on, in every handler of this bus
        and in sub-dependencies.  Assigning a mapping replaces every override.  Worker
        processes have their own bus: see :class:`~eventbus.dependencies.DependencyOverrides`.
        """
        return self._overrides

    @dependency_overrides.setter
    def dependency_overrides(
        self, overrides: Mapping[Callable[..., Any], Callable[..., Any]]
    ) -> None:
        self._overrides.replace(dict(overrides))

    def _own(self, spec: HandlerSpec) -> HandlerSpec:
        """``spec``, resolving its dependencies with this bus's overrides."""
        dependencies = spec.dependencies
        if dependencies is None or dependencies.provider is self._overrides.provider:
            return spec
        bound = self._bound.get(spec)
        if bound is None:
            bound = replace(spec, dependencies=dependencies.bind(self._overrides.provider))
            self._bound[spec] = bound
        return bound

    @property
    def version(self) -> tuple[int, int]:
        """Changes whenever the set of handlers may have changed."""
        return (_decorated_version, self._version)

    async def register(
        self, topic: str | type[BaseEvent], handler: Handler, **options: Any
    ) -> HandlerSpec:
        """Add ``handler`` for ``topic`` on this bus; see :func:`on_event` for options.

        On a running bus the handler receives events once its topic is subscribed
        (``await bus.subscribe(topic)``); topics subscribed already include it at once.
        """
        return self.add(make_spec(topic, handler, **options))

    def add(self, spec: HandlerSpec) -> HandlerSpec:
        """Add a prepared spec (synchronous form of :meth:`register`); returns the spec
        this bus runs."""
        spec = self._own(spec)
        for existing in self.all_handlers():
            if existing.name == spec.name:
                if existing.fn is spec.fn and existing.topic == spec.topic:
                    self._local = [s for s in self._local if s.name != spec.name]
                    break
                raise ConfigurationError(
                    f"handler name {spec.name!r} is already used by {existing.fn!r}"
                )
        self._hidden.discard(spec.name)
        self._local.append(spec)
        self._version += 1
        return spec

    async def unregister(self, topic: str, handler: object) -> bool:
        """Stop dispatching ``topic`` to ``handler`` (a function, spec or name) on this bus.

        Messages already enqueued for it are dead-lettered with ActorNotFound.
        Returns whether anything was removed.
        """
        removed = False
        for spec in self.get_handlers(topic):
            if spec.matches(handler):
                self._local = [s for s in self._local if s is not spec]
                self._hidden.add(spec.name)
                removed = True
        if removed:
            self._version += 1
        return removed

    def all_handlers(self) -> list[HandlerSpec]:
        """Every handler of this bus."""
        specs = [self._own(s) for s in _decorated if s.name not in self._hidden]
        local_names = {s.name for s in self._local}
        return [s for s in specs if s.name not in local_names] + self._local

    def get_handlers(self, topic: str) -> list[HandlerSpec]:
        """The handlers of ``topic``."""
        return [s for s in self.all_handlers() if s.topic == topic]

    @property
    def topics(self) -> list[str]:
        """Every topic with at least one handler."""
        return list(dict.fromkeys(s.topic for s in self.all_handlers()))
