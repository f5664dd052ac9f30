"""The dead-letter console over the Kafka store (a real Kafka-protocol broker, Tansu):
list, groups and detail from the DLQ topics, edit and replay, a confirmed purge, a
group replay back through Kafka, and the audit trail kept in a Kafka topic."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from html import unescape

import httpx
import pytest
from fastapi import FastAPI

from eventbus import EventBus
from eventbus.console.routes import dlq_console
from eventbus.dlq.audit import audit_log_for
from eventbus.kafka.audit import KafkaAuditLog
from eventbus.kafka.config import KafkaConfig
from tests.kafka_events import Numbered
from tests.kafka_helpers import create_topic, wait_for

pytest_plugins = ["tests.kafka_support"]
pytestmark = pytest.mark.timeout(120)

PREFIX = "/eventbus/console"


async def test_the_console_lists_edits_replays_and_purges_kafka_dead_letters(
    make_kafka_bus: Callable[..., EventBus], kafka_bootstrap: str, kafka_names: tuple[str, str]
) -> None:
    topic, _ = kafka_names
    await create_topic(kafka_bootstrap, topic, 1)
    handled: list[int] = []
    broken = True

    async def ledger(event: Numbered) -> None:
        if broken:
            raise RuntimeError("payment service down")
        handled.append(event.n)

    bus = make_kafka_bus()
    await bus.registry.register(topic, ledger, name=f"{topic}.ledger")
    await bus.start()
    await bus.publish_many([Numbered(topic=topic, n=n, key=f"k{n}") for n in range(3)])
    await bus.drain(timeout=30)
    assert await bus.dlq.asize() == 3

    assert isinstance(audit_log_for(bus.dlq.store), KafkaAuditLog)  # the default on Kafka
    audit = KafkaAuditLog(KafkaConfig(kafka_bootstrap), topic=f"{topic}.audit")
    app = FastAPI()
    app.include_router(dlq_console(bus, allow_unauthenticated=True, audit=audit))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        listing = await http.get(PREFIX + "/")
        assert listing.status_code == 200 and "<strong>3</strong> dead letters" in listing.text
        ids = re.findall(r'name="id" value="([^"]+)"', listing.text)
        by_n = {}
        for record_id in map(unescape, ids):
            record = await bus.dlq.aget(record_id)
            assert record is not None and isinstance(record.event, Numbered)
            by_n[record.event.n] = record_id
        groups = await http.get(PREFIX + "/groups")
        assert f"{topic}.ledger" in groups.text and "RuntimeError" in groups.text
        detail = await http.get(PREFIX + "/record", params={"id": by_n[0]})
        assert "payment service down" in detail.text and '"n": 0' in unescape(detail.text)
        csrf = http.cookies["eventbus_console_csrf"]

        broken = False
        edit = await http.get(PREFIX + "/record/edit", params={"id": by_n[0]})
        fields = json.loads(
            unescape(re.search(r"<textarea[^>]*>(.*?)</textarea>", edit.text, re.S)[1])
        )  # type: ignore[index]
        edited = await http.post(
            PREFIX + "/record/edit",
            data={
                "id": by_n[0],
                "event": json.dumps({**fields, "n": 100}),
                "action": "replay",
                "csrf_token": csrf,
            },
        )
        assert edited.status_code == 200 and "Queued 1 event again" in edited.text
        await wait_for(lambda: handled == [100], 30, "the edited event")

        ask = await http.post(
            PREFIX + "/actions",
            data={"action": "purge:selected", "id": by_n[1], "csrf_token": csrf},
        )
        assert "Purge 1 dead letter?" in ask.text and await bus.dlq.asize() == 2
        purged = await http.post(
            PREFIX + "/actions",
            data={"action": "purge:selected", "id": by_n[1], "confirm": "yes", "csrf_token": csrf},
        )
        assert "Purged 1 dead letter" in purged.text

        group = await http.post(
            PREFIX + "/actions",
            data={
                "action": "replay:group",
                "handler": f"{topic}.ledger",
                "error_type": "RuntimeError",
                "csrf_token": csrf,
            },
        )
        assert "1 of 1 queued" in group.text
        await wait_for(lambda: sorted(handled) == [2, 100], 30, "the replayed group")
        assert await bus.dlq.asize() == 0

        page = await http.get(PREFIX + "/audit")
        rows = page.text.split("<tbody>")[1]
        assert rows.count("anonymous (127.0.0.1)") == 3

    # another process reads the same trail from the topic
    again = KafkaAuditLog(KafkaConfig(kafka_bootstrap), topic=f"{topic}.audit")
    entries = [e for e in await asyncio.to_thread(again.entries, 10) if e.status == "done"]
    assert [e.action for e in entries] == ["replay", "purge", "replay-edited"]
    assert entries[0].ids == (by_n[2],) and entries[1].ids == (by_n[1],)
