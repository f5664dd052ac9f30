"""Dependency injection in handlers, with FastAPI's ``Depends``.

A handler takes the event as its first parameter; every other parameter is a
dependency, declared exactly as in a FastAPI endpoint, so handlers reuse the
application's own dependencies::

    from typing import Annotated
    from fastapi import Depends

    async def get_db() -> AsyncIterator[Session]:
        async with SessionLocal() as session:
            yield session              # the code after yield runs when the attempt ends

    @on_event(UserCreated)
    async def welcome(event: UserCreated, db: Annotated[Session, Depends(get_db)]) -> None: ...

* **Accepted.**  ``fastapi.Depends`` (or ``fast_depends.Depends``) as a default or in
  ``Annotated``; ``Depends()`` with the dependency taken from the annotation; sync and
  async functions, generators (``yield``), classes and callable objects; dependencies of
  dependencies; ``use_cache=False``.  Within one attempt each dependency runs once, its
  value shared by everything that asks for it, unless ``use_cache=False``.
* **Per attempt.**  Every attempt, each retry included, resolves the dependencies
  anew.  When the attempt ends, ``yield`` dependencies are cleaned up, the last one set
  up first; a failing handler's exception is raised inside them at their ``yield``.
  Re-raise it there: a dependency that swallows it turns the failed attempt into a
  success, as :func:`contextlib.contextmanager` does.
* **Checked at registration.**  ``@on_event`` and ``bus.registry.register`` raise
  :class:`~eventbus.ConfigurationError`, naming the handler and the parameter, for a
  parameter that is neither the event nor a dependency nor has a default, one that
  needs an HTTP request (``Request``, ``Query(...)``, ``Header(...)``, security
  scopes...), an async dependency of a sync handler, or a dependency cycle.  Nothing
  about a signature fails at the first event.
* **Sync handlers** resolve their dependencies in the handler's own thread, so their
  dependencies must be sync all the way down.  **Async handlers** await async
  dependencies on their event loop and run sync ones (and sync generators) in a worker
  thread, as FastAPI does: a thread hop costs ~50 us, so prefer async dependencies
  for busy async handlers.
* **The event inside a dependency**: :func:`~eventbus.get_current_event` and
  :func:`~eventbus.get_correlation_id` work there, in threads too; both also work as
  dependencies themselves (``event = Depends(get_current_event)``).
* **Overrides** belong to a bus, as FastAPI's ``app.dependency_overrides`` belongs to an
  app: ``bus.registry.dependency_overrides[get_db] = fake_db`` replaces ``get_db``
  wherever that bus's handlers use it, sub-dependencies included, from the next attempt
  on.  Worker processes build their own bus (:data:`eventbus.actors.bus`); overrides
  for them are set in a module the worker imports (see :class:`DependencyOverrides`).

**Cost.**  A handler whose only parameter is the event never calls the resolver.
Measured on the embedded backend (``bench/embedded.py``, 2 cores): two async
dependencies add ~8 us per event, an async one and an async ``yield`` one ~11 us.

Resolution is done by `fast-depends <https://github.com/Lancetnik/FastDepends>`_ (the
resolver FastStream uses); FastAPI's own solver needs an HTTP request.  This module
translates FastAPI's markers for it and hides from it every parameter that is not a
dependency.

One concept past ~500 lines: dependency injection for handlers, from the checks
made at registration to the resolution of each attempt and the overrides the
test kit uses; they share the one converted form of a dependency
(:class:`Dependency`).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import threading
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, get_args, get_origin

import fast_depends
from fast_depends.core import CallModel, build_call_model
from fast_depends.dependencies import Dependant, Provider
from fastapi import params
from fastapi.security import SecurityScopes
from starlette.background import BackgroundTasks
from starlette.requests import HTTPConnection
from starlette.responses import Response

from eventbus.events import BaseEvent
from eventbus.exceptions import ConfigurationError

__all__ = [
    "Dependency",
    "DependencyOverrides",
    "HandlerDependencies",
    "dependency",
    "handler_dependencies",
]

#: Prefix of the parameter names fast-depends sees.  It hands every value it resolved
#: to the dependencies resolved after it, by parameter name; names unique in the
#: process keep a value from landing in a same-named parameter of another dependency.
PARAM_PREFIX = "eventbus_dep"
#: Parameter types only an HTTP request provides: handlers have none.
REQUEST_TYPES: tuple[type, ...] = (HTTPConnection, Response, BackgroundTasks, SecurityScopes)
#: FastAPI markers that read an HTTP request (Query, Header, Path, Cookie, Body, Form, File).
REQUEST_MARKERS: tuple[type, ...] = (params.Param, params.Body)

_MARKERS = (params.Depends, Dependant)
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
_unique = itertools.count()


@dataclass(frozen=True, eq=False)
class Dependency:
    """A dependency as the resolver sees it.

    Attributes:
      original: The callable the user declared (``get_db``).
      call: What the resolver calls: ``original`` itself when it takes no parameter,
        else a wrapper of the same kind (sync, async, generator, async generator)
        whose only parameters are ``original``'s dependencies, under unique names.
      needs_async: It or one of its own dependencies is async (sync handlers refuse it).
      name: Its name in messages.
    """

    original: Callable[..., Any]
    call: Callable[..., Any]
    needs_async: bool
    name: str


_converted: dict[Any, Dependency] = {}
_lock = threading.RLock()


def dependency(call: Callable[..., Any]) -> Dependency:
    """The :class:`Dependency` of ``call``, built once per callable and then reused.

    Raises:
      ConfigurationError: ``call`` or one of its own dependencies has a parameter the
        resolver cannot fill, or its dependencies form a cycle.
    """
    return _dependency(call, ())


def _dependency(call: Callable[..., Any], chain: tuple[Callable[..., Any], ...]) -> Dependency:
    try:
        known = _converted.get(call)
    except TypeError:  # unhashable callable: converted each time, cannot be overridden
        return _convert(call, chain)
    if known is not None:
        return known
    with _lock:
        known = _converted.get(call)
        if known is None:
            known = _converted[call] = _convert(call, chain)
        return known


@dataclass(frozen=True)
class _Declared:
    """One dependency parameter: its name, the dependency, its cache flag."""

    name: str
    dependency: Dependency
    use_cache: bool


def _convert(call: Callable[..., Any], chain: tuple[Callable[..., Any], ...]) -> Dependency:
    name = _name(call)
    if any(call is seen for seen in chain):
        cycle = " -> ".join(_name(c) for c in (*chain, call))
        raise ConfigurationError(f"dependency cycle: {cycle}")
    kind = _kind(call)
    signature = _signature(call)
    declared: list[_Declared] = []
    if signature is not None:
        for param in signature.parameters.values():
            marker = _marker(param, f"dependency {name}")
            if marker is None:
                if param.kind in _VARIADIC or param.default is not param.empty:
                    continue  # keeps its default, as the resolver never sees it
                raise ConfigurationError(
                    f"dependency {name}: parameter {param.name!r} is not a dependency and "
                    "has no default (a handler has no request to read it from): declare it "
                    "with Depends(...) or give it a default"
                )
            _refuse_positional_only(param, f"dependency {name}")
            sub = _dependency(marker[0], (*chain, call))
            declared.append(_Declared(param.name, sub, marker[1]))
    needs_async = kind in ("async", "agen") or any(d.dependency.needs_async for d in declared)
    # A class is always wrapped: the resolver would take a generator ``__call__`` of
    # the class for the class itself.
    bare = signature is None or not signature.parameters
    exposed = call if bare and not inspect.isclass(call) else _wrap(call, kind, declared)
    return Dependency(original=call, call=exposed, needs_async=needs_async, name=name)


def _wrap(call: Callable[..., Any], kind: str, declared: list[_Declared]) -> Callable[..., Any]:
    """A callable of ``call``'s kind whose parameters are its dependencies, renamed."""
    names = tuple((f"{PARAM_PREFIX}{next(_unique)}_{d.name}", d.name) for d in declared)

    def arguments(values: dict[str, Any]) -> dict[str, Any]:
        return {original: values[unique] for unique, original in names}

    wrapper: Callable[..., Any]
    if kind == "async":

        async def wrapper(**values: Any) -> Any:
            return await call(**arguments(values))

    elif kind == "agen":
        async_cm = asynccontextmanager(call)

        async def wrapper(**values: Any) -> Any:
            async with async_cm(**arguments(values)) as value:
                yield value

    elif kind == "gen":
        sync_cm = contextmanager(call)

        def wrapper(**values: Any) -> Any:
            with sync_cm(**arguments(values)) as value:
                yield value

    else:

        def wrapper(**values: Any) -> Any:
            return call(**arguments(values))

    parameters = [
        inspect.Parameter(
            unique,
            inspect.Parameter.KEYWORD_ONLY,
            default=fast_depends.Depends(d.dependency.call, use_cache=d.use_cache),
        )
        for (unique, _), d in zip(names, declared, strict=True)
    ]
    wrapper.__name__ = wrapper.__qualname__ = _name(call)
    wrapper.__module__ = getattr(call, "__module__", __name__)
    setattr(wrapper, "__signature__", inspect.Signature(parameters))  # noqa: B010
    return wrapper


