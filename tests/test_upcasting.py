"""Event versions and upcasters (issue 20, item 4): an old payload reaches a handler
whose class is newer through the registered steps, applied before validation in the
handler's process; a missing step or an upcaster that fails dead-letters the event
at once with a reason naming the step.  The issue's path runs on Redis with real
worker processes: a version 1 event fails in the old handler, the worker is
redeployed with version 2 and its upcaster, and ``eventbus dlq replay`` of the old
dead letter reaches the new handler as version 2."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from eventbus import BaseEvent, ConfigurationError, EventBus, EventDecodeError, RetryPolicy
from eventbus.events import decode_event, encode_envelope
from eventbus.upcasting import chain_gaps, missing_steps, upcaster, upcasters

pytest.register_assert_rewrite("tests.redis_support")
from tests.redis_support import Workers, wait_settled, wait_until  # noqa: E402

pytest_plugins = ["tests.redis_support"]
pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
MakeBus = Callable[..., EventBus]
#: Retries any other failure would get: an upcasting failure gets none.
RETRIES = RetryPolicy(max_retries=3, delay=0.01)


class ParcelV1(BaseEvent):
    __event_type__ = "upcast.parcels:Parcel"
    topic: str = "upcast.parcels"
    weight: float  # kilograms
    to: str


class Parcel(BaseEvent):
    """Version 3: grams (v2), and the address split (v3)."""

    __event_type__ = "upcast.parcels:Parcel"
    __event_version__ = 3
    topic: str = "upcast.parcels"
    grams: int
    city: str
    street: str


@upcaster(Parcel, from_version=1)
def kilograms_to_grams(fields: dict[str, Any]) -> dict[str, Any]:
    fields["grams"] = round(fields.pop("weight") * 1000)
    return fields


@upcaster(Parcel, from_version=2)
def split_address(fields: dict[str, Any]) -> dict[str, Any]:
    street, city = fields.pop("to").split(", ")
    return {**fields, "street": street, "city": city}


def v1_envelope(weight: Any = 1.25, to: str = "1 Quay St, Lyon") -> dict[str, Any]:
    return ParcelV1(weight=weight, to=to).to_dict()


def test_the_chain_runs_from_the_payloads_version_to_the_class_and_leaves_the_payload_alone() -> (
    None
):
    envelope = v1_envelope()
    assert "version" not in envelope  # version 1: envelopes as they always were
    before = json.loads(json.dumps(envelope))

    event = decode_event(envelope, Parcel)

    assert isinstance(event, Parcel)
    assert (event.grams, event.street, event.city) == (1250, "1 Quay St", "Lyon")
    assert event.event_id == envelope["event"]["event_id"]
    assert envelope == before  # the stored payload (a dead letter's) is unchanged
    # a version 2 payload takes only the second step
    v2 = {"type": Parcel.__event_type__, "version": 2, "event": {"grams": 5, "to": "2 Rue, Nantes"}}
    assert decode_event(v2, Parcel).model_dump(include={"grams", "city"}) == {
        "grams": 5,
        "city": "Nantes",
    }
    assert list(upcasters(Parcel)) == [1, 2] and missing_steps(Parcel) == []


def test_the_version_travels_in_the_envelope_and_decodes_back() -> None:
    parcel = Parcel(grams=1, city="Lyon", street="Quay")
    assert parcel.to_dict()["version"] == 3
    wire = encode_envelope(parcel)
    assert json.loads(wire)["version"] == 3
    assert decode_event(wire, Parcel) == parcel
    # by name, with no class asked for: the newest class of that name, upcast
    assert isinstance(decode_event(v1_envelope()), Parcel)
    # a type this process does not know keeps its version for a re-publish
    unknown = decode_event({"type": "nobody:Knows", "version": 4, "event": {"a": 1}})
    assert unknown.to_dict()["version"] == 4


def test_bad_versions_and_registrations_are_refused_with_the_reason() -> None:
    with pytest.raises(ConfigurationError, match="from_version must be an integer from 1 to 2"):
        upcaster(Parcel, from_version=3)
    with pytest.raises(ConfigurationError, match="already has an upcaster from version 1"):
        upcaster(Parcel, from_version=1)(lambda fields: fields)
    with pytest.raises(ConfigurationError, match="__event_version__ must be an integer >= 1"):

        class Broken(BaseEvent):
            __event_version__ = 0
            topic: str = "upcast.broken"

    for version in ("2", 0, True):
        bad = {**v1_envelope(), "version": version}
        with pytest.raises(EventDecodeError, match="'version' must be an integer >= 1"):
            decode_event(bad, Parcel)


def test_a_missing_step_or_a_failing_upcaster_is_a_decode_error_naming_the_step() -> None:
    class Gap(BaseEvent):
        topic: str = "upcast.gap"
        __event_version__ = 3
        b: int

    @upcaster(Gap, from_version=2)
    def two_to_three(fields: dict[str, Any]) -> dict[str, Any]:
        return {**fields, "b": fields["a"]}

    assert missing_steps(Gap) == [1]
    with pytest.raises(EventDecodeError, match=r"no upcaster takes it from version 1 to 2"):
        decode_event({"type": "upcast.gap:Gap", "event": {"a": 1}}, Gap)
    with pytest.raises(
        EventDecodeError, match=r"upcaster .*split_address .*version 2 to 3\) raised ValueError"
    ):
        decode_event(v1_envelope(to="nowhere"), Parcel)


def test_a_payload_newer_than_the_class_is_validated_as_it_is() -> None:
    newer = {
        "type": ParcelV1.__event_type__,
        "version": 3,
        "event": {"weight": 2, "to": "x", "grams": 2000},
    }
    old = decode_event(newer, ParcelV1)
    assert isinstance(old, ParcelV1) and old.weight == 2  # extra fields ignored
    with pytest.raises(
        EventDecodeError, match="the payload is version 3, newer than ParcelV1, version 1"
    ):
        decode_event({**newer, "event": {"grams": 2000}}, ParcelV1)


async def test_embedded_handler_gets_old_payloads_upcast_and_a_failing_step_dead_letters_once(
    make_bus: MakeBus,
) -> None:
    got: list[Parcel] = []

    async def ship(event: Parcel) -> None:
        got.append(event)

    bus = make_bus(retry_policy=RETRIES)
    await bus.registry.register(Parcel, ship, name="upcast.parcels:ship")
    await bus.start()
    await bus.publish(ParcelV1(weight=0.5, to="3 Main St, Paris"))
    await bus.publish(ParcelV1(weight=1, to="no comma here"))
    await bus.drain(timeout=10)

    assert [(p.grams, p.city, p.event_version) for p in got] == [(500, "Paris", 3)]
    [record] = bus.dlq.peek()
    assert record.error_type == "EventDecodeError" and record.attempts == 1
    assert "split_address" in record.error and "version 2 to 3" in record.error
    assert record.envelope["event"]["to"] == "no comma here"  # the payload as sent


async def test_a_hole_in_a_chain_of_upcasters_is_one_warning_at_start_naming_the_step(
    make_bus: MakeBus, caplog: pytest.LogCaptureFixture
) -> None:
    class Holed(BaseEvent):
        """Version 4 with steps from 1 and 3: a version 1 payload stops at 2."""

        __event_version__ = 4
        topic: str = "upcast.holed"
        d: int

    @upcaster(Holed, from_version=1)
    def one_to_two(fields: dict[str, Any]) -> dict[str, Any]:
        return {**fields, "b": fields.pop("a")}

    @upcaster(Holed, from_version=3)
    def three_to_four(fields: dict[str, Any]) -> dict[str, Any]:
        return {**fields, "d": fields.pop("c")}

    async def ship(event: Holed | Parcel) -> None:
        pass

    bus = make_bus()
    await bus.registry.register(Holed, ship, name="upcast.holed:ship")
    await bus.registry.register(Parcel, ship, name="upcast.parcels:ship")  # 1 -> 2 -> 3
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        await bus.start()

    warnings = [  # (the bus's own start-up warnings depend on the test modules loaded)
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "eventbus.upcasting"
    ]
    assert warnings == [
        f"{Holed.__module__}.{Holed.__qualname__} is version 4 and has upcasters from "
        "version(s) 1, 3, but none from version 2 to 3: payloads older than version 3 "
        "will be dead-lettered instead of upcast; register @upcaster(Holed, from_version=2)"
    ]
    # a chain that starts above 1 is not a hole: that team never shipped version 1
    assert chain_gaps(Holed) == [2] and chain_gaps(Parcel) == []


# -- the path on Redis, with real worker processes -----------------------------

UPCAST_TOPIC = "upcast.orders"  # tests/upcasting_handlers.py (not imported here)


class OrderPlacedV1(BaseEvent):
    """The publisher's copy of version 1 (amount in euros)."""

    __event_type__ = f"{UPCAST_TOPIC}:OrderPlaced"
    topic: str = UPCAST_TOPIC
    order_id: int
    amount: float


