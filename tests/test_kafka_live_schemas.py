"""Live schemas on Kafka (issue 20, item 3), on a real Kafka-protocol broker (Tansu).

Billing (tests/kafka_live: a worker process with a typed handler and an untyped
one) and the shop, which publishes from its own copies of ``OrderPlaced`` (one
with a new optional field, one with ``total_cents`` renamed), share one broker.
Workers store each typed handler's schema in the schema topic
(``eventbus.schemas``, keyed ``<service>|<handler>``); the shop's publisher checks
each class once against them (``EVENTBUS_SCHEMA_CHECK``), and ``eventbus schema
check --live`` checks a module's classes against them.  Each test has its own
event topic and service names, the schema topic is the session's.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from eventbus import EventBus, EventBusSettings
from eventbus.contracts.live import SchemaMismatchError
from eventbus.exceptions import ConfigurationError, PublishError
from eventbus.kafka.backend import KafkaBackend
from eventbus.kafka.schemas import DEFAULT_SCHEMA_TOPIC
from eventbus.metrics import InMemoryMetricsCollector
from tests.kafka_helpers import (
    HEARTBEAT_INTERVAL_MS,
    ROOT,
    SESSION_TIMEOUT_MS,
    read_topic,
    wait_for,
    worker_env,
)
from tests.kafka_live import breaking, compatible

pytest_plugins = ["tests.kafka_support"]

BILL = "kafka_live.bill"
AUDIT = "kafka_live.audit"
#: Seconds a worker gets to start, store its schemas and handle what was published.
WITHIN = 30.0
SCHEMA_LOGGER = "eventbus.kafka.schemas"

_ids = itertools.count()


@dataclass
class Live:
    """One test's names: its event topic, billing's service, where handlers write."""

    bootstrap: str
    topic: str
    billing: str
    out: Path

    def handled(self) -> list[str]:
        return self.out.read_text().splitlines() if self.out.exists() else []


@pytest.fixture
def live(kafka_bootstrap: str, tmp_path: Path) -> Live:
    n = f"{os.getpid()}_{next(_ids)}"
    return Live(kafka_bootstrap, f"kls.{n}", f"billing_{n}", tmp_path / "handled")


@pytest.fixture
def start_worker(live: Live, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """``start_worker(*modules)``: a billing worker process (killed after the test)."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*modules: str) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            **worker_env(live.bootstrap, live.billing),
            "EVENTBUS_SERVICE": live.billing,
            "EVENTBUS_SHUTDOWN_TIMEOUT": "3",
            "KAFKA_LIVE_TOPIC": live.topic,
            "KAFKA_LIVE_OUT": str(live.out),
        }
        with open(tmp_path / f"worker{len(started)}.log", "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "eventbus.kafka", *modules],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


@pytest.fixture
async def shop(
    live: Live,
) -> AsyncIterator[Callable[..., tuple[EventBus, InMemoryMetricsCollector]]]:
    """Publisher buses of the shop service (``schema_check`` as given), with metrics."""
    buses: list[EventBus] = []

    def factory(schema_check: str = "warn") -> tuple[EventBus, InMemoryMetricsCollector]:
        metrics = InMemoryMetricsCollector()
        bus = EventBus(
            backend=KafkaBackend(
                live.bootstrap,
                idempotence=False,  # Tansu has no idempotent producer
                session_timeout_ms=SESSION_TIMEOUT_MS,
                heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS,
                schema_check=schema_check,  # type: ignore[arg-type]
            ),
            settings=EventBusSettings(service="shop", consume=False, shutdown_timeout=3),
            metrics=metrics,
        )
        buses.append(bus)
        return bus, metrics

    yield factory
    for bus in buses:
        await bus.stop()


async def schema_records(bootstrap: str) -> dict[str, bytes | None]:
    """The schema topic's records, the last of each key (a tombstone: None)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        await consumer.topics()
        partitions = consumer.partitions_for_topic(DEFAULT_SCHEMA_TOPIC) or set()
        tps = [TopicPartition(DEFAULT_SCHEMA_TOPIC, p) for p in partitions]
        if not tps:
            return {}
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: dict[str, bytes | None] = {}
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    out[record.key.decode()] = record.value
        return out
    finally:
        await consumer.stop()


async def wait_stored(live: Live, handler: str, present: bool = True) -> dict[str, bytes | None]:
    """Wait until billing's record of ``handler`` is stored (or, not ``present``,
    tombstoned) in the schema topic; returns the topic's records."""
    key = f"{live.billing}|{handler}"
    records: dict[str, bytes | None] = {}

    async def poll() -> bool:
        nonlocal records
        records = await schema_records(live.bootstrap)
        return (
            (records.get(key) is not None) if present else (key in records and records[key] is None)
        )

    deadline = asyncio.get_running_loop().time() + WITHIN
    while not await poll():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"{key} {'not stored' if present else 'not tombstoned'}: {records}")
        await asyncio.sleep(0.1)
    return records