class HandlerDependencies:
    """The dependencies of one handler, and how one attempt resolves them.

    Built by :func:`handler_dependencies` when the handler is registered, on a
    ``provider`` that holds the resolver's models and the overrides in force;
    :meth:`bind` rebuilds it on another bus's provider.
    """

    __slots__ = ("_keys", "declared", "handler", "is_async", "provider")

    def __init__(
        self,
        handler: str,
        declared: tuple[_Declared, ...],
        *,
        is_async: bool,
        provider: Provider,
    ) -> None:
        self.handler = handler
        self.declared = declared
        self.is_async = is_async
        self.provider = provider
        keys = []
        for d in declared:
            try:
                model = build_call_model(
                    d.dependency.call,
                    dependency_provider=provider,
                    use_cache=d.use_cache,
                    is_sync=not is_async,
                    serializer_cls=None,  # values pass as they are, as in FastAPI
                )
            except AssertionError as exc:  # fast-depends reports misuse with assert
                raise ConfigurationError(f"handler {handler}: {exc}") from None
            keys.append((d.name, provider.add_dependant(model)))
        self._keys = tuple(keys)

    def bind(self, provider: Provider) -> HandlerDependencies:
        """The same dependencies, resolved with ``provider`` (a bus's, with its overrides)."""
        return HandlerDependencies(
            self.handler, self.declared, is_async=self.is_async, provider=provider
        )

    async def run_async(self, fn: Callable[..., Any], event: BaseEvent) -> None:
        """Resolve the dependencies, await ``fn(event, ...)``, then clean them up."""
        get = self.provider.get_dependant
        cache: dict[Callable[..., Any], Any] = {}
        values: dict[str, Any] = {}
        async with AsyncExitStack() as stack:
            for name, key in self._keys:
                values[name] = await get(key).asolve(
                    stack=stack, cache_dependencies=cache, nested=True
                )
            await fn(event, **values)

    def run_sync(self, fn: Callable[..., Any], event: BaseEvent) -> None:
        """Resolve the dependencies in this thread, call ``fn(event, ...)``, clean up."""
        get = self.provider.get_dependant
        cache: dict[Callable[..., Any], Any] = {}
        values: dict[str, Any] = {}
        with ExitStack() as stack:
            for name, key in self._keys:
                values[name] = get(key).solve(stack=stack, cache_dependencies=cache, nested=True)
            fn(event, **values)


