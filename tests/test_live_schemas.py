"""Live schemas on Redis (issue 20, item 3).

Services from different code share one Redis: billing (tests/live_billing, a
worker process with a typed handler), audit (an untyped handler, a worker process
of its own) and the shop, which publishes
from its own copies of ``OrderPlaced`` (tests/live_shop: one with a new optional
field, one with ``total_cents`` renamed).  Workers store each typed handler's
event schema with its subscription; the shop's publisher checks each class once
against them (``EVENTBUS_SCHEMA_CHECK``), and ``eventbus schema check --live``
checks a module's classes against them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from eventbus import BaseEvent, EventBus, EventBusSettings
from eventbus.contracts.compat import breaking_changes
from eventbus.contracts.live import (
    SchemaMismatchError,
    SubscriberSchema,
    live_mismatches,
    live_schema,
    schema_versions,
)
from eventbus.contracts.schemas import UPCASTS_KEY, VERSION_KEY, event_schema, schema_hash
from eventbus.exceptions import ConfigurationError
from eventbus.metrics import InMemoryMetricsCollector
from eventbus.redis.backend import RedisBackend
from eventbus.upcasting import upcaster
from tests.kafka_helpers import wait_for
from tests.live_billing import events as live_events
from tests.live_shop import breaking, compatible
from tests.redis_support import (  # noqa: F401
    ROOT,
    TEST_REDELIVERY_TIMEOUT,
    Workers,
    namespace,
    redis_cli,
    redis_url,
    sync_subscriptions,
    workers,
)

TOPIC = compatible.TOPIC
BILL = "live_billing.bill"
AUDIT = "live_billing.audit"
#: Seconds a worker gets to handle what was published (its start included).
HANDLED_WITHIN = 30.0

Publisher = Callable[..., tuple[EventBus, InMemoryMetricsCollector]]


@pytest.fixture
async def shop(redis_url: str, namespace: str) -> AsyncIterator[Publisher]:  # noqa: F811
    """Publisher buses of the shop service (``schema_check`` as given), with metrics."""
    buses: list[EventBus] = []

    def factory(schema_check: str = "warn") -> tuple[EventBus, InMemoryMetricsCollector]:
        metrics = InMemoryMetricsCollector()
        bus = EventBus(
            backend=RedisBackend(
                url=redis_url,
                namespace=namespace,
                redelivery_timeout=TEST_REDELIVERY_TIMEOUT,
                schema_check=schema_check,  # type: ignore[arg-type]
            ),
            settings=EventBusSettings(service="shop"),
            metrics=metrics,
        )
        buses.append(bus)
        return bus, metrics

    yield factory
    for bus in buses:
        await bus.stop()


def start_billing(workers: Workers, out: Path) -> None:  # noqa: F811
    """Billing's worker (typed handler) and the audit service's (untyped handler)."""
    for service, module in (("billing", "handlers"), ("audit", "audit")):
        workers.start(
            (f"tests.live_billing.{module}",),
            threads=1,
            env={"EVENTBUS_SERVICE": service, "LIVE_OUT": str(out)},
        )


def handled(out: Path) -> list[str]:
    return out.read_text().splitlines() if out.exists() else []


def test_worker_stores_the_schema_of_its_typed_handler_and_list_shows_it(
    redis_url: str,  # noqa: F811
    namespace: str,  # noqa: F811
    workers: Workers,  # noqa: F811
    tmp_path: Path,
) -> None:
    start_billing(workers, tmp_path / "handled")
    client = redis.Redis.from_url(redis_url)
    records = {k.decode(): json.loads(v) for k, v in client.hgetall(f"{namespace}:subs").items()}
    bill = records[f"billing|{TOPIC}|{BILL}"]
    assert "schema" not in records[f"audit|{TOPIC}|{AUDIT}"]  # untyped: accepts anything
    text = client.hget(f"{namespace}:schemas", bill["schema"])
    assert text is not None
    assert hashlib.sha256(text).hexdigest()[:16] == bill["schema"]  # content-addressed
    schema = json.loads(text)
    assert set(schema["properties"]) == {"order_id", "total_cents"}  # billing's own class
    assert sorted(schema["required"]) == ["order_id", "total_cents"]

    listed = redis_cli(redis_url, namespace, "subscriptions", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    by_handler = {row["handler"]: row for row in json.loads(listed.stdout)}
    assert by_handler[BILL]["schema"] == bill["schema"]
    assert by_handler[AUDIT]["schema"] is None
    table = redis_cli(redis_url, namespace, "subscriptions", "list")
    header, *rows = table.stdout.splitlines()
    assert "SCHEMA" in header.split()
    [bill_row] = [r for r in rows if BILL in r]
    [audit_row] = [r for r in rows if AUDIT in r]
    assert bill["schema"][:8] in bill_row.split()
    assert "-" in audit_row.split()


async def test_breaking_class_warns_once_per_subscriber_and_counts_each_event(
    shop: Publisher,
    workers: Workers,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    out = tmp_path / "handled"
    start_billing(workers, out)
    # A second subscriber service from other code (codebase B's copy of the class).
    workers.start(
        ("tests.codebase_b.handlers",),
        threads=1,
        env={"EVENTBUS_SERVICE": "ledger", "CODEBASE_TOPIC": TOPIC},
    )
    bus, metrics = shop("warn")
    await bus.start()
    with caplog.at_level(logging.WARNING, logger="eventbus.redis.schemas"):
        for i in range(3):
            await bus.publish(breaking.OrderPlaced(order_id=i, amount_cents=100))
        await bus.publish_many([breaking.OrderPlaced(order_id=3, amount_cents=1)])
    warnings = [r.getMessage() for r in caplog.records if r.name == "eventbus.redis.schemas"]
    assert len(warnings) == 2, warnings  # once per subscriber, not per event
    assert any("billing" in w and BILL in w and "total_cents" in w for w in warnings)
    assert any("ledger" in w and "codebase_b.bill" in w and "total_cents" in w for w in warnings)
    assert dict(metrics.schema_mismatches) == {
        (TOPIC, f"billing/{BILL}"): 4,
        (TOPIC, "ledger/codebase_b.bill"): 4,
    }
    # warn publishes anyway: the untyped handler gets every event.
    await wait_for(
        lambda: len([h for h in handled(out) if h.startswith("audit")]) >= 4,
        HANDLED_WITHIN,
        "billing's untyped handler",
    )


async def test_error_mode_refuses_a_breaking_class_and_nothing_is_published(
    shop: Publisher,
    workers: Workers,  # noqa: F811
    tmp_path: Path,
) -> None:
    out = tmp_path / "handled"
    start_billing(workers, out)
    bus, metrics = shop("error")
    await bus.start()
    with pytest.raises(SchemaMismatchError) as refused:
        await bus.publish(breaking.OrderPlaced(order_id=1, amount_cents=100))
    message = str(refused.value)
    assert "billing" in message and BILL in message and "total_cents" in message
    assert "nothing was published" in message
    assert [(m.subscriber.handler, m.breaking.path) for m in refused.value.mismatches] == [
        (BILL, "total_cents")
    ]
    # A compatible event published after it is delivered; the refused one never is
    # (the untyped handler would have received it first: one FIFO queue).
    await bus.publish(compatible.OrderPlaced(order_id=2, total_cents=5, note="gift"))
    await wait_for(
        lambda: {"bill 2", "audit 2"} <= set(handled(out)), HANDLED_WITHIN, "billing's handlers"
    )
    assert sorted(handled(out)) == ["audit 2", "bill 2"]
    assert not metrics.schema_mismatches


async def test_compatible_class_passes_silently(
    shop: Publisher,
    workers: Workers,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    out = tmp_path / "handled"
    start_billing(workers, out)
    bus, metrics = shop("error")
    await bus.start()
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        for i in range(3):
            await bus.publish(compatible.OrderPlaced(order_id=i, total_cents=i, note=None))
    assert not [r for r in caplog.records if r.name == "eventbus.redis.schemas"]
    assert not metrics.schema_mismatches
    await wait_for(
        lambda: len([h for h in handled(out) if h.startswith("bill")]) >= 3,
        HANDLED_WITHIN,
        "billing's typed handler",
    )


def test_schema_check_live_reports_a_breaking_class_and_passes_a_compatible_one(
    redis_url: str,  # noqa: F811
    namespace: str,  # noqa: F811
) -> None:
    # The release step of billing writes its subscriptions (and schemas).
    for service, module in (("billing", "handlers"), ("audit", "audit")):
        sync_subscriptions(
            redis_url, namespace, (f"tests.live_billing.{module}",), {"EVENTBUS_SERVICE": service}
        )
    broken = redis_cli(
        redis_url, namespace, "schema", "check", "--live", "tests.live_shop.breaking"
    )
    assert broken.returncode == 1, broken.stdout + broken.stderr
    [line] = [line for line in broken.stdout.splitlines() if "->" in line]
    assert "billing" in line and BILL in line and "total_cents" in line
    assert AUDIT not in broken.stdout  # untyped: nothing to break
    fine = redis_cli(
        redis_url, namespace, "schema", "check", "--live", "tests.live_shop.compatible"
    )
    assert fine.returncode == 0, fine.stdout + fine.stderr
    assert "0 breaking change(s)" in fine.stdout
    assert "1 live subscriber schema(s)" in fine.stdout


async def test_publisher_notices_a_removed_subscriber_schema_when_its_verdict_expires(
    shop: Publisher,
    redis_url: str,  # noqa: F811
    namespace: str,  # noqa: F811
) -> None:
    sync_subscriptions(
        redis_url, namespace, ("tests.live_billing.handlers",), {"EVENTBUS_SERVICE": "billing"}
    )
    bus, _ = shop("error")
    bus.backend.schema_check.ttl = 0.2  # type: ignore[attr-defined]
    await bus.start()
    with pytest.raises(SchemaMismatchError):
        await bus.publish(breaking.OrderPlaced(order_id=1, amount_cents=100))
    removed = redis_cli(
        redis_url, namespace, "subscriptions", "remove", BILL, "--service", "billing", "--yes"
    )
    assert removed.returncode == 0, removed.stderr
    await asyncio.sleep(0.3)  # past the verdict's lifetime (ttl): read again
    await bus.publish(breaking.OrderPlaced(order_id=2, amount_cents=100))  # no subscriber left


def test_schema_check_setting_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTBUS_SCHEMA_CHECK", "strict")
    with pytest.raises(ConfigurationError, match="EVENTBUS_SCHEMA_CHECK"):
        EventBusSettings()
    with pytest.raises(ConfigurationError, match="schema_check"):
        RedisBackend(schema_check="strict")  # type: ignore[arg-type]


def test_schema_check_live_refuses_a_module_without_event_classes(
    redis_url: str,  # noqa: F811
    namespace: str,  # noqa: F811
) -> None:
    done = redis_cli(redis_url, namespace, "schema", "check", "--live", "tests.live_shop")
    assert done.returncode == 2
    assert "no event class with a default topic in tests.live_shop" in done.stderr


def test_prometheus_counts_schema_mismatches_per_topic_and_subscriber() -> None:
    from prometheus_client import CollectorRegistry

    from eventbus.metrics import CountsSchemaMismatches
    from eventbus.prometheus import PrometheusMetricsCollector

    registry = CollectorRegistry()
    collector = PrometheusMetricsCollector(registry=registry)
    assert isinstance(collector, CountsSchemaMismatches)
    collector.inc_schema_mismatch(TOPIC, f"billing/{BILL}")
    collector.inc_schema_mismatch(TOPIC, f"billing/{BILL}")
    labels = {"topic": TOPIC, "subscriber": f"billing/{BILL}"}
    assert registry.get_sample_value("eventbus_schema_mismatch_total", labels) == 2.0


# -- versions and upcasters (issue 20: billing moves to version 2 first) -----------

BILL_V2 = "live_billing_v2.bill"


def test_schema_check_live_trusts_the_subscribers_upcaster_from_the_publishers_version(
    redis_url: str,  # noqa: F811
    namespace: str,  # noqa: F811
) -> None:
    sync_subscriptions(
        redis_url, namespace, ("tests.live_billing_v2.handlers",), {"EVENTBUS_SERVICE": "billing"}
    )
    # The shop still writes version 1 ("total_cents"); billing reads version 2
    # ("amount_cents") and upcasts version 1: the schemas differ, billing reads it.
    done = redis_cli(
        redis_url, namespace, "schema", "check", "--live", "tests.live_shop.compatible"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 breaking change(s)" in done.stdout
    assert "1 live subscriber schema(s)" in done.stdout  # billing's schema was read


def test_schema_check_live_names_the_missing_upcaster_when_the_subscriber_has_none(
    redis_url: str,  # noqa: F811
    namespace: str,  # noqa: F811
) -> None:
    sync_subscriptions(
        redis_url,
        namespace,
        ("tests.live_billing_v2.no_upcaster",),
        {"EVENTBUS_SERVICE": "billing"},
    )
    done = redis_cli(
        redis_url, namespace, "schema", "check", "--live", "tests.live_shop.compatible"
    )
    assert done.returncode == 1, done.stdout + done.stderr
    [line] = [line for line in done.stdout.splitlines() if "->" in line]
    assert line == (
        f"OrderPlaced -> service billing, handler {BILL_V2} (topic {TOPIC}): writes version 1; "
        "the handler reads version 2 and has no upcaster: register "
        "@upcaster(OrderPlaced, from_version=1)"
    )


async def test_publisher_of_an_older_version_passes_when_the_subscriber_upcasts_it(
    shop: Publisher,
    workers: Workers,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    out = tmp_path / "handled"
    workers.start(
        ("tests.live_billing_v2.handlers",),
        threads=1,
        env={"EVENTBUS_SERVICE": "billing", "LIVE_OUT": str(out)},
    )
    bus, metrics = shop("error")
    await bus.start()
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        await bus.publish(compatible.OrderPlaced(order_id=7, total_cents=250, note=None))
    assert not [r for r in caplog.records if r.name == "eventbus.redis.schemas"]
    assert not metrics.schema_mismatches
    # Not a false pass: billing's version 2 handler reads it, upcast.
    await wait_for(lambda: "bill 7 250" in handled(out), HANDLED_WITHIN, "billing's handler")


async def test_publisher_of_an_older_version_is_refused_when_the_subscriber_cannot_upcast_it(
    shop: Publisher,
    redis_url: str,  # noqa: F811
    namespace: str,  # noqa: F811
) -> None:
    sync_subscriptions(
        redis_url,
        namespace,
        ("tests.live_billing_v2.no_upcaster",),
        {"EVENTBUS_SERVICE": "billing"},
    )
    bus, _ = shop("error")
    await bus.start()
    with pytest.raises(SchemaMismatchError) as refused:
        await bus.publish(compatible.OrderPlaced(order_id=1, total_cents=5, note=None))
    [mismatch] = refused.value.mismatches
    assert mismatch.missing_upcasters == (1,)
    assert "@upcaster(OrderPlaced, from_version=1)" in str(refused.value)


def _stored(service: str, handler: str, schema: dict[str, Any]) -> SubscriberSchema:
    """A subscriber schema as a worker stores it (content-addressed)."""
    return SubscriberSchema(service, TOPIC, handler, schema_hash(schema), schema)


class _PlacedV3(BaseEvent):
    """A reader at version 3 (``total_cents`` -> ``amount_cents`` -> ``cents``)."""

    __event_version__ = 3
    topic: str = TOPIC
    order_id: int
    cents: int


@upcaster(_PlacedV3, from_version=2)
def _amount_to_cents(fields: dict[str, Any]) -> dict[str, Any]:
    fields["cents"] = fields.pop("amount_cents")
    return fields


def test_a_publisher_older_than_the_subscribers_upcaster_chain_gets_one_line_naming_the_step() -> (
    None
):
    reader = _stored("billing", "billing.bill", live_schema(_PlacedV3))
    assert schema_versions(reader.schema) == (3, (2,))
    [v1] = live_mismatches("OrderPlaced", live_schema(compatible.OrderPlaced), [reader])
    assert str(v1) == (
        f"OrderPlaced -> service billing, handler billing.bill (topic {TOPIC}): writes "
        "version 1; the handler reads version 3 and upcasts from version 2 only: register "
        "@upcaster(_PlacedV3, from_version=1)"
    )
    assert v1.missing_upcasters == (1,)
    # Version 2 is covered by the chain: nothing, though the schemas differ.
    from tests.live_billing_v2.events import OrderPlaced as PlacedV2

    assert live_mismatches("OrderPlaced", live_schema(PlacedV2), [reader]) == []
    assert breaking_changes(live_schema(PlacedV2), reader.schema)  # (they do differ)


def test_a_gap_in_the_subscribers_chain_is_reported_for_the_versions_below_it() -> None:
    reader = _stored(
        "billing",
        "billing.bill",
        {**event_schema(_PlacedV3), VERSION_KEY: 4, UPCASTS_KEY: [1, 3]},
    )
    writer = live_schema(compatible.OrderPlaced)
    [gap] = live_mismatches("OrderPlaced", writer, [reader])
    assert gap.missing_upcasters == (2,)
    assert "upcasts from versions 1, 3 only: register @upcaster(_PlacedV3, from_version=2)" in (
        str(gap)
    )


def test_a_publisher_newer_than_the_subscriber_is_compared_by_schema() -> None:
    # A newer payload is validated as it is: the schemas decide, as before versions.
    from tests.live_billing_v2.upcasted import OrderPlaced as PlacedV2

    reads_v1 = _stored("billing", "billing.bill", live_schema(live_events.OrderPlaced))
    [renamed] = live_mismatches("OrderPlaced", live_schema(PlacedV2), [reads_v1])
    assert renamed.breaking.path == "total_cents"
    assert not renamed.missing_upcasters


def test_schemas_stored_before_versions_read_as_version_1_without_upcasters() -> None:
    # A version 1 class without upcasters stores what it stored before (same hash):
    # subscribers already deployed are compared as they were.
    assert live_schema(live_events.OrderPlaced) == event_schema(live_events.OrderPlaced)
    old = _stored("billing", "billing.bill", event_schema(live_events.OrderPlaced))
    assert schema_versions(old.schema) == (1, ())
    [line] = live_mismatches("OrderPlaced", live_schema(breaking.OrderPlaced), [old])
    assert line.breaking.path == "total_cents"
    assert live_mismatches("OrderPlaced", live_schema(compatible.OrderPlaced), [old]) == []
