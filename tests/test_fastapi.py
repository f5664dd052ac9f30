"""FastAPI integration: the seed README's quick start, lifespans, correlation ids."""

from __future__ import annotations

import asyncio
import re
from contextlib import asynccontextmanager
from typing import Any

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from eventbus import (
    BaseEvent,
    EventBus,
    EventBusMiddleware,
    EventBusSettings,
    create_lifespan,
    get_correlation_id,
    get_event_bus,
    on_event,
)
from eventbus.fastapi import eventbus_lifespan


def make_quickstart(topic: str, seen: list[Any]) -> tuple[FastAPI, EventBus]:
    """The seed README's quick start, with the topic made unique for the test."""

    class UserCreated(BaseEvent):
        topic: str = "user.created"
        user_id: int
        username: str

    @on_event(topic)
    async def handle_user_created(event: BaseEvent) -> None:
        print(f"新用户: {event}")
        seen.append((event, get_correlation_id()))

    bus = EventBus()
    app = FastAPI(lifespan=create_lifespan(bus))
    app.add_middleware(EventBusMiddleware)

    @app.post("/users")
    async def create_user(bus: EventBus = Depends(get_event_bus)) -> dict[str, str]:
        event = UserCreated(topic=topic, user_id=1, username="alice")
        await bus.publish(event)
        await bus.drain(timeout=5)  # only so the test can look right after the response
        return {"status": "ok"}

    return app, bus


def test_quick_start_delivers_the_event_with_the_request_correlation_id(
    topic: str, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[Any] = []
    app, _ = make_quickstart(topic, seen)

    with TestClient(app) as client:
        response = client.post("/users", headers={"X-Correlation-ID": "req-42"})

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert response.headers["X-Correlation-ID"] == "req-42"
    [(event, cid)] = seen
    assert type(event).__name__ == "UserCreated"
    assert event.username == "alice"
    assert cid == "req-42"
    assert event.metadata["correlation_id"] == "req-42"
    assert "新用户" in capsys.readouterr().out


def test_correlation_id_is_generated_and_echoed(topic: str) -> None:
    seen: list[Any] = []
    app, _ = make_quickstart(topic, seen)

    with TestClient(app) as client:
        response = client.post("/users")

    cid = response.headers["X-Correlation-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", cid)
    assert seen[0][1] == cid


def test_forged_correlation_id_is_replaced(topic: str) -> None:
    seen: list[Any] = []
    app, _ = make_quickstart(topic, seen)

    with TestClient(app) as client:
        response = client.post("/users", headers={"X-Correlation-ID": "x\r\nSet-Cookie: a=b" * 3})

    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Correlation-ID"])


def test_middleware_example_returns_the_request_id() -> None:
    app = FastAPI()
    app.add_middleware(EventBusMiddleware)

    @app.get("/test")
    async def test() -> dict[str, str]:
        cid = get_correlation_id()
        return {"correlation_id": cid}

    with TestClient(app) as client:
        response = client.get("/test", headers={"X-Correlation-ID": "abc-1"})
    assert response.json() == {"correlation_id": "abc-1"}
    assert get_correlation_id() == ""  # nothing leaks out of the request


def test_lifespan_composes_with_the_apps_own(topic: str) -> None:
    order: list[str] = []
    bus = EventBus(settings=EventBusSettings(shutdown_timeout=1))

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        order.append("app start")
        async with eventbus_lifespan(bus, app):
            order.append(f"bus started={bus.started}")
            yield
        order.append(f"bus stopped={not bus.started}")

    app = FastAPI(lifespan=lifespan)
    with TestClient(app):
        pass
    assert order == ["app start", "bus started=True", "bus stopped=True"]


def test_get_event_bus_without_lifespan_says_what_to_do() -> None:
    app = FastAPI()

    @app.get("/")
    async def index(bus: EventBus = Depends(get_event_bus)) -> None:
        return None

    with (
        TestClient(app, raise_server_exceptions=True) as client,
        pytest.raises(RuntimeError, match="create_lifespan"),
    ):
        client.get("/")


def test_health_endpoint_example(topic: str) -> None:
    bus = EventBus()
    app = FastAPI(lifespan=create_lifespan(bus))

    @app.get("/health")
    async def health(bus: EventBus = Depends(get_event_bus)) -> dict[str, Any]:
        results = await bus.health.check()
        healthy = all(r.status.value == "healthy" for r in results)
        return {
            "status": "healthy" if healthy else "unhealthy",
            "backends": [
                {"name": r.backend, "status": r.status.value, "detail": r.detail} for r in results
            ],
        }

    with TestClient(app) as client:
        body = client.get("/health").json()
    assert body["status"] == "healthy"
    assert body["backends"][0]["name"] == "sync"


async def test_concurrent_requests_keep_their_own_correlation_ids(
    topic: str,
) -> None:
    """Correlation ids are per event: two requests' events never mix them up."""
    seen: dict[str, str] = {}

    async def handle(event: BaseEvent) -> None:
        await asyncio.sleep(0.01)
        seen[event.metadata["request"]] = get_correlation_id()

    bus = EventBus()
    await bus.registry.register(topic, handle)
    app = FastAPI(lifespan=create_lifespan(bus))
    app.add_middleware(EventBusMiddleware)

    @app.post("/{name}")
    async def publish(name: str) -> None:
        await bus.publish(BaseEvent(topic=topic, metadata={"request": name}))

    with TestClient(app) as client:
        for name in ("a", "b", "c"):
            client.post(f"/{name}", headers={"X-Correlation-ID": f"cid-{name}"})
        client.portal.call(bus.drain, 5)  # type: ignore[union-attr]
    assert seen == {"a": "cid-a", "b": "cid-b", "c": "cid-c"}