#: Where handlers built outside a bus resolve their dependencies (no overrides).
DEFAULT_PROVIDER = Provider()


def handler_dependencies(
    fn: Callable[..., Any],
    *,
    handler: str,
    is_async: bool,
    event_type: type[BaseEvent] | None = None,
) -> HandlerDependencies | None:
    """Check ``fn``'s signature; return its dependencies, or None when it takes only the event.

    Parameters:
      fn: The handler.
      handler: Its name in messages.
      is_async: Whether it is awaited (else called in a thread).
      event_type: The class its events are validated into, if any: an event parameter
        annotated with an unrelated event class is refused.

    Raises:
      ConfigurationError: Naming the handler and the parameter: no first positional
        parameter to receive the event, a parameter that is neither the event nor a
        dependency nor has a default, a request-bound parameter, an async dependency of
        a sync handler.
    """
    where = f"handler {handler}"
    signature = _signature(fn)
    if signature is None:
        return None  # no signature to read (a builtin): it is called with the event
    parameters = list(signature.parameters.values())
    if not parameters or parameters[0].kind not in (*_POSITIONAL, inspect.Parameter.VAR_POSITIONAL):
        raise ConfigurationError(
            f"{where} must take the event as its first positional parameter, "
            f"e.g. async def {_name(fn)}(event: BaseEvent) -> None"
        )
    first = parameters[0]
    if _marker(first, where) is not None:
        raise ConfigurationError(
            f"{where}: its first parameter {first.name!r} receives the event, it cannot be "
            "a dependency: add the event parameter before it"
        )
    _check_event_annotation(first, event_type, where)
    declared: list[_Declared] = []
    for param in parameters[1:]:
        marker = _marker(param, where)
        if marker is None:
            if param.kind in _VARIADIC or param.default is not param.empty:
                continue
            raise ConfigurationError(
                f"{where}: parameter {param.name!r} is neither the event (the first "
                "parameter) nor a dependency: declare it with Depends(...), e.g. "
                f"{param.name}: Annotated[X, Depends(get_x)], give it a default, or remove it"
            )
        _refuse_positional_only(param, where)
        found = dependency(marker[0])
        if not is_async and found.needs_async:
            raise ConfigurationError(
                f"{where} is sync, but its dependency {found.name} (parameter "
                f"{param.name!r}) is async or depends on an async one: a sync handler "
                "resolves its dependencies in its own thread; make the handler async or "
                "the dependency sync"
            )
        declared.append(_Declared(param.name, found, marker[1]))
    if not declared:
        return None
    return HandlerDependencies(
        handler, tuple(declared), is_async=is_async, provider=DEFAULT_PROVIDER
    )