def cli(live: Live, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        **worker_env(live.bootstrap, "cli"),
        "KAFKA_LIVE_TOPIC": live.topic,
    }
    env.pop("EVENTBUS_KAFKA_GROUP_ID")
    return subprocess.run(
        [sys.executable, "-m", "eventbus.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_worker_stores_its_typed_handler_schema_and_check_live_reports_a_rename(
    live: Live, start_worker: Callable[..., subprocess.Popen[bytes]]
) -> None:
    start_worker("tests.kafka_live.handlers", "tests.kafka_live.audit")
    records = await wait_stored(live, BILL)
    stored = json.loads(records[f"{live.billing}|{BILL}"] or b"")
    assert (stored["service"], stored["handler"], stored["topic"]) == (
        live.billing,
        BILL,
        live.topic,
    )
    assert set(stored["schema"]["properties"]) == {"order_id", "total_cents"}  # billing's class
    assert f"{live.billing}|{AUDIT}" not in records  # untyped: accepts anything

    broken = await asyncio.to_thread(
        cli, live, "schema", "check", "--live", "tests.kafka_live.breaking"
    )
    assert broken.returncode == 1, broken.stdout + broken.stderr
    [line] = [line for line in broken.stdout.splitlines() if "->" in line]
    assert f"service {live.billing}" in line and BILL in line and "total_cents" in line
    assert AUDIT not in broken.stdout
    fine = await asyncio.to_thread(
        cli, live, "schema", "check", "--live", "tests.kafka_live.compatible"
    )
    assert fine.returncode == 0, fine.stdout + fine.stderr
    assert "0 breaking change(s)" in fine.stdout
    assert "1 live subscriber schema(s)" in fine.stdout


async def test_breaking_class_warns_once_and_counts_each_event(
    live: Live,
    start_worker: Callable[..., subprocess.Popen[bytes]],
    shop: Callable[..., tuple[EventBus, InMemoryMetricsCollector]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    start_worker("tests.kafka_live.handlers", "tests.kafka_live.audit")
    await wait_stored(live, BILL)
    bus, metrics = shop("warn")
    await bus.start()
    with caplog.at_level(logging.WARNING, logger=SCHEMA_LOGGER):
        for i in range(3):
            await bus.publish(breaking.OrderPlaced(topic=live.topic, order_id=i, amount_cents=1))
        await bus.publish_many([breaking.OrderPlaced(topic=live.topic, order_id=3, amount_cents=1)])
    warnings = [r.getMessage() for r in caplog.records if r.name == SCHEMA_LOGGER]
    assert len(warnings) == 1, warnings  # once per subscriber, not per event
    assert live.billing in warnings[0] and BILL in warnings[0] and "total_cents" in warnings[0]
    assert dict(metrics.schema_mismatches) == {(live.topic, f"{live.billing}/{BILL}"): 4}
    # warn publishes anyway, and billing's worker dead-letters them, as warned.
    assert len(await read_topic(live.bootstrap, live.topic, 4)) == 4
    dead = await read_topic(live.bootstrap, live.topic + ".dlq", 4, timeout=WITHIN)
    assert len(dead) == 4


async def test_error_mode_refuses_a_breaking_class_and_nothing_is_published(
    live: Live,
    start_worker: Callable[..., subprocess.Popen[bytes]],
    shop: Callable[..., tuple[EventBus, InMemoryMetricsCollector]],
) -> None:
    start_worker("tests.kafka_live.handlers", "tests.kafka_live.audit")
    await wait_stored(live, BILL)
    bus, metrics = shop("error")
    await bus.start()
    with pytest.raises(SchemaMismatchError) as refused:
        await bus.publish(breaking.OrderPlaced(topic=live.topic, order_id=1, amount_cents=100))
    message = str(refused.value)
    assert live.billing in message and BILL in message and "total_cents" in message
    assert "nothing was published" in message
    assert [(m.subscriber.handler, m.breaking.path) for m in refused.value.mismatches] == [
        (BILL, "total_cents")
    ]
    await bus.publish(compatible.OrderPlaced(topic=live.topic, order_id=2, total_cents=5))
    await wait_for(
        lambda: {"bill 2", "audit 2"} <= set(live.handled()), WITHIN, "billing's handlers"
    )
    records = await read_topic(live.bootstrap, live.topic, 1)
    assert [json.loads(r.value)["event"]["order_id"] for r in records] == [2]  # type: ignore[attr-defined]
    assert sorted(live.handled()) == ["audit 2", "bill 2"]
    assert not metrics.schema_mismatches


async def test_compatible_class_passes_silently(
    live: Live,
    start_worker: Callable[..., subprocess.Popen[bytes]],
    shop: Callable[..., tuple[EventBus, InMemoryMetricsCollector]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    start_worker("tests.kafka_live.handlers")
    await wait_stored(live, BILL)
    bus, metrics = shop("error")
    await bus.start()
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        for i in range(3):
            await bus.publish(
                compatible.OrderPlaced(topic=live.topic, order_id=i, total_cents=i, note="gift")
            )
    assert not [r for r in caplog.records if r.name == SCHEMA_LOGGER]
    assert not metrics.schema_mismatches
    await wait_for(
        lambda: len([h for h in live.handled() if h.startswith("bill")]) >= 3,
        WITHIN,
        "billing's typed handler",
    )


async def test_older_version_passes_check_and_publish_when_the_subscriber_upcasts_it(
    live: Live,
    start_worker: Callable[..., subprocess.Popen[bytes]],
    shop: Callable[..., tuple[EventBus, InMemoryMetricsCollector]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Billing reads version 2 ("amount_cents") and upcasts version 1, which the
    # shop still writes ("total_cents"): the schemas differ, billing reads it.
    start_worker("tests.kafka_live.upcasted")
    records = await wait_stored(live, BILL)
    stored = json.loads(records[f"{live.billing}|{BILL}"] or b"")
    assert stored["schema"]["x-eventbus-version"] == 2
    assert stored["schema"]["x-eventbus-upcasts-from"] == [1]
    done = await asyncio.to_thread(
        cli, live, "schema", "check", "--live", "tests.kafka_live.compatible"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 breaking change(s)" in done.stdout
    bus, metrics = shop("error")
    await bus.start()
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        await bus.publish(
            compatible.OrderPlaced(topic=live.topic, order_id=9, total_cents=250, note=None)
        )
    assert not [r for r in caplog.records if r.name == SCHEMA_LOGGER]
    assert not metrics.schema_mismatches
    await wait_for(lambda: "bill 9 250" in live.handled(), WITHIN, "billing's handler")


async def test_removed_handler_is_tombstoned_and_no_longer_reported(
    live: Live,
    start_worker: Callable[..., subprocess.Popen[bytes]],
    shop: Callable[..., tuple[EventBus, InMemoryMetricsCollector]],
) -> None:
    first = start_worker("tests.kafka_live.handlers", "tests.kafka_live.audit")
    await wait_stored(live, BILL)
    bus, _ = shop("error")
    bus.backend.schema_check.ttl = 0.2  # type: ignore[attr-defined]
    await bus.start()
    with pytest.raises(SchemaMismatchError):
        await bus.publish(breaking.OrderPlaced(topic=live.topic, order_id=1, amount_cents=1))
    broken = await asyncio.to_thread(
        cli, live, "schema", "check", "--live", "tests.kafka_live.breaking"
    )
    assert broken.returncode == 1, broken.stdout + broken.stderr

    # The next release of billing has no typed handler of the topic any more.
    first.terminate()
    await asyncio.to_thread(first.wait, 15)
    start_worker("tests.kafka_live.audit")
    await wait_stored(live, BILL, present=False)
    fine = await asyncio.to_thread(
        cli, live, "schema", "check", "--live", "tests.kafka_live.breaking"
    )
    assert fine.returncode == 0, fine.stdout + fine.stderr
    assert "0 breaking change(s)" in fine.stdout and "0 live subscriber schema(s)" in fine.stdout
    await asyncio.sleep(0.3)  # past the publisher's verdict (ttl): it reads the topic again
    await bus.publish(breaking.OrderPlaced(topic=live.topic, order_id=2, amount_cents=1))


def test_schema_check_setting_is_validated() -> None:
    with pytest.raises(ConfigurationError, match="schema_check"):
        KafkaBackend(schema_check="strict")  # type: ignore[arg-type]


async def test_error_mode_refuses_when_the_schema_topic_cannot_be_read(live: Live) -> None:
    from tests.kafka_helpers import TansuBroker

    broker = TansuBroker.start()  # a broker of its own, stopped under the publisher
    bus = EventBus(
        backend=KafkaBackend(
            broker.bootstrap, idempotence=False, publish_timeout=1.0, schema_check="error"
        ),
        settings=EventBusSettings(service="shop", consume=False, shutdown_timeout=1),
    )
    try:
        await bus.start()
        broker.stop()
        started = asyncio.get_running_loop().time()
        with pytest.raises(PublishError, match="could not read the subscribers' schemas"):
            await bus.publish(compatible.OrderPlaced(topic=live.topic, order_id=1, total_cents=1))
        assert asyncio.get_running_loop().time() - started < 3.0  # publish_timeout bounds it
    finally:
        broker.stop()
        await bus.stop()


def test_reading_the_schema_topic_needs_no_compaction() -> None:
    from eventbus.contracts.live import SubscriberSchema
    from eventbus.kafka.schemas import fold, record_value

    schema = {"type": "object", "properties": {"order_id": {"type": "integer"}}}
    first = record_value("billing", "bill", "t", {**schema, "title": "v1"})
    second = record_value("billing", "bill", "t", {**schema, "title": "v2"})
    other = record_value("billing", "refund", "t", schema)
    into: dict[str, SubscriberSchema] = {}
    # Uncompacted: every record since the start, older ones first.
    fold(
        [
            (b"billing|bill", first),
            (b"billing|refund", other),
            (b"billing|bill", second),
            (b"billing|refund", None),
        ],
        into,
    )
    assert list(into) == ["billing|bill"]  # the tombstone removed refund
    assert into["billing|bill"].schema["title"] == "v2"  # the last record wins
