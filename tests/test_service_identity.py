"""Service identity: two codebases with a flat ``handlers.py`` must not become one service.

The worker processes are started as a team runs them: ``dramatiq eventbus.actors
handlers`` in a directory of its own, with the settings in the environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from eventbus import BaseEvent, ConfigurationError, EventBus, EventBusSettings
from eventbus.bus import GENERIC_SERVICE_NAMES
from eventbus.redis.subscriptions import list_subscriptions
from eventbus.registry import make_spec

pytest_plugins = ["tests.redis_support"]

FLAT_HANDLERS = """
from eventbus import BaseEvent, on_event


class OrderPlaced(BaseEvent):
    topic: str = "order.placed"
    order_id: int = 0


@on_event(OrderPlaced)
async def send_mail(event: OrderPlaced) -> None:
    print("mail for", event.order_id)
"""


def _worker(code: Path, redis_url: str, namespace: str, **env: str) -> subprocess.Popen[str]:
    environment = {
        **os.environ,
        "EVENTBUS_BACKEND": "redis",
        "EVENTBUS_REDIS_URL": redis_url,
        "EVENTBUS_REDIS_NAMESPACE": namespace,
        "PYTHONPATH": str(code),
        **env,
    }
    if "EVENTBUS_SERVICE" not in env:
        environment.pop("EVENTBUS_SERVICE", None)
    return subprocess.Popen(
        [sys.executable, "-m", "dramatiq", "eventbus.actors", "handlers", "-p", "1", "-t", "1"],
        cwd=code,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture
def flat_codebase(tmp_path: Path) -> Path:
    code = tmp_path / "mailer"
    code.mkdir()
    (code / "handlers.py").write_text(FLAT_HANDLERS)
    return code


def test_a_worker_of_a_flat_handlers_module_refuses_to_start_without_a_service(
    flat_codebase: Path, redis_url: str, namespace: str
) -> None:
    worker = _worker(flat_codebase, redis_url, namespace)
    output, _ = worker.communicate(timeout=60)
    assert worker.returncode != 0, output
    assert "service would be named 'handlers'" in output
    assert "set EVENTBUS_SERVICE" in output
    assert "ready for action" not in output  # it never consumed under the shared name
    assert not redis.Redis.from_url(redis_url).keys(f"{namespace}*")  # no subscription written


def test_the_same_worker_starts_with_its_own_service_name(
    flat_codebase: Path, redis_url: str, namespace: str
) -> None:
    worker = _worker(flat_codebase, redis_url, namespace, EVENTBUS_SERVICE="mailer")
    client = redis.Redis.from_url(redis_url)
    try:
        started = time.monotonic()
        while not [s for s in list_subscriptions(client, namespace, 10.0) if s.service == "mailer"]:
            assert worker.poll() is None, worker.communicate()[0]
            assert time.monotonic() - started < 60, "the worker wrote no subscription"
            time.sleep(0.05)
    finally:
        worker.terminate()
        output, _ = worker.communicate(timeout=30)
    assert "service would be named" not in output


def test_a_worker_whose_handler_module_fails_to_import_exits_non_zero(
    tmp_path: Path, redis_url: str, namespace: str
) -> None:
    code = tmp_path / "broken"
    code.mkdir()
    (code / "handlers.py").write_text("raise RuntimeError('the handlers module is broken')\n")
    worker = _worker(code, redis_url, namespace, EVENTBUS_SERVICE="broken")
    output, _ = worker.communicate(timeout=60)
    assert worker.returncode != 0, output
    assert "the handlers module is broken" in output
    assert "ready for action" not in output


class _Ping(BaseEvent):
    topic: str = "service.identity.ping"


def test_generic_names_are_refused_only_where_subscriptions_are_shared() -> None:
    assert {"handlers", "app", "main", "tasks", "worker", "default"} <= GENERIC_SERVICE_NAMES

    async def handler(event: _Ping) -> None:
        pass

    handler.__module__ = "handlers"  # as if defined in a flat handlers.py

    def bus(**settings: str) -> EventBus:
        made = EventBus(settings=EventBusSettings(**settings))  # type: ignore[arg-type]
        made.registry.add(make_spec(_Ping, handler))  # this bus only, not process-wide
        return made

    bus(backend="sync").check_service(consume=True)  # the embedded backend shares nothing
    shared = bus(backend="redis")
    shared.check_service(consume=False)  # a web process that only publishes
    with pytest.raises(ConfigurationError, match="service would be named"):
        shared.check_service(consume=True)
    bus(backend="redis", service="mailer").check_service(consume=True)