class DependencyOverrides(MutableMapping[Callable[..., Any], Callable[..., Any]]):
    """``{dependency: replacement}`` for one bus's handlers, like FastAPI's
    ``app.dependency_overrides``.

    A replacement takes effect from the next attempt on, wherever the bus's handlers
    use the dependency, sub-dependencies included; ``del`` or :meth:`clear` restores
    the original.  A replacement is checked when set, as a dependency is at
    registration; a dependency that sync handlers can use (sync all the way down)
    only takes a sync replacement.  Overriding a dependency no handler can use (one
    that needs an HTTP request) is accepted and changes nothing, so one mapping can
    serve both ``app.dependency_overrides`` and the bus.

    Overrides are state of one process.  A worker process (``dramatiq
    eventbus.actors``) builds its own bus, :data:`eventbus.actors.bus`; to override
    there, set them in a module that only the workers import, named on the command
    line after the handler modules (or in ``EVENTBUS_HANDLERS``)::

        # tests/worker_overrides.py
        from eventbus.actors import bus
        bus.registry.dependency_overrides[get_db] = get_test_db

    (never import :mod:`eventbus.actors` from a module the web process imports: it
    builds a worker bus).

    Example::

        bus.registry.dependency_overrides[get_db] = lambda: FakeDB()
        ...
        bus.registry.dependency_overrides.clear()
    """

    def __init__(self) -> None:
        #: The fast-depends provider that holds this bus's models and overrides.
        self.provider = Provider()
        self._overrides: dict[Callable[..., Any], Callable[..., Any]] = {}

    def __setitem__(self, original: Callable[..., Any], override: Callable[..., Any]) -> None:
        checked = _checked_override(original, override)
        if checked is not None:
            replaced, replacement = checked
            # Both models are built here rather than by Provider.override, which
            # refuses a sync callable with async dependencies (FastAPI accepts it).
            key = self.provider.add_dependant(self._model(replaced))
            self.provider.overrides[key] = self._model(replacement)
        self._overrides[original] = override

    def _model(self, dep: Dependency) -> CallModel:
        return build_call_model(
            dep.call,
            dependency_provider=self.provider,
            is_sync=not dep.needs_async,
            serializer_cls=None,
        )

    def __getitem__(self, original: Callable[..., Any]) -> Callable[..., Any]:
        return self._overrides[original]

    def __delitem__(self, original: Callable[..., Any]) -> None:
        del self._overrides[original]
        with contextlib.suppress(ConfigurationError):
            self.provider.overrides.pop(dependency(original).call, None)

    def __iter__(self) -> Iterator[Callable[..., Any]]:
        return iter(self._overrides)

    def __len__(self) -> int:
        return len(self._overrides)

    def clear(self) -> None:
        """Remove every override."""
        self._overrides.clear()
        self.provider.clear()

    def replace(self, overrides: Mapping[Callable[..., Any], Callable[..., Any]]) -> None:
        """Make ``overrides`` the only overrides; nothing changes if one is refused."""
        for original, override in overrides.items():
            _checked_override(original, override)
        self.clear()
        self.update(overrides)


