"""``health_router()``: readiness answers 503 when a component is unhealthy, liveness
needs no server, and the JSON keys are the attributes' names.  Against the embedded
backend, a real Redis, and a Redis server killed under a running app."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from eventbus import EventBus, EventBusSettings, HealthResult, HealthStatus, create_lifespan
from eventbus.fastapi import health_router
from eventbus.health import overall
from eventbus.redis.backend import RedisBackend

pytest.register_assert_rewrite("tests.redis_support")
from tests.redis_support import (  # noqa: E402
    TEST_REDELIVERY_TIMEOUT,
    RedisServer,
    require_redis_server_binary,
    sync_subscriptions,
)

pytest_plugins = ["tests.redis_support", "tests.kafka_support"]
pytestmark = pytest.mark.timeout(60)

ATTRIBUTES = {f.name for f in dataclasses.fields(HealthResult)}


def app_with(bus: EventBus, **router_options: Any) -> FastAPI:
    app = FastAPI(lifespan=create_lifespan(bus))
    app.include_router(health_router(**router_options))
    return app


def redis_bus(url: str, namespace: str) -> EventBus:
    backend = RedisBackend(url=url, namespace=namespace, redelivery_timeout=TEST_REDELIVERY_TIMEOUT)
    return EventBus(backend=backend, settings=EventBusSettings(shutdown_timeout=2.0))


def test_result_keys_are_the_attribute_names() -> None:
    result = HealthResult("redis", HealthStatus.DEGRADED, "2 waiting")

    assert set(result.to_dict()) == ATTRIBUTES
    assert result.to_dict() == {"backend": "redis", "status": "degraded", "detail": "2 waiting"}


def test_overall_status_is_the_worst() -> None:
    ok = HealthResult("a", HealthStatus.HEALTHY)
    slow = HealthResult("b", HealthStatus.DEGRADED)
    down = HealthResult("c", HealthStatus.UNHEALTHY)

    assert overall([ok, ok]) is HealthStatus.HEALTHY
    assert overall([ok, slow]) is HealthStatus.DEGRADED
    assert overall([slow, down, ok]) is HealthStatus.UNHEALTHY


def test_ready_live_and_the_bare_prefix_answer_200_on_a_healthy_bus() -> None:
    with TestClient(app_with(EventBus())) as client:
        answers = {path: client.get(path) for path in ("/health", "/health/ready", "/health/live")}

    for path, response in answers.items():
        assert response.status_code == 200, (path, response.text)
        body = response.json()
        assert body["status"] == "healthy"
        assert [set(check) for check in body["backends"]] == [ATTRIBUTES]
        assert body["backends"][0]["backend"] == "sync"
    assert "pending" in answers["/health/ready"].json()["backends"][0]["detail"]


def test_a_dead_dispatcher_fails_both_probes_with_503() -> None:
    bus = EventBus()
    with TestClient(app_with(bus)) as client:
        dispatcher = bus.backend.dispatcher  # type: ignore[attr-defined]
        client.portal.call(cancel_and_wait, dispatcher.task)  # type: ignore[union-attr]

        ready = client.get("/health/ready")
        live = client.get("/health/live")

    for response in (ready, live):
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "unhealthy"
        assert "dispatcher is dead" in body["backends"][0]["detail"]


async def cancel_and_wait(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_a_bus_that_is_not_started_is_503() -> None:
    bus = EventBus()
    app = FastAPI()  # no lifespan: the bus never starts
    app.include_router(health_router(bus=bus))
    client = TestClient(app)

    for path in ("/health/ready", "/health/live"):
        response = client.get(path)
        assert response.status_code == 503
        assert response.json()["backends"] == [
            {"backend": "bus", "status": "unhealthy", "detail": "not started"}
        ]


def test_an_app_without_a_bus_is_503_saying_what_to_do() -> None:
    app = FastAPI()
    app.include_router(health_router())

    response = TestClient(app).get("/health")

    assert response.status_code == 503
    assert "create_lifespan(bus)" in response.json()["backends"][0]["detail"]


def test_prefix_and_dependencies_are_honoured() -> None:
    calls: list[str] = []

    def audit() -> None:
        calls.append("audited")

    from fastapi import Depends

    app = app_with(EventBus(), prefix="/ops/health", dependencies=[Depends(audit)])
    with TestClient(app) as client:
        assert client.get("/ops/health/live").status_code == 200
        assert client.get("/health/live").status_code == 404
    assert calls == ["audited"]


def test_the_routes_are_documented_in_openapi() -> None:
    schema = app_with(EventBus()).openapi()

    for path in ("/health", "/health/ready", "/health/live"):
        responses = schema["paths"][path]["get"]["responses"]
        assert {"200", "503"} <= set(responses)


def test_the_example_app_answers_curl_health() -> None:
    from examples.app import app

    with TestClient(app) as client:
        health = client.get("/health")
        live = client.get("/health/live")

    assert (health.status_code, live.status_code) == (200, 200)
    body = health.json()
    assert body["status"] == "healthy"
    [check] = body["backends"]
    assert set(check) == ATTRIBUTES
    assert (check["backend"], check["status"]) == ("sync", "healthy")


# -- Redis: a real server ---------------------------------------------------------------


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test only, so that it can be killed."""
    require_redis_server_binary()
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