async def test_redis_replay_of_an_old_dead_letter_reaches_the_redeployed_handler_upcast(
    workers: Workers, redis_url: str, namespace: str, make_redis_bus: MakeBus
) -> None:
    r = redis.Redis.from_url(redis_url)
    modules = ("tests.upcasting_handlers",)
    old = workers.start(modules, env={"UPCAST_ORDER_VERSION": "1", "EVENTBUS_MAX_RETRIES": "0"})
    web = make_redis_bus()
    await web.start()
    sent = OrderPlacedV1(order_id=7, amount=12.5)
    await web.publish(sent)
    await asyncio.to_thread(
        wait_until, lambda: web.dlq.size() == 1, 60, "the old handler's dead letter"
    )
    [record] = web.dlq.peek()
    assert record.error_type == "LookupError" and "version" not in record.envelope
    old.stop()

    workers.start(modules, env={"UPCAST_ORDER_VERSION": "2"})
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "EVENTBUS_BACKEND": "redis",
        "EVENTBUS_REDIS_URL": redis_url,
        "EVENTBUS_REDIS_NAMESPACE": namespace,
    }
    cli = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "eventbus.cli", "dlq", "replay", record.id],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0 and cli.stdout.strip() == "replayed 1", cli.stdout + cli.stderr

    booked_key = f"{namespace}:test:booked"
    await asyncio.to_thread(wait_until, lambda: r.llen(booked_key) == 1, 60, "the upcast event")
    await asyncio.to_thread(wait_settled, redis_url, namespace)
    booked = json.loads(r.lindex(booked_key, 0))  # type: ignore[arg-type]
    assert booked == {"event_id": sent.event_id, "order_id": 7, "amount_cents": 1250, "version": 2}
    assert web.dlq.size() == 0
    r.close()


