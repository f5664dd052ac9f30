"""Event identity across codebases (issue 23, item 1).

Two services hold their own copies of ``OrderPlaced`` (tests/codebase_a publishes,
tests/codebase_b handles, in a worker process that never imports codebase A): a
handler typed by a class gets every event of its topic validated into its own
class, on Redis and on Kafka alike, with no setting.  This test process imports
codebase A only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from pydantic import create_model

from eventbus import BaseEvent, EventBus
from eventbus.events import decode_event, encode_event
from tests.codebase_a.events import TOPIC, OrderPlaced
from tests.kafka_helpers import ROOT, create_topic, wait_for, worker_env
from tests.redis_support import Workers, make_redis_bus, namespace, redis_url, workers  # noqa: F401

pytest_plugins = ["tests.kafka_support"]

#: Orders published per test.
ORDERS = 5
#: Seconds a worker process gets to handle them (its start included).
HANDLED_WITHIN = 30.0


def handled_by_b(out: Path) -> list[tuple[int, str]]:
    """``(order_id, module of the class it was decoded into)`` per handled event."""
    if not out.exists():
        return []
    rows = [line.split() for line in out.read_text().splitlines()]
    return [(int(order), module) for order, module in rows]


def orders(topic: str) -> list[OrderPlaced]:
    return [OrderPlaced(topic=topic, order_id=i, total_cents=100 * i) for i in range(ORDERS)]


def expected() -> list[tuple[int, str]]:
    return [(i, "tests.codebase_b.events") for i in range(ORDERS)]


def start_kafka_worker(
    bootstrap: str, group: str, topic: str, out: Path, log: Path
) -> subprocess.Popen[bytes]:
    """A Kafka worker process of codebase B (``python -m eventbus.kafka``)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        **worker_env(bootstrap, group),
        "CODEBASE_TOPIC": topic,
        "CODEBASE_OUT": str(out),
    }
    with log.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "eventbus.kafka", "tests.codebase_b.handlers"],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def test_kafka_handler_of_another_codebase_gets_the_copied_class(
    make_kafka_bus: Callable[..., EventBus],
    kafka_bootstrap: str,
    kafka_names: tuple[str, str],
    tmp_path: Path,
) -> None:
    topic, group = kafka_names
    await create_topic(kafka_bootstrap, topic, 1)
    out = tmp_path / "handled"
    log = tmp_path / "worker.log"
    assert "tests.codebase_b.events" not in sys.modules  # B's class is not known here
    worker = start_kafka_worker(kafka_bootstrap, group, topic, out, log)
    try:
        publisher = make_kafka_bus(consume=False, group_id=f"{group}.shop")
        await publisher.start()
        await publisher.publish_many(orders(topic))
        await wait_for(
            lambda: len(handled_by_b(out)) >= ORDERS or "dead-lettered" in log.read_text(),
            HANDLED_WITHIN,
            "codebase B's worker to handle codebase A's events",
        )
        assert sorted(handled_by_b(out)) == expected(), log.read_text()
        assert "dead-lettered" not in log.read_text()
    finally:
        worker.terminate()
        worker.wait(timeout=15)


async def test_redis_handler_of_another_codebase_gets_the_copied_class(
    make_redis_bus: Callable[..., EventBus],  # noqa: F811
    workers: Workers,  # noqa: F811
    tmp_path: Path,
) -> None:
    topic = f"codebase.{os.getpid()}.{tmp_path.name}"
    out = tmp_path / "handled"
    workers.start(
        ("tests.codebase_b.handlers",),
        threads=1,
        env={"CODEBASE_TOPIC": topic, "CODEBASE_OUT": str(out)},
    )
    publisher = make_redis_bus()
    await publisher.start()
    await publisher.publish_many(orders(topic))
    await wait_for(
        lambda: len(handled_by_b(out)) >= ORDERS, HANDLED_WITHIN, "codebase B's Redis worker"
    )
    assert sorted(handled_by_b(out)) == expected()


def test_default_type_name_is_topic_and_class_name_and_old_module_names_still_decode() -> None:
    event = OrderPlaced(order_id=1, total_cents=5)
    assert event.event_type == f"{TOPIC}:OrderPlaced"  # the same in codebase B's copy
    old = {"type": "tests.codebase_a.events.OrderPlaced", "event": event.model_dump(mode="json")}
    decoded = decode_event(old)  # written by a version whose default was the module path
    assert type(decoded) is OrderPlaced and decoded == event


def test_namesakes_in_one_process_decode_by_name_into_the_one_that_validates() -> None:
    class Shipped(BaseEvent):
        topic: str = "identity.shipped"
        parcel: str

    # Another module's class of the same topic and name, with other fields.
    other = create_model(
        "Shipped",
        __base__=BaseEvent,
        __module__="tests.elsewhere",
        topic=(str, "identity.shipped"),
        order_id=(int, ...),
    )
    assert Shipped.__event_type__ == other.__event_type__ == "identity.shipped:Shipped"
    # By name, the newest class first; the other when the newest does not validate.
    assert type(decode_event(encode_event(other(order_id=2)))) is other
    assert type(decode_event(encode_event(Shipped(parcel="p-1")))) is Shipped
