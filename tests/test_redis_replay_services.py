"""Redis dead letters of two services, and replay to one of them (issue 23, item 2;
Kafka has the same in tests/test_kafka_replay_services.py).

Two real worker processes from different codebases (tests/two_services/svc_billing
and svc_mailer, each with its own copy of the event class, its own
``EVENTBUS_SERVICE``, and the same handler name) subscribe to one topic.  Both
handlers fail one event: two dead letters, with distinct ids, each naming its
service's queue and the handler.  ``eventbus dlq replay`` of one reaches that
service's handler only: the other service gets no duplicate.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import BaseModel

pytest.register_assert_rewrite("tests.redis_support")
from eventbus import BaseEvent, EventBus  # noqa: E402
from tests.redis_support import ROOT, Workers, redis_cli, wait_settled, wait_until  # noqa: E402

pytest_plugins = ["tests.redis_support"]
pytestmark = pytest.mark.timeout(120)

CODEBASES = ROOT / "tests" / "two_services"
HANDLER = "orders.handle"


class OrderPlaced(BaseEvent):
    """This test's copy of the event: the publisher is a third codebase."""

    topic: str = "two.orders"
    order_id: int


def handled(out: Path) -> list[str]:
    return out.read_text().splitlines() if out.exists() else []


class Record(BaseModel):
    id: str
    handler: str
    queue: str
    error: str


def dead_letters(redis_url: str, namespace: str) -> list[Record]:
    done = redis_cli(redis_url, namespace, "dlq", "list", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    return [Record.model_validate(item) for item in json.loads(done.stdout)["items"]]


async def test_two_services_dead_letters_are_replayed_each_to_its_own_service(
    redis_url: str,
    namespace: str,
    workers: Workers,
    make_redis_bus: Callable[..., EventBus],
    tmp_path: Path,
) -> None:
    fail = tmp_path / "down"
    fail.touch()
    out = tmp_path / "handled"
    for service in ("billing", "mailer"):
        workers.start(
            (f"svc_{service}.handlers",),
            threads=2,
            env={
                "PYTHONPATH": str(CODEBASES),  # its own codebase only
                "EVENTBUS_SERVICE": service,
                "FAIL_FILE": str(fail),
                "HANDLED_OUT": str(out),
            },
        )
    assert "svc_billing" not in sys.modules and "svc_mailer" not in sys.modules

    bus = make_redis_bus()
    await bus.start()
    await bus.publish(OrderPlaced(order_id=7))
    wait_until(lambda: len(dead_letters(redis_url, namespace)) == 2, 20, "two dead letters")
    records = {r.queue: r for r in dead_letters(redis_url, namespace)}
    assert set(records) == {"billing.eventbus", "mailer.eventbus"}
    billing, mailer = records["billing.eventbus"], records["mailer.eventbus"]
    assert billing.id != mailer.id
    assert billing.handler == mailer.handler == HANDLER
    assert "billing cannot handle order 7" in billing.error
    assert "mailer cannot handle order 7" in mailer.error
    listed = json.loads(redis_cli(redis_url, namespace, "subscriptions", "list", "--json").stdout)
    assert {(r["service"], r["handler"]) for r in listed} == {
        ("billing", HANDLER),
        ("mailer", HANDLER),
    }

    fail.unlink()
    replayed = redis_cli(redis_url, namespace, "dlq", "replay", billing.id)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    wait_until(lambda: handled(out) == ["billing 7"], 20, "billing's replay")
    wait_settled(redis_url, namespace)  # every delivery done: the counts are final
    assert handled(out) == ["billing 7"]  # mailer got no duplicate
    assert [r.id for r in dead_letters(redis_url, namespace)] == [mailer.id]

    replayed = redis_cli(redis_url, namespace, "dlq", "replay", mailer.id)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    wait_until(lambda: "mailer 7" in handled(out), 20, "mailer's replay")
    wait_settled(redis_url, namespace)
    assert sorted(handled(out)) == ["billing 7", "mailer 7"]
    assert dead_letters(redis_url, namespace) == []