def test_redis_down_fails_readiness_but_not_liveness(
    own_redis: RedisServer, namespace: str
) -> None:
    bus = redis_bus(own_redis.url, namespace)
    with TestClient(app_with(bus)) as client:
        assert client.get("/health/ready").status_code == 200
        own_redis.kill()
        try:
            ready = client.get("/health/ready")
            live = client.get("/health/live")
        finally:
            own_redis.start()  # the bus stops cleanly on a server that answers

    assert ready.status_code == 503
    body = ready.json()
    assert body["status"] == "unhealthy"
    assert {check["backend"]: check["status"] for check in body["backends"]}["redis"] == (
        "unhealthy"
    )
    assert live.status_code == 200, live.text  # no round trip: nothing to restart for
    assert live.json()["status"] == "healthy"


def test_a_backlog_without_workers_is_degraded_and_still_200(
    redis_url: str, namespace: str
) -> None:
    from tests.deploy.events import OrderPlaced

    sync_subscriptions(redis_url, namespace, ("tests.deploy.orders_v1",))
    bus = redis_bus(redis_url, namespace)
    with TestClient(app_with(bus)) as client:
        client.portal.call(bus.publish, OrderPlaced(n=1))
        response = client.get("/health/ready")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "degraded"
    degraded = [c for c in body["backends"] if c["status"] == "degraded"]
    assert [c["backend"] for c in degraded] == ["redis.workers"]
    assert "no live worker" in degraded[0]["detail"]


# -- Kafka: a real Kafka-protocol broker ------------------------------------------------


async def test_kafka_liveness_follows_the_consumer_task(
    make_kafka_bus: Callable[..., EventBus],
) -> None:
    bus = make_kafka_bus(consume=True)
    await bus.start()
    app = FastAPI()
    app.include_router(health_router(bus=bus))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        alive = await client.get("/health/live")
        bridge = bus.backend.bridge  # type: ignore[attr-defined]
        await cancel_and_wait(bridge.task)
        dead = await client.get("/health/live")

    assert alive.status_code == 200, alive.text
    assert {c["backend"]: c["status"] for c in alive.json()["backends"]} == {
        "kafka": "healthy",
        "kafka-bridge": "healthy",
    }
    assert dead.status_code == 503
    [bridge_check] = [c for c in dead.json()["backends"] if c["backend"] == "kafka-bridge"]
    assert bridge_check["status"] == "unhealthy"
    assert "consumer task ended" in bridge_check["detail"]
