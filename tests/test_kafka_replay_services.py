"""Kafka dead letters name their service and handler, and a replay never loses
(issue 23, item 2).

Two services (own consumer groups, the same handler name, as two copies of one
codebase would have) fail on the same record: two dead letters, ids
``<topic>:<partition>:<offset>:<service>:<handler>``; each replay reaches its own
service's handler only; a replay naming a handler its service no longer has is
refused by that service's worker and the dead letter is kept.  Real broker (Tansu).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Awaitable, Callable

import pytest

from eventbus import EventBus
from eventbus.dlq.records import FailedEvent
from eventbus.exceptions import BackendError
from eventbus.kafka.records import POISON_HANDLER, REPLAY_REFUSED_ERROR_TYPE
from tests.kafka_events import Numbered
from tests.kafka_helpers import create_topic, wait_committed, wait_for

pytest_plugins = ["tests.kafka_support"]

#: Seconds a dead letter or a replay gets to arrive.
WITHIN = 20.0

_ids = itertools.count()


def service_name(label: str) -> str:
    """A service name (and consumer group) no other test uses."""
    return f"{label}_{os.getpid()}_{next(_ids)}"


async def start_service(
    make_kafka_bus: Callable[..., EventBus],
    monkeypatch: pytest.MonkeyPatch,
    service: str,
    topic: str,
    handler_name: str,
    handled: list[int],
    failing: dict[str, bool],
) -> EventBus:
    """A worker bus of ``service`` whose one handler fails while ``failing[service]``."""
    monkeypatch.setenv("EVENTBUS_SERVICE", service)
    bus = make_kafka_bus(group_id=service)
    assert bus.service == service

    async def handle(event: Numbered) -> None:
        if failing[service]:
            raise RuntimeError(f"{service} is down")
        handled.append(event.n)

    await bus.registry.register(topic, handle, name=handler_name, max_retries=0)
    await bus.start(consume=True)
    return bus


async def dead_letters(bus: EventBus, topic: str, count: int) -> list[FailedEvent]:
    """Wait until ``count`` dead letters of ``topic`` are visible; return them.

    (The tests create the DLQ topic first: a view that read before it existed did
    not see it appear within 20 s on Tansu.)
    """
    found: list[FailedEvent] = []

    async def enough() -> bool:
        found[:] = await bus.dlq.apeek(limit=100, topic=topic)
        return len(found) >= count

    await wait_for_async(enough, f"{count} dead letter(s) of {topic}")
    return found


async def wait_for_async(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll the async ``check`` every 50 ms until true; fail after :data:`WITHIN` s."""
    deadline = time.monotonic() + WITHIN
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WITHIN:g}s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_two_services_failing_one_record_get_two_dead_letters_each_replayed_to_its_own(
    make_kafka_bus: Callable[..., EventBus],
    kafka_bootstrap: str,
    kafka_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic, _ = kafka_names
    await create_topic(kafka_bootstrap, topic, 1)
    await create_topic(kafka_bootstrap, f"{topic}.dlq", 1)  # see dead_letters()
    billing, mailer = service_name("billing"), service_name("mailer")
    failing = {billing: True, mailer: True}
    handled: dict[str, list[int]] = {billing: [], mailer: []}
    handler = f"{topic}.handle"  # one name in both services: copies of one codebase
    buses = {
        name: await start_service(
            make_kafka_bus, monkeypatch, name, topic, handler, handled[name], failing
        )
        for name in (billing, mailer)
    }

    await buses[billing].publish(Numbered(topic=topic, n=7))
    records = await dead_letters(buses[billing], topic, 2)

    by_service = {r.id: r for r in records}
    assert set(by_service) == {
        f"{topic}:0:0:{billing}:{handler}",
        f"{topic}:0:0:{mailer}:{handler}",
    }
    assert {r.handler for r in records} == {handler}
    failing[billing] = failing[mailer] = False

    result = await buses[mailer].dlq.areplay([f"{topic}:0:0:{billing}:{handler}"])
    assert result.replayed == [f"{topic}:0:0:{billing}:{handler}"]
    await wait_for(lambda: handled[billing] == [7], WITHIN, "billing's replay")
    result = await buses[mailer].dlq.areplay([f"{topic}:0:0:{mailer}:{handler}"])
    assert result.replayed == [f"{topic}:0:0:{mailer}:{handler}"]
    await wait_for(lambda: handled[mailer] == [7], WITHIN, "mailer's replay")

    # Both groups went past the original and the two replayed records: what they
    # handled is final, and each handler got its own service's replay only.
    for name in (billing, mailer):
        await wait_committed(kafka_bootstrap, name, topic, 1, 3)
    assert handled == {billing: [7], mailer: [7]}
    assert await buses[billing].dlq.apeek(limit=100, topic=topic) == []


async def test_replay_to_a_handler_the_service_no_longer_has_is_refused_and_kept(
    make_kafka_bus: Callable[..., EventBus],
    kafka_bootstrap: str,
    kafka_names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic, _ = kafka_names
    await create_topic(kafka_bootstrap, topic, 1)
    await create_topic(kafka_bootstrap, f"{topic}.dlq", 1)  # see dead_letters()
    shop = service_name("shop")
    failing = {shop: True}
    old_handled: list[int] = []
    old = await start_service(
        make_kafka_bus, monkeypatch, shop, topic, f"{topic}.old", old_handled, failing
    )
    await old.publish(Numbered(topic=topic, n=3))
    [record] = await dead_letters(old, topic, 1)
    assert record.id == f"{topic}:0:0:{shop}:{topic}.old"
    await old.stop()

    # The next deploy renamed the handler: its dead letter names one nobody has.
    failing[shop] = False
    new_handled: list[int] = []
    new = await start_service(
        make_kafka_bus, monkeypatch, shop, topic, f"{topic}.new", new_handled, failing
    )
    result = await new.dlq.areplay([record.id])
    assert result.replayed == [record.id]

    async def refused() -> bool:
        kept = await new.dlq.aget(record.id)
        return kept is not None and kept.error_type == REPLAY_REFUSED_ERROR_TYPE

    await wait_for_async(refused, "the refused replay's dead letter")
    kept = await new.dlq.aget(record.id)
    assert kept is not None and kept.handler == f"{topic}.old"
    assert f"no handler '{topic}.old'" in kept.error and shop in kept.error
    assert kept.envelope == record.envelope
    await wait_committed(kafka_bootstrap, shop, topic, 1, 2)
    assert new_handled == [] and old_handled == []


async def test_an_old_poison_dead_letter_without_service_is_refused_and_kept(
    make_kafka_bus: Callable[..., EventBus], kafka_names: tuple[str, str]
) -> None:
    topic, _ = kafka_names
    bus = make_kafka_bus(consume=False)
    await bus.start()
    old = FailedEvent(
        id=f"{topic}:0:5",  # the id poison dead letters had before they named a service
        event=None,
        envelope={"type": "shop.events.OrderPlaced", "event": {"topic": topic}},
        topic=topic,
        handler=POISON_HANDLER,
        queue="",
        attempts=0,
        error="unknown event type",
        error_type="EventDecodeError",
    )
    with pytest.raises(BackendError, match="does not name the service"):
        bus.backend.replay(old)