def test_console_edit_of_an_old_payload_is_upcast_to_validate_and_keeps_its_version() -> None:
    from functools import partial
    from html import unescape

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from eventbus import create_lifespan
    from eventbus.console.routes import dlq_console

    prefix = "/eventbus/console"
    got: list[Parcel] = []

    async def ship(event: Parcel) -> None:
        if event.grams == 0:
            raise ValueError("an empty parcel")
        got.append(event)

    bus = EventBus(retry_policy=RetryPolicy(max_retries=0))
    app = FastAPI(lifespan=create_lifespan(bus))
    app.include_router(dlq_console(bus, allow_unauthenticated=True))
    with TestClient(app) as client:
        call = client.portal.call  # type: ignore[union-attr]
        call(partial(bus.registry.register, Parcel, ship, name="upcast.parcels:console"))
        call(bus.subscribe, "upcast.parcels")
        old = ParcelV1(weight=2, to="no comma here")  # its upcaster fails
        new = Parcel(grams=0, city="Lyon", street="1 Quay St")  # its handler fails
        call(bus.publish_many, [old, new])
        call(bus.drain, 10)
        records = {r.envelope["event"]["event_id"]: r for r in bus.dlq.peek()}
        assert len(records) == 2 and got == []
        client.get(prefix + "/")
        csrf = client.cookies.get("eventbus_console_csrf")

        def edit(record_id: str, fields: dict[str, Any]) -> tuple[int, str]:
            answer = client.post(
                prefix + "/record/edit",
                data={
                    "id": record_id,
                    "event": json.dumps(fields),
                    "action": "replay",
                    "csrf_token": csrf,
                },
            )
            return answer.status_code, unescape(answer.text)

        # version 1 fields, fixed: checked as the handler will see them (upcast)
        v1 = records[old.event_id]
        status, html = edit(v1.id, {**v1.envelope["event"], "to": "4 Dock Rd, Brest"})
        assert status == 200 and "Queued 1 event again" in html, html[:3000]
        # version 3 fields stay version 3 (no upcast from version 1 on delivery)
        v3 = records[new.event_id]
        status, html = edit(v3.id, {**v3.envelope["event"], "grams": 40})
        assert status == 200 and "Queued 1 event again" in html, html[:3000]
        call(bus.drain, 10)
        assert sorted((p.grams, p.city) for p in got) == [(40, "Lyon"), (2000, "Brest")]
        assert bus.dlq.size() == 0