def _checked_override(
    original: Callable[..., Any], override: Callable[..., Any]
) -> tuple[Dependency, Dependency] | None:
    """The two sides of an override; None when no handler can use ``original``."""
    if not callable(original) or not callable(override):
        raise TypeError(
            f"dependency overrides map callables to callables, got {original!r}: {override!r}"
        )
    try:
        replaced = dependency(original)
    except ConfigurationError:
        return None  # handlers cannot use it (it needs a request): nothing to replace
    replacement = dependency(override)
    if replacement.needs_async and not replaced.needs_async:
        raise ConfigurationError(
            f"cannot override the sync dependency {replaced.name} with the async "
            f"{replacement.name}: sync handlers resolve it in their own thread; "
            "override it with a sync callable"
        )
    return replaced, replacement


# -- signatures ----------------------------------------------------------------------


def _name(call: Callable[..., Any]) -> str:
    return str(getattr(call, "__qualname__", None) or type(call).__qualname__)


def _kind(call: Callable[..., Any]) -> str:
    """``"async"``, ``"agen"`` (async generator), ``"gen"`` (generator) or ``"sync"``."""
    if inspect.isclass(call):
        return "sync"  # calling a class builds an instance, whatever its methods are
    for fn in (call, getattr(call, "__call__", None)):  # noqa: B004 - callable objects
        if fn is None:
            continue
        if inspect.isasyncgenfunction(fn):
            return "agen"
        if inspect.isgeneratorfunction(fn):
            return "gen"
        if inspect.iscoroutinefunction(fn):
            return "async"
    return "sync"


def _signature(call: Callable[..., Any]) -> inspect.Signature | None:
    """``call``'s signature with string annotations evaluated where possible.

    An annotation naming something the module cannot see (a local class, a name
    imported under ``TYPE_CHECKING``) stays a string; None when there is no signature.
    """
    try:
        return inspect.signature(call, eval_str=True)
    except (ValueError, TypeError):
        return None
    except Exception:  # some annotation does not evaluate: one by one below
        pass
    signature = inspect.signature(call)
    namespace = _globals(call)
    return signature.replace(
        parameters=[
            p.replace(annotation=_evaluate(p.annotation, namespace))
            for p in signature.parameters.values()
        ]
    )


