"""A payload that does not validate into its handler's class goes to the dead letters
at once (one attempt, whatever the retry policy) with each failing field recorded
(path, expected, got), on the embedded backend, on Redis with a real worker process
and on Kafka (Tansu); the console's record page and ``eventbus dlq show`` list them
next to the payload (issue 20, item 5)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from html import unescape
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from eventbus import BaseEvent, EventBus, FailedEvent, RetryPolicy, create_lifespan
from eventbus.cli import run as cli_run
from eventbus.console.routes import dlq_console

pytest.register_assert_rewrite("tests.redis_support")
from tests.kafka_helpers import create_topic  # noqa: E402
from tests.redis_support import Workers, wait_settled, wait_until  # noqa: E402

pytest_plugins = ["tests.redis_support", "tests.kafka_support"]
pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
MakeBus = Callable[..., EventBus]
#: The topic and handler of tests/validation_handlers.py (not imported here: its
#: handler would join every bus of this process).
VH_TOPIC = "validation.orders"
VH_HANDLER = f"{VH_TOPIC}:ship"
#: Retries the handlers would get for any other failure: a validation error gets none.
RETRIES = RetryPolicy(max_retries=3, delay=0.01)
INT_EXPECTED = "Input should be a valid integer, unable to parse string as an integer"


class Line(BaseModel):
    sku: str
    qty: int


def classes(name: str) -> tuple[type[BaseEvent], type[BaseEvent]]:
    """The subscriber's class of topic ``name`` and a publisher's copy that disagrees
    (``order_id`` and ``qty`` became text, ``api_token`` too)."""

    class ShipOrder(BaseEvent):
        topic: str = name
        order_id: int
        lines: list[Line]
        api_token: int = 0

    class ShipOrderSent(BaseEvent):
        __event_type__ = f"{name}:ShipOrder"
        topic: str = name
        order_id: str
        lines: list[dict[str, Any]]
        api_token: str = ""

    return ShipOrder, ShipOrderSent


def bad(sent: type[BaseEvent], topic: str) -> BaseEvent:
    return sent(
        topic=topic,
        order_id="A-17",
        lines=[{"sku": "tea", "qty": 1}, {"sku": "cup", "qty": "two"}],
        api_token="s3cret-t0ken",
    )


#: A publisher's copy of tests.validation_handlers.ShipOrder that disagrees with it.
_, SENT = classes(VH_TOPIC)


def assert_fields(record: FailedEvent) -> None:
    assert record.error_type == "EventDecodeError"
    assert record.attempts == 1
    assert record.field_errors == [
        {"path": "order_id", "expected": INT_EXPECTED, "got": '"A-17"'},
        {"path": "lines[1].qty", "expected": INT_EXPECTED, "got": '"two"'},
        {"path": "api_token", "expected": INT_EXPECTED, "got": "***"},
    ]
    assert "s3cret" not in str(record.to_dict()["field_errors"])


async def test_embedded_dead_letter_lists_each_failing_field_after_one_attempt(
    make_bus: MakeBus, topic: str
) -> None:
    received: list[BaseEvent] = []
    ship_order, sent = classes(topic)

    async def ship(event: BaseEvent) -> None:
        received.append(event)

    bus = make_bus(retry_policy=RETRIES)
    await bus.registry.register(ship_order, ship, name=f"{topic}:ship")
    await bus.start()
    await bus.publish(bad(sent, topic))
    await bus.drain(timeout=10)

    assert received == []
    [record] = bus.dlq.peek()
    assert_fields(record)
    # the store's JSON form keeps them; a record written before them reads as none
    again = FailedEvent.from_dict(record.to_dict())
    assert again.field_errors == record.field_errors
    old = record.to_dict()
    del old["field_errors"]
    assert FailedEvent.from_dict(old).field_errors == []


def test_console_record_page_and_cli_show_the_failing_fields(topic: str) -> None:
    _, sent = classes(topic)
    bus = EventBus()
    record = FailedEvent(
        id="bad-1",
        event=None,
        envelope=bad(sent, topic).to_dict(),
        topic=topic,
        handler=f"{topic}:ship",
        queue="eventbus",
        attempts=1,
        error="invalid fields",
        error_type="EventDecodeError",
        field_errors=[
            {"path": "order_id", "expected": INT_EXPECTED, "got": '"A-17"'},
            {"path": "lines[1].qty", "expected": INT_EXPECTED, "got": '"<b>two</b>"'},
            {"path": "", "expected": "Input should be an object", "got": "[]"},
        ],
    )
    app = FastAPI(lifespan=create_lifespan(bus))
    app.include_router(dlq_console(bus, allow_unauthenticated=True))
    with TestClient(app) as client:
        bus.dlq.store.add(record)
        answer = client.get("/eventbus/console/record", params={"id": "bad-1"})
    assert answer.status_code == 200
    html = answer.text
    table = re.search(r"<h2>Failing fields</h2>.*?<table[^>]*>(.*?)</table>", html, re.S)
    assert table, html[:3000]
    rows = [
        [
            unescape(re.sub(r"<[^>]+>", "", cell)).strip()
            for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
        ]
        for row in re.findall(r"<tr>(.*?)</tr>", table[1], re.S)
        if "<td" in row
    ]
    assert rows == [
        ["order_id", INT_EXPECTED, '"A-17"'],
        ["lines[1].qty", INT_EXPECTED, '"<b>two</b>"'],
        ["(the event)", "Input should be an object", "[]"],
    ]
    assert "<b>two</b>" not in html  # escaped
    # next to the payload: the envelope section follows the table
    assert html.index("Failing fields") < html.index("<h2>Envelope</h2>")

    out, err = io.StringIO(), io.StringIO()
    assert cli_run(["dlq", "show", "bad-1"], bus, out=out, err=err) == 0, err.getvalue()
    text = out.getvalue()
    assert (
        "failing fields:\n"
        f'  order_id: expected {INT_EXPECTED}; got "A-17"\n'
        f'  lines[1].qty: expected {INT_EXPECTED}; got "<b>two</b>"\n'
        "  (the event): expected Input should be an object; got []\n"
    ) in text
    assert "field_errors:" not in text


async def test_redis_worker_dead_letters_the_payload_with_its_fields_at_once(
    workers: Workers, redis_url: str, namespace: str, make_redis_bus: MakeBus
) -> None:
    r = redis.Redis.from_url(redis_url)
    workers.start(("tests.validation_handlers",), env={"EVENTBUS_MAX_RETRIES": "3"})
    publisher = make_redis_bus()
    await publisher.start()
    await publisher.publish(bad(SENT, VH_TOPIC))
    await asyncio.to_thread(wait_until, lambda: publisher.dlq.size() == 1, 60, "the dead letter")
    await asyncio.to_thread(wait_settled, redis_url, namespace)
    [record] = publisher.dlq.peek()
    assert record.handler == VH_HANDLER
    assert_fields(record)
    assert r.llen(f"{namespace}:test:shipped") == 0

    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "EVENTBUS_BACKEND": "redis",
        "EVENTBUS_REDIS_URL": redis_url,
        "EVENTBUS_REDIS_NAMESPACE": namespace,
    }
    cli = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "eventbus.cli", "dlq", "show", record.id],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    assert f'  lines[1].qty: expected {INT_EXPECTED}; got "two"\n' in cli.stdout
    assert (
        "  api_token: expected" in cli.stdout and "s3cret" not in cli.stdout.split("envelope:")[0]
    )
    r.close()


async def test_kafka_dead_letter_lists_each_failing_field_after_one_attempt(
    make_kafka_bus: MakeBus, kafka_names: tuple[str, str]
) -> None:
    topic, _group = kafka_names
    received: list[BaseEvent] = []
    ship_order, sent = classes(topic)

    async def ship(event: BaseEvent) -> None:
        received.append(event)

    bus = make_kafka_bus()  # one retry for any other failure
    await bus.registry.register(ship_order, ship, name=f"{topic}:ship")
    await bus.start()
    await bus.publish(bad(sent, topic))
    await bus.drain(timeout=30)
    for _ in range(300):
        if await bus.dlq.asize() == 1:
            break
        await asyncio.sleep(0.1)
    assert received == []
    [record] = bus.dlq.peek()
    assert record.id.startswith(f"{topic}:")  # a DLQ topic's record, folded back
    assert_fields(record)


async def test_kafka_topic_handler_sets_aside_a_record_of_a_known_type_with_its_fields(
    make_kafka_bus: MakeBus, kafka_bootstrap: str, kafka_names: tuple[str, str]
) -> None:
    # A handler of the topic (no class of its own): the envelope's type name finds
    # the class; a record whose fields do not validate into it is set aside.
    from aiokafka import AIOKafkaProducer

    name, _group = kafka_names
    topic = name

    class ShipOrder(BaseEvent):  # the only class of that name in this process
        topic: str = name
        order_id: int
        lines: list[Line]
        api_token: int = 0

    received: list[BaseEvent] = []

    async def audit(event: BaseEvent) -> None:
        received.append(event)

    await create_topic(kafka_bootstrap, topic, 1)
    bus = make_kafka_bus()
    await bus.registry.register(topic, audit, name=f"{topic}:audit")
    await bus.start()
    # as another service's copy sends it
    envelope = {
        "type": ShipOrder.__event_type__,
        "event": {
            "topic": topic,
            "order_id": "A-17",
            "lines": [{"sku": "tea", "qty": 1}, {"sku": "cup", "qty": "two"}],
            "api_token": "s3cret-t0ken",
        },
    }
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, json.dumps(envelope).encode())
    finally:
        await producer.stop()
    good = ShipOrder(order_id=1, lines=[])
    await bus.publish(good)  # behind it in the partition: drained, it was settled
    await bus.drain(timeout=30)
    assert [e.event_id for e in received] == [good.event_id]
    [record] = await bus.dlq.apeek(limit=10)
    assert record.error_type == "EventDecodeError"
    assert record.field_errors == [
        {"path": "order_id", "expected": INT_EXPECTED, "got": '"A-17"'},
        {"path": "lines[1].qty", "expected": INT_EXPECTED, "got": '"two"'},
        {"path": "api_token", "expected": INT_EXPECTED, "got": "***"},
    ]
