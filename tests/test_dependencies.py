"""Dependency injection in handlers (FastAPI's ``Depends``) on the embedded backend,
and in a real ``dramatiq eventbus.actors`` worker on Redis.

Dependencies used in ``Annotated[...]`` live at module level: this module uses
``from __future__ import annotations``, so annotations are text evaluated in the
module's namespace (as FastAPI does).

The worker test runs this very module in the worker (``dramatiq eventbus.actors
tests.test_dependencies``); its handlers are declared only there (``WORKER_ENV``), so
the test process's buses never see them.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any

import pytest
import redis
from fastapi import Depends, FastAPI, Query, Request
from fastapi.testclient import TestClient

from eventbus import (
    BaseEvent,
    ConfigurationError,
    EventBus,
    EventBusSettings,
    create_lifespan,
    get_correlation_id,
    get_current_event,
    on_event,
)
from eventbus.context import correlation_id_var
from tests.redis_keys import client, key

pytest.register_assert_rewrite("tests.redis_support")  # before it is imported below
from tests.redis_support import Workers  # noqa: E402

# The Redis fixtures: redis_url, namespace, make_redis_bus, workers.
pytest_plugins = ["tests.redis_support"]

MakeBus = Callable[..., EventBus]

#: Set in the worker's environment: this module then declares its worker handlers.
WORKER_ENV = "EVENTBUS_TEST_DI_WORKER"
#: Topic of the worker test.
WORKER_TOPIC = "tests.di.worker"


class Signup(BaseEvent):
    topic: str = "tests.di.signup"
    user_id: int = 1


class Other(BaseEvent):
    topic: str = "tests.di.other"


# -- dependencies, as an application would define them ---------------------------------

log: list[str] = []


class Settings:
    def __init__(self, prefix: str = "prod") -> None:
        self.prefix = prefix


def get_settings() -> Settings:
    log.append("settings")
    return Settings()


async def get_session(settings: Annotated[Settings, Depends(get_settings)]) -> AsyncIterator[str]:
    """A yield dependency with a sub-dependency, cleaned up after each attempt."""
    log.append("session setup")
    try:
        yield f"{settings.prefix}-session"
    except Exception as exc:
        log.append(f"session saw {exc}")
        raise
    finally:
        log.append("session cleanup")


async def get_repo(session: Annotated[str, Depends(get_session)]) -> str:
    return f"repo({session})"


def get_cache() -> str:
    return "cache"


def get_sync_resource() -> Iterator[str]:
    log.append(f"resource setup {threading.get_ident()}")
    try:
        yield "resource"
    finally:
        log.append(f"resource cleanup {threading.get_ident()}")


async def get_async_value() -> str:
    return "async"


def event_name(event: BaseEvent | None = Depends(get_current_event)) -> str:
    return type(event).__name__


def context_seen() -> str:
    event = get_current_event()
    return f"{type(event).__name__}/{get_correlation_id()}/{threading.get_ident()}"


def counted() -> int:
    log.append("counted")
    return len(log)


# -- per attempt --------------------------------------------------------------------


async def test_yield_dependency_is_set_up_and_cleaned_up_once_per_attempt(
    make_bus: MakeBus, topic: str
) -> None:
    log.clear()
    attempts = 0

    async def handle(event: BaseEvent, session: Annotated[str, Depends(get_session)]) -> None:
        nonlocal attempts
        attempts += 1
        log.append(f"handle {attempts} with {session}")
        if attempts < 3:
            raise RuntimeError(f"fail {attempts}")

    bus = make_bus()
    await bus.registry.register(topic, handle)
    await bus.start()
    await bus.publish(Signup(topic=topic))
    await bus.drain(timeout=5)

    per_attempt = [
        ["settings", "session setup", "handle 1 with prod-session", "session saw fail 1"],
        ["settings", "session setup", "handle 2 with prod-session", "session saw fail 2"],
        ["settings", "session setup", "handle 3 with prod-session"],
    ]
    expected = [line for lines in per_attempt for line in [*lines, "session cleanup"]]
    assert log == expected
    assert bus.dlq.size() == 0


async def test_async_handler_awaits_async_dependencies_and_runs_sync_ones_in_a_thread(
    make_bus: MakeBus, topic: str
) -> None:
    log.clear()
    seen: list[Any] = []

    async def handle(
        event: BaseEvent,
        value: Annotated[str, Depends(get_async_value)],
        resource: Annotated[str, Depends(get_sync_resource)],
        settings: Settings = Depends(get_settings),
    ) -> None:
        seen.append((value, resource, settings.prefix, threading.get_ident()))

    bus = make_bus()
    await bus.registry.register(topic, handle)
    await bus.start()
    await bus.publish(Signup(topic=topic))
    await bus.drain(timeout=5)

    [(value, resource, prefix, handler_thread)] = seen
    assert (value, resource, prefix) == ("async", "resource", "prod")
    assert handler_thread == threading.get_ident()  # on the application's loop
    setup, cleanup = (line for line in log if line.startswith("resource"))
    assert setup.startswith("resource setup ") and cleanup.startswith("resource cleanup ")
    assert int(setup.rsplit(" ", 1)[1]) != handler_thread  # a sync generator: in a thread


async def test_sync_handler_resolves_sync_dependencies_in_its_own_thread_per_attempt(
    make_bus: MakeBus, topic: str
) -> None:
    log.clear()
    threads: list[int] = []

    def handle(
        event: BaseEvent,
        resource: Annotated[str, Depends(get_sync_resource)],
        settings: Settings = Depends(get_settings),
    ) -> None:
        threads.append(threading.get_ident())
        assert (resource, settings.prefix) == ("resource", "prod")
        if len(threads) == 1:
            raise RuntimeError("first attempt fails")

    bus = make_bus()
    await bus.registry.register(topic, handle)
    await bus.start()
    await bus.publish(Signup(topic=topic))
    await bus.drain(timeout=5)

    assert len(threads) == 2
    expected = []
    for thread in threads:
        expected += [f"resource setup {thread}", "settings", f"resource cleanup {thread}"]
    assert log == expected


async def test_annotated_depends_without_argument_uses_the_annotation(
    make_bus: MakeBus, topic: str
) -> None:
    seen: list[str] = []

    async def handle(event: BaseEvent, settings: Annotated[Settings, Depends()]) -> None:
        seen.append(settings.prefix)  # Settings() with its default prefix

    bus = make_bus()
    await bus.registry.register(topic, handle)
    await bus.start()
    await bus.publish(Signup(topic=topic))
    await bus.drain(timeout=5)
    assert seen == ["prod"]


async def test_sub_dependencies_resolve_once_per_attempt_unless_use_cache_is_false(
    make_bus: MakeBus, topic: str
) -> None:
    log.clear()
    seen: list[Any] = []

    async def handle(
        event: BaseEvent,
        repo: Annotated[str, Depends(get_repo)],
        session: Annotated[str, Depends(get_session)],
        first: int = Depends(counted, use_cache=False),
        second: int = Depends(counted, use_cache=False),
    ) -> None:
        seen.append((repo, session, first != second))

    bus = make_bus()
    await bus.registry.register(topic, handle)
    await bus.start()
    await bus.publish(Signup(topic=topic))
    await bus.drain(timeout=5)

    assert seen == [("repo(prod-session)", "prod-session", True)]
    # get_session (and get_settings below it) ran once for both parameters.
    assert log.count("session setup") == 1 and log.count("settings") == 1
    assert log.count("counted") == 2


def get_cache_session(cache: str = Depends(get_cache)) -> str:
    return f"session of {cache}"


async def get_db_repo(session: Annotated[str, Depends(get_session)]) -> str:
    return f"repo({session})"


async def test_a_resolved_value_never_lands_in_a_same_named_parameter_elsewhere(
    make_bus: MakeBus, topic: str
) -> None:
    """Two different dependencies behind parameters named ``session``: each gets its own."""
    seen: list[Any] = []

    async def handle(
        event: BaseEvent,
        session: str = Depends(get_cache_session),
        repo: str = Depends(get_db_repo),
    ) -> None:
        seen.append((session, repo))

    bus = make_bus()
    await bus.registry.register(topic, handle)
    await bus.start()
    await bus.publish(Signup(topic=topic))
    await bus.drain(timeout=5)
    assert seen == [("session of cache", "repo(prod-session)")]


# -- the event and its context inside dependencies --------------------------------------


async def test_dependencies_see_the_current_event_and_correlation_id(
    make_bus: MakeBus, topic: str
) -> None:
    seen: list[Any] = []

    async def handle(
        event: Signup,
        name: str = Depends(event_name),
        in_thread: str = Depends(context_seen),
    ) -> None:
        seen.append((name, in_thread))

    def handle_sync(event: Signup, in_thread: str = Depends(context_seen)) -> None:
        seen.append(("sync", in_thread, threading.get_ident()))

    bus = make_bus()
    await bus.registry.register(Signup, handle, name=f"{topic}.async")
    await bus.registry.register(Signup, handle_sync, name=f"{topic}.sync")
    await bus.start()
    token = correlation_id_var.set("req-42")
    try:
        await bus.publish(Signup())
    finally:
        correlation_id_var.reset(token)
    await bus.drain(timeout=5)

    by_kind = {entry[0]: entry for entry in seen}
    _, in_thread = by_kind["Signup"]  # Depends(get_current_event) gave the Signup
    assert in_thread.startswith("Signup/req-42/")
    assert int(in_thread.rsplit("/", 1)[1]) != threading.get_ident()  # a sync dependency
    _, in_handler_thread, handler_thread = by_kind["sync"]
    assert in_handler_thread == f"Signup/req-42/{handler_thread}"


# -- overrides -------------------------------------------------------------------------


def fake_settings() -> Settings:
    return Settings(prefix="test")


async def test_overrides_replace_a_dependency_everywhere_on_one_bus_only(
    make_bus: MakeBus, topic: str
) -> None:
    log.clear()
    seen: list[tuple[str, str]] = []

    @on_event(topic)
    async def handle(event: BaseEvent, repo: Annotated[str, Depends(get_repo)]) -> None:
        seen.append((get_correlation_id(), repo))

    overridden, plain = make_bus(), make_bus()
    overridden.dependency_overrides[get_settings] = fake_settings  # as app.dependency_overrides
    assert overridden.registry.dependency_overrides[get_settings] is fake_settings
    await overridden.start()
    await plain.start()

    async def publish(bus: EventBus, cid: str) -> None:
        token = correlation_id_var.set(cid)
        try:
            await bus.publish(Signup(topic=topic))
        finally:
            correlation_id_var.reset(token)
        await bus.drain(timeout=5)

    await publish(overridden, "overridden")
    await publish(plain, "plain")
    overridden.registry.dependency_overrides[get_session] = get_cache  # set while running
    await publish(overridden, "session-overridden")
    overridden.registry.dependency_overrides.clear()
    await publish(overridden, "cleared")

    assert seen == [
        ("overridden", "repo(test-session)"),  # a sub-dependency of a sub-dependency
        ("plain", "repo(prod-session)"),  # the other bus is untouched
        ("session-overridden", "repo(cache)"),
        ("cleared", "repo(prod-session)"),
    ]
    assert "settings" in log  # only the real get_settings logs


async def get_async_settings() -> Settings:
    return Settings(prefix="async")


def test_overrides_are_checked_when_set(make_bus: MakeBus) -> None:
    overrides = make_bus().registry.dependency_overrides
    with pytest.raises(ConfigurationError, match="sync dependency get_settings with the async"):
        overrides[get_settings] = get_async_settings
    with pytest.raises(ConfigurationError, match="parameter 'q' is not a dependency"):
        overrides[get_settings] = lambda q: Settings()
    overrides[get_session] = get_async_settings  # async for async: fine
    overrides[needs_query] = get_cache  # no handler can use needs_query: kept, no effect
    assert dict(overrides) == {get_session: get_async_settings, needs_query: get_cache}
    del overrides[get_session], overrides[needs_query]
    assert len(overrides) == 0

    registry = make_bus().registry
    registry.dependency_overrides[get_settings] = fake_settings
    with pytest.raises(ConfigurationError):  # assigning a mapping checks all of it first
        registry.dependency_overrides = {get_session: get_cache, get_cache: get_async_settings}
    assert dict(registry.dependency_overrides) == {get_settings: fake_settings}


def get_service(session: Annotated[str, Depends(get_session)]) -> str:
    """Sync, with an async dependency: fine for async handlers, as in FastAPI."""
    return f"service({session})"


def fake_service(settings: Annotated[Settings, Depends(get_async_settings)]) -> str:
    return f"fake service({settings.prefix})"


async def test_a_sync_dependency_of_async_ones_serves_async_handlers_and_is_overridable(
    make_bus: MakeBus, topic: str
) -> None:
    seen: list[str] = []

    async def handle(event: BaseEvent, service: str = Depends(get_service)) -> None:
        seen.append(service)

    bus = make_bus()
    bus.registry.dependency_overrides = {get_service: fake_service}
    await bus.registry.register(topic, handle)
    await bus.start()
    await bus.publish(Signup(topic=topic))
    await bus.drain(timeout=5)
    del bus.registry.dependency_overrides[get_service]
    await bus.publish(Signup(topic=topic))
    await bus.drain(timeout=5)
    assert seen == ["fake service(async)", "service(prod-session)"]


# -- signatures are checked at registration -----------------------------------------------


def needs_query(q: str = Query("x")) -> str:
    return q


def plain_parameter(limit: int) -> int:
    return limit


async def test_wrong_signatures_are_refused_at_registration(make_bus: MakeBus, topic: str) -> None:
    bus = make_bus()

    async def extra_param(event: BaseEvent, extra: int) -> None: ...

    with pytest.raises(ConfigurationError) as refused:
        await bus.registry.register(topic, extra_param)
    message = str(refused.value)
    assert f"handler {topic}:" in message and "extra_param" in message
    assert "parameter 'extra' is neither the event" in message

    with pytest.raises(ConfigurationError, match=r"handler .*extra_param.*'extra'"):

        @on_event(topic)
        async def extra_param(event: BaseEvent, extra: int) -> None: ...

    async def no_event() -> None: ...

    with pytest.raises(ConfigurationError, match="must take the event as its first"):
        await bus.registry.register(topic, no_event)

    async def event_as_dependency(settings: Settings = Depends(get_settings)) -> None: ...

    with pytest.raises(ConfigurationError, match="first parameter 'settings' receives the event"):
        await bus.registry.register(topic, event_as_dependency)

    async def request_bound(event: BaseEvent, request: Request) -> None: ...

    with pytest.raises(ConfigurationError, match="'request' needs an HTTP request"):
        await bus.registry.register(topic, request_bound)

    async def query_dependency(event: BaseEvent, q: str = Depends(needs_query)) -> None: ...

    with pytest.raises(ConfigurationError, match="dependency needs_query: parameter 'q' needs"):
        await bus.registry.register(topic, query_dependency)

    async def plain_dependency(event: BaseEvent, n: int = Depends(plain_parameter)) -> None: ...

    with pytest.raises(ConfigurationError, match="plain_parameter: parameter 'limit' is not a"):
        await bus.registry.register(topic, plain_dependency)

    def sync_with_async(event: BaseEvent, repo: str = Depends(get_repo)) -> None: ...

    with pytest.raises(ConfigurationError, match=r"is sync, but its dependency get_repo"):
        await bus.registry.register(topic, sync_with_async)

    class Local:
        pass

    async def unresolvable(event: BaseEvent, x: Annotated[Local, Depends(Local)]) -> None: ...

    with pytest.raises(ConfigurationError, match="cannot evaluate the annotation"):
        await bus.registry.register(topic, unresolvable)

    async def unresolvable_type(event: BaseEvent, x: Local = Depends()) -> None: ...

    with pytest.raises(ConfigurationError, match="'x': define the names it uses"):
        await bus.registry.register(topic, unresolvable_type)

    async def typed_wrong(event: Other) -> None: ...

    with pytest.raises(ConfigurationError, match="receives Signup events, but its event"):
        await bus.registry.register(Signup, typed_wrong, name=f"{topic}.typed")

    assert bus.registry.get_handlers(topic) == []


# Annotations are evaluated at registration, so these two may name each other.
def cycle_a(value: Annotated[str, Depends(cycle_b)]) -> str:
    return value


def cycle_b(value: Annotated[str, Depends(cycle_a)]) -> str:
    return value


async def test_a_dependency_cycle_is_refused(make_bus: MakeBus, topic: str) -> None:
    async def handle(event: BaseEvent, value: str = Depends(cycle_a)) -> None: ...

    with pytest.raises(ConfigurationError, match="dependency cycle: cycle_a -> cycle_b -> cycle_a"):
        await make_bus().registry.register(topic, handle)


async def test_handlers_with_only_the_event_never_call_the_resolver(
    make_bus: MakeBus, topic: str
) -> None:
    async def plain(event: BaseEvent, retries: int = 3) -> None: ...

    async def injected(event: BaseEvent, value: str = Depends(get_async_value)) -> None: ...

    bus = make_bus()
    assert (await bus.registry.register(topic, plain)).dependencies is None
    assert (await bus.registry.register(topic, injected)).dependencies is not None


# -- typed handlers ------------------------------------------------------------------


async def test_a_string_topic_handler_gets_the_published_class_whatever_its_annotation(
    make_bus: MakeBus, topic: str
) -> None:
    seen: list[type[BaseEvent]] = []

    async def handle(event: Signup) -> None:  # the annotation is for the type checker
        seen.append(type(event))

    bus = make_bus()
    await bus.registry.register(topic, handle)
    await bus.start()
    await bus.publish(Other(topic=topic))
    await bus.publish(Signup(topic=topic))
    await bus.drain(timeout=5)
    assert seen == [Other, Signup]


# -- a FastAPI app and its handlers share dependencies ------------------------------------


def test_an_endpoint_and_a_handler_share_the_apps_dependency(topic: str) -> None:
    log.clear()
    handled: list[str] = []

    @on_event(topic)
    async def handle(event: BaseEvent, repo: Annotated[str, Depends(get_repo)]) -> None:
        handled.append(repo)

    bus = EventBus(settings=EventBusSettings(shutdown_timeout=2.0))
    app = FastAPI(lifespan=create_lifespan(bus))

    @app.post("/signup")
    async def signup(repo: Annotated[str, Depends(get_repo)]) -> dict[str, str]:
        await bus.publish(Signup(topic=topic))
        return {"repo": repo}

    with TestClient(app) as http:
        assert http.post("/signup").json() == {"repo": "repo(prod-session)"}
        http.portal.call(bus.drain, 5)  # type: ignore[union-attr]
        bus.registry.dependency_overrides[get_settings] = fake_settings
        http.post("/signup")
        http.portal.call(bus.drain, 5)  # type: ignore[union-attr]

    assert handled == ["repo(prod-session)", "repo(test-session)"]


# -- a real Redis worker ---------------------------------------------------------------


def worker_store() -> Iterator[redis.Redis]:
    """A sync yield dependency: records its setup and cleanup in Redis."""
    store = client()
    attempt = store.incr(key("di:attempts"))
    store.rpush(key("di:log"), f"setup {attempt}")
    try:
        yield store
    finally:
        store.rpush(key("di:log"), f"cleanup {attempt}")


def worker_label() -> str:
    return "real"


def worker_label_override() -> str:
    return "overridden in the worker"


def _declare_worker_handlers() -> None:
    @on_event(WORKER_TOPIC, name="tests.di.worker.flaky")
    async def flaky(
        event: BaseEvent,
        store: Annotated[redis.Redis, Depends(worker_store)],
        label: str = Depends(worker_label),
    ) -> None:
        attempt = int(store.get(key("di:attempts")) or 0)
        store.rpush(key("di:log"), f"handle {attempt} {label}")
        if attempt < 3:
            raise RuntimeError(f"attempt {attempt} fails")

    # Overrides for the worker's own bus, set in a module only the worker imports.
    from eventbus.actors import bus

    bus.registry.dependency_overrides[worker_label] = worker_label_override


if os.environ.get(WORKER_ENV):
    _declare_worker_handlers()


async def test_a_redis_worker_cleans_up_yield_dependencies_after_each_attempt(
    make_redis_bus: MakeBus, namespace: str, redis_url: str, workers: Workers
) -> None:
    bus = make_redis_bus()
    await bus.start()
    workers.start(("tests.test_dependencies",), env={WORKER_ENV: "1"})
    await bus.publish(BaseEvent(topic=WORKER_TOPIC))

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    log_key = key("di:log", namespace)
    for _ in range(200):
        if r.llen(log_key) >= 9:
            break
        await asyncio.sleep(0.05)
    label = "overridden in the worker"
    assert r.lrange(log_key, 0, -1) == [
        *("setup 1", f"handle 1 {label}", "cleanup 1"),
        *("setup 2", f"handle 2 {label}", "cleanup 2"),
        *("setup 3", f"handle 3 {label}", "cleanup 3"),
    ]
    r.close()