def _globals(call: Callable[..., Any]) -> dict[str, Any]:
    target: Any = inspect.unwrap(call)
    if inspect.isclass(target):
        target = target.__init__
    elif not hasattr(target, "__globals__"):
        target = getattr(type(target), "__call__", target)  # noqa: B004
    namespace = getattr(target, "__globals__", None)
    return namespace if isinstance(namespace, dict) else {}


def _evaluate(annotation: Any, namespace: dict[str, Any]) -> Any:
    if not isinstance(annotation, str):
        return annotation
    try:
        # The annotation is the user's own source text, evaluated as
        # inspect.signature(eval_str=True) and typing.get_type_hints do.
        return eval(annotation, namespace)
    except Exception:  # left as text; checked where it matters
        return annotation


def _marker(param: inspect.Parameter, where: str) -> tuple[Callable[..., Any], bool] | None:
    """The (dependency, use_cache) ``param`` declares, or None for a plain parameter."""
    annotation = param.annotation
    found: Any = None
    base = annotation
    if get_origin(annotation) is Annotated:
        base = get_args(annotation)[0]
        for meta in annotation.__metadata__:
            if isinstance(meta, _MARKERS):
                found = meta  # the last one wins, as in FastAPI
            elif isinstance(meta, REQUEST_MARKERS):
                raise _request_bound(param, where)
    if isinstance(param.default, _MARKERS):
        if found is not None:
            raise ConfigurationError(
                f"{where}: parameter {param.name!r} declares Depends both in Annotated "
                "and as its default: keep one"
            )
        found = param.default
    elif isinstance(param.default, REQUEST_MARKERS):
        raise _request_bound(param, where)
    if found is None:
        if isinstance(base, type) and issubclass(base, REQUEST_TYPES):
            raise _request_bound(param, where)
        if isinstance(annotation, str) and "Depends" in annotation:
            raise _unevaluated(param, where)
        return None
    call = found.dependency
    if call is None:  # Depends(): the annotation is the dependency
        if isinstance(base, str):
            raise _unevaluated(param, where)
        call = base
    if not callable(call):
        raise ConfigurationError(
            f"{where}: parameter {param.name!r}: Depends() needs a callable, got {call!r}"
        )
    if getattr(found, "max_concurrency", None) is not None:
        raise ConfigurationError(
            f"{where}: parameter {param.name!r}: Depends(max_concurrency=...) is not "
            "supported in handlers: bound the handler's concurrency instead"
        )
    return call, bool(found.use_cache)


def _unevaluated(param: inspect.Parameter, where: str) -> ConfigurationError:
    return ConfigurationError(
        f"{where}: cannot evaluate the annotation {param.annotation!r} of parameter "
        f"{param.name!r}: define the names it uses at module level (not under "
        "TYPE_CHECKING or inside a function), or name the dependency in a default: "
        f"{param.name}=Depends(get_x)"
    )


def _request_bound(param: inspect.Parameter, where: str) -> ConfigurationError:
    return ConfigurationError(
        f"{where}: parameter {param.name!r} needs an HTTP request (Request, Query, Header, "
        "Body, security scopes...): a handler has none; read what you need in the "
        "endpoint and put it in the event"
    )


def _refuse_positional_only(param: inspect.Parameter, where: str) -> None:
    if param.kind is inspect.Parameter.POSITIONAL_ONLY:
        raise ConfigurationError(
            f"{where}: dependency parameter {param.name!r} is positional-only: "
            "dependencies are passed by name"
        )


def _check_event_annotation(
    param: inspect.Parameter, event_type: type[BaseEvent] | None, where: str
) -> None:
    annotation = param.annotation
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if (
        event_type is not None
        and isinstance(annotation, type)
        and issubclass(annotation, BaseEvent)
        and not issubclass(event_type, annotation)
    ):
        raise ConfigurationError(
            f"{where} receives {event_type.__name__} events, but its event parameter "
            f"{param.name!r} is annotated {annotation.__name__}"
        )
