"""What a Redis worker says about subscriptions, with real worker processes:

- a subscription of its own service that no handler of the worker (and no live
  worker) serves is warned about once at boot, named, with the command that
  removes it;
- events parked for such a handler are logged once, then summarized, not one
  INFO line per event;
- a handler subscribed to a mistyped topic is pointed out ("did you mean") at
  boot and by ``eventbus subscriptions list``, from what Redis knows of the
  topics events were published to.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import redis

pytest.register_assert_rewrite("tests.redis_support")
from eventbus import EventBus  # noqa: E402
from eventbus.redis import consumer  # noqa: E402
from eventbus.redis.subscriptions import list_subscriptions  # noqa: E402
from tests.redis_support import (  # noqa: E402
    Workers,
    redis_cli,
    sync_subscriptions,
    wait_until,
)

pytest_plugins = ["tests.redis_support"]
pytestmark = pytest.mark.timeout(120)

V1, V2 = "tests.deploy.orders_v1", "tests.deploy.orders_v2"


def parked(redis_url: str, namespace: str, handler: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        rows = list_subscriptions(client, namespace, 10.0)
        return sum(r.parked for r in rows if r.handler == handler)
    finally:
        client.close()


async def test_a_deleted_handler_is_named_at_boot_and_its_parked_events_logged_once(
    redis_url: str, namespace: str, workers: Workers, make_redis_bus: Callable[..., EventBus]
) -> None:
    from tests.deploy.events import OrderPlaced

    # v2 (email, invoice, audit) was deployed; v1 (no audit) is what runs now
    sync_subscriptions(redis_url, namespace, (V2,))
    worker = workers.start((V1,), threads=2)
    wait_until(lambda: "orders.audit" in worker.output(), 15, "the boot warning")
    boot = [line for line in worker.output().splitlines() if "orders.audit" in line]
    assert len(boot) == 1, boot
    assert "tests|deploy.orders|orders.audit" in boot[0]
    assert "eventbus subscriptions remove orders.audit --service tests --yes" in boot[0]
    assert "orders.email" not in worker.output().split("WARNING")[-1]  # served: no warning

    bus = make_redis_bus()
    await bus.start()
    for n in range(40):
        await bus.publish(OrderPlaced(n=n))
    wait_until(lambda: parked(redis_url, namespace, "orders.audit") == 40, 20, "40 parked")
    lines = [line for line in worker.output().splitlines() if "Parked" in line]
    assert len(lines) == 1, lines  # one line, not one per event
    assert "orders.audit" in lines[0]


def test_parked_events_are_summarized_with_their_count(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr(consumer.time, "monotonic", lambda: now[0])
    log = consumer.ParkedLog(interval=60)
    with caplog.at_level(logging.INFO, logger=consumer.__name__):
        for _ in range(25):
            log.parked("orders.gone")
            now[0] += 1  # 25 events in 25 s: one line
        assert len(caplog.records) == 1
        now[0] += 40  # the next one, 65 s after the first line, brings the summary
        log.parked("orders.gone")
        log.parked("orders.other")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert messages[1].startswith("Parked 25 event(s) for handler orders.gone in the last 65s")
    assert "eventbus subscriptions remove orders.gone --yes" in messages[1]
    assert messages[2].startswith("Parked an event for handler orders.other")


async def test_a_mistyped_topic_is_pointed_out_at_boot_and_by_subscriptions_list(
    redis_url: str, namespace: str, workers: Workers, make_redis_bus: Callable[..., EventBus]
) -> None:
    from tests.deploy.events import OrderPlaced

    # deploy.orders is subscribed (by another service) and published: routed, so
    # the unrouted window never sees it; the publisher notes the topic itself
    sync_subscriptions(redis_url, namespace, (V1,), env={"EVENTBUS_SERVICE": "billing"})
    bus = make_redis_bus()
    await bus.start()
    await bus.publish(OrderPlaced(n=1))
    await bus.publish(OrderPlaced(n=2))

    worker = workers.start(("tests.typo_handlers",), threads=1)
    wait_until(lambda: "did you mean" in worker.output(), 15, "the typo warning")
    [line] = [ln for ln in worker.output().splitlines() if "did you mean" in ln]
    assert "'deploy.ordres'" in line and "did you mean 'deploy.orders'?" in line

    listed = redis_cli(redis_url, namespace, "subscriptions", "list")
    assert listed.returncode == 0, listed.stderr
    assert "typo.ordres" in listed.stdout
    [warning] = listed.stderr.splitlines()
    assert warning == (
        "warning: Topic 'deploy.ordres' has subscriptions (tests) but no event was ever "
        "published to it; did you mean 'deploy.orders'?"
    )


async def test_a_topic_only_one_service_subscribes_is_no_typo_by_itself(
    redis_url: str, namespace: str, workers: Workers
) -> None:
    worker = workers.start(("tests.typo_handlers", V1), threads=1)
    listed = redis_cli(redis_url, namespace, "subscriptions", "list")
    # deploy.ordres is close to deploy.orders, which V1 subscribes: same service,
    # both subscribed, neither published yet: nothing says one is a typo of the other
    assert "warning" not in listed.stderr, listed.stderr
    assert "did you mean" not in worker.output()
