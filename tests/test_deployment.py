"""Deployment shapes on the Redis backend, with real processes: a web process that
holds only the event classes, workers built from other code, two services on one
Redis, a rolling deploy that adds and then deletes a handler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

pytest.register_assert_rewrite("tests.redis_support")  # before it is imported below
from tests.redis_support import (  # noqa: E402
    ROOT,
    TEST_REDELIVERY_TIMEOUT,
    Workers,
    free_port,
    redis_cli,
    sync_subscriptions,
    unfinished,
    wait_settled,
    wait_until,
)

pytest_plugins = ["tests.redis_support"]
pytestmark = pytest.mark.timeout(120)

V1, V2, V3 = "tests.deploy.orders_v1", "tests.deploy.orders_v2", "tests.deploy.orders_v3"


class Web:
    """``uvicorn tests.deploy.web:app`` in its own process."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}"
        self.log = log

    def publish(self, *numbers: int) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            for n in numbers:
                client.post(f"/orders/{n}").raise_for_status()

    def get(self, path: str) -> object:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            return client.get(path).json()


@pytest.fixture
def web(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[Web]:
    port = free_port()
    log = tmp_path / "web.log"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "EVENTBUS_BACKEND": "redis",
        "EVENTBUS_REDIS_URL": redis_url,
        "EVENTBUS_REDIS_NAMESPACE": namespace,
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "tests.deploy.web:app", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Web(process, port, log)

    def up() -> bool:
        try:
            server.get("/handler-modules")
        except httpx.HTTPError:
            assert process.poll() is None, log.read_text()
            return False
        return True

    try:
        wait_until(up, 20, "the web process")
        yield server
    finally:
        process.terminate()
        process.wait(10)


def seen(r: redis.Redis, namespace: str, handler: str) -> set[int]:
    return {int(n) for n in r.smembers(f"{namespace}:test:{handler}:seen")}


def runs(r: redis.Redis, namespace: str, handler: str) -> int:
    return int(r.get(f"{namespace}:test:{handler}:runs") or 0)


def subscriptions(redis_url: str, namespace: str) -> dict[str, dict[str, object]]:
    done = redis_cli(redis_url, namespace, "subscriptions", "list", "--json")
    assert done.returncode == 0, done.stderr
    return {f"{row['service']}|{row['handler']}": row for row in json.loads(done.stdout)}


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def test_a_web_process_without_handler_code_reaches_every_handler_of_the_workers(
    web: Web, workers: Workers, r: redis.Redis, namespace: str
) -> None:
    assert web.get("/handler-modules") == []
    worker = workers.start((V1,), threads=4)
    web.publish(*range(10))
    wait_until(lambda: seen(r, namespace, "email") == set(range(10)), 15, "email")
    wait_until(lambda: seen(r, namespace, "invoice") == set(range(10)), 15, "invoice")

    worker.stop()  # no worker runs: the events wait in Redis for both subscriptions
    assert unfinished(r, namespace) == 0  # (the first ten are all done)
    web.publish(*range(10, 20))
    assert unfinished(r, namespace) == 20  # kept for email and for invoice
    assert seen(r, namespace, "email") == set(range(10))
    workers.start((V1,), threads=4)
    wait_until(lambda: seen(r, namespace, "email") == set(range(20)), 15, "email after restart")
    wait_until(lambda: seen(r, namespace, "invoice") == set(range(20)), 15, "invoice too")
    assert runs(r, namespace, "email") == runs(r, namespace, "invoice") == 20
    assert "No subscription handles" not in web.log.read_text()


def test_two_services_on_one_redis_each_get_every_event_once(
    web: Web, workers: Workers, r: redis.Redis, namespace: str, redis_url: str
) -> None:
    workers.start((V1,), threads=4)
    workers.start(("tests.deploy.shipping",), threads=4, env={"EVENTBUS_SERVICE": "shipping"})
    web.publish(*range(30))
    for handler in ("email", "invoice", "ship", "shipping-email"):
        wait_until(
            lambda h=handler: seen(r, namespace, h) == set(range(30)),  # type: ignore[misc]
            20,
            f"{handler} to see every event",
        )
    wait_settled(redis_url, namespace)  # every delivery done and acked: counts are final
    # Exactly once each, although both services have a handler named orders.email.
    assert [runs(r, namespace, h) for h in ("email", "invoice", "ship", "shipping-email")] == [
        30,
        30,
        30,
        30,
    ]
    listed = subscriptions(redis_url, namespace)
    assert {key for key in listed} == {
        "tests|orders.email",
        "tests|orders.invoice",
        "shipping|orders.email",
        "shipping|deploy.orders:tests.deploy.shipping.ship",
    }
    assert listed["shipping|orders.email"]["queue"] == "shipping.eventbus"
    assert listed["tests|orders.email"]["queue"] == "tests.eventbus"
    dlq = redis_cli(redis_url, namespace, "dlq", "list", "--json")
    assert json.loads(dlq.stdout)["size"] == 0  # nothing dead-lettered as ActorNotFound


def test_rolling_deploy_adds_then_deletes_a_handler(
    web: Web, workers: Workers, r: redis.Redis, namespace: str, redis_url: str
) -> None:
    v1 = workers.start((V1,), threads=4)
    web.publish(*range(0, 10))
    wait_until(lambda: seen(r, namespace, "invoice") == set(range(10)), 15, "v1 handled")

    # v2 adds "audit" and runs beside v1 for a while: v1 workers are handed audit
    # events they cannot run; they park them for v2 instead of dead-lettering them.
    v2 = workers.start((V2,), threads=4)
    web.publish(*range(10, 40))
    v1.stop()
    wait_until(lambda: seen(r, namespace, "audit") == set(range(10, 40)), 20, "v2's audit")
    wait_until(lambda: seen(r, namespace, "email") == set(range(40)), 15, "email")
    wait_until(lambda: seen(r, namespace, "invoice") == set(range(40)), 15, "invoice")
    assert runs(r, namespace, "audit") == 30
    assert runs(r, namespace, "email") == runs(r, namespace, "invoice") == 40

    # v3 deletes "invoice": its subscription stays, and its backlog grows.
    workers.start((V3,), threads=4)
    v2.stop()
    web.publish(*range(40, 55))
    wait_until(lambda: seen(r, namespace, "audit") == set(range(10, 55)), 15, "v3's audit")
    wait_until(
        lambda: subscriptions(redis_url, namespace)["tests|orders.invoice"]["backlog"] == 15,
        15,
        "the deleted handler's backlog",
    )
    listed = subscriptions(redis_url, namespace)
    assert listed["tests|orders.invoice"]["live_workers"] == 0
    assert listed["tests|orders.audit"]["live_workers"] == 1

    refused = redis_cli(redis_url, namespace, "subscriptions", "remove", "orders.invoice")
    assert refused.returncode == 2 and "--yes" in refused.stdout + refused.stderr
    removed = redis_cli(redis_url, namespace, "subscriptions", "remove", "orders.invoice", "--yes")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert "15 waiting event(s) dead-lettered" in removed.stdout
    dlq = json.loads(
        redis_cli(redis_url, namespace, "dlq", "list", "--json", "--limit", "100").stdout
    )
    assert dlq["size"] == 15
    assert {item["error_type"] for item in dlq["items"]} == {"SubscriptionRemoved"}
    assert {item["handler"] for item in dlq["items"]} == {"orders.invoice"}
    assert "removed" in dlq["items"][0]["error"]

    web.publish(55)
    wait_until(lambda: 55 in seen(r, namespace, "email"), 15, "the next event")
    assert "tests|orders.invoice" not in subscriptions(redis_url, namespace)
    assert seen(r, namespace, "invoice") == set(range(40))
    assert TEST_REDELIVERY_TIMEOUT  # the workers' fast recovery window is in use


def test_events_are_kept_after_a_release_step_even_before_any_worker_starts(
    web: Web, workers: Workers, r: redis.Redis, namespace: str, redis_url: str
) -> None:
    out = sync_subscriptions(redis_url, namespace, (V1,))
    assert "2 subscription(s) written" in out
    web.publish(*range(5))
    listed = subscriptions(redis_url, namespace)
    assert listed["tests|orders.email"]["backlog"] == 5
    assert listed["tests|orders.email"]["live_workers"] == 0
    workers.start((V1,), threads=2)
    wait_until(lambda: seen(r, namespace, "email") == set(range(5)), 15, "the kept events")
    wait_until(lambda: seen(r, namespace, "invoice") == set(range(5)), 15, "both handlers")


def test_health_is_degraded_while_a_subscription_has_a_backlog_and_no_worker(
    redis_url: str, namespace: str, workers: Workers, make_redis_bus: Callable[..., object]
) -> None:
    sync_subscriptions(redis_url, namespace, (V1,))

    async def check() -> list[object]:
        from tests.deploy.events import OrderPlaced

        bus = make_redis_bus()
        await bus.start()  # type: ignore[attr-defined]
        before = await bus.health.check()  # type: ignore[attr-defined]
        await bus.publish(OrderPlaced(n=1))  # type: ignore[attr-defined]
        during = await bus.health.check()  # type: ignore[attr-defined]
        workers.start((V1,), threads=2)
        await bus.drain(timeout=15)  # type: ignore[attr-defined]
        after = await bus.health.check()  # type: ignore[attr-defined]
        return [before[1], during[1], after[1]]

    import asyncio

    before, during, after = asyncio.run(check())
    assert before.status.value == "healthy"  # type: ignore[attr-defined]
    assert during.status.value == "degraded"  # type: ignore[attr-defined]
    assert "orders.email" in during.detail  # type: ignore[attr-defined]
    assert after.status.value == "healthy"  # type: ignore[attr-defined]
