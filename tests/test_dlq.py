"""Dead letters on the embedded backend: records, filters, replay, purge, CLI, admin
router; and the rules every store cuts an oversized dead letter by (no broker)."""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Callable
from dataclasses import replace

import httpx
import pytest
from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.testclient import TestClient

from eventbus import (
    BaseEvent,
    ConfigurationError,
    EventBus,
    EventBusSettings,
    FailedEvent,
    RetryPolicy,
    create_lifespan,
    dlq_router,
)
from eventbus.cli import main as cli_main
from eventbus.cli import run as cli_run
from eventbus.dlq.cut import cut_text, fit_record
from eventbus.dlq.queue import DeadLetterQueue
from eventbus.dlq.records import payload_dropped
from eventbus.dlq.store import MemoryDeadLetterStore

MakeBus = Callable[..., EventBus]


class Charge(BaseEvent):
    amount: int = 1


class Switch:
    """A handler that fails until it is fixed, counting its calls."""

    def __init__(self) -> None:
        self.broken = True
        self.calls = 0
        self.seen: list[BaseEvent] = []

    async def __call__(self, event: BaseEvent) -> None:
        self.calls += 1
        if self.broken:
            raise ConnectionError("ledger unavailable")
        self.seen.append(event)


async def dead_letters(make_bus: MakeBus, topic: str, n: int = 1) -> tuple[EventBus, Switch]:
    switch = Switch()
    bus = make_bus(retry_policy=RetryPolicy(max_retries=2, delay=0.001))
    await bus.registry.register(topic, switch, name=f"{topic}:ledger")
    await bus.start()
    await bus.publish_many([Charge(topic=topic, amount=i) for i in range(n)])
    await bus.drain(timeout=10)
    return bus, switch


async def test_poison_event_gets_max_retries_plus_one_attempts(
    make_bus: MakeBus, topic: str
) -> None:
    bus, switch = await dead_letters(make_bus, topic)

    assert switch.calls == 3
    [record] = bus.dlq.peek()
    assert record.attempts == 3
    assert record.handler == f"{topic}:ledger"
    assert record.topic == topic
    assert record.error_type == "ConnectionError"
    assert "ledger unavailable" in record.traceback
    assert record.first_failed_at <= record.last_failed_at
    assert record.correlation_id
    assert bus.dlq.get(record.id) is record


async def test_replay_after_fix_succeeds_and_empties_the_store(
    make_bus: MakeBus, topic: str
) -> None:
    bus, switch = await dead_letters(make_bus, topic)
    [record] = bus.dlq.peek()

    switch.broken = False
    result = bus.dlq.replay([record.id])
    await bus.drain(timeout=5)

    assert result.replayed == [record.id]
    assert bus.dlq.size() == 0
    assert [e.event_id for e in switch.seen] == [record.event.event_id]  # type: ignore[union-attr]
    # the same correlation id travels with the replay
    assert switch.seen[0].metadata["correlation_id"] == record.correlation_id


async def test_replay_goes_to_the_failed_handler_only(make_bus: MakeBus, topic: str) -> None:
    sibling_calls: list[int] = []

    async def sibling(event: BaseEvent) -> None:
        sibling_calls.append(1)

    bus = make_bus(retry_policy=RetryPolicy(max_retries=0))
    switch = Switch()
    await bus.registry.register(topic, switch)
    await bus.registry.register(topic, sibling)
    await bus.start()
    await bus.publish(Charge(topic=topic))
    await bus.drain(timeout=5)
    switch.broken = False
    bus.dlq.replay(all_records=True)
    await bus.drain(timeout=5)

    assert len(sibling_calls) == 1
    assert len(switch.seen) == 1


async def test_replaying_an_id_twice_delivers_once(make_bus: MakeBus, topic: str) -> None:
    bus, switch = await dead_letters(make_bus, topic)
    [record] = bus.dlq.peek()
    switch.broken = False

    first = bus.dlq.replay([record.id, record.id])
    second = bus.dlq.replay([record.id])
    await bus.drain(timeout=5)

    assert first.replayed == [record.id]
    assert second.missing == [record.id]
    assert len(switch.seen) == 1


async def test_replay_gets_a_fresh_retry_budget(make_bus: MakeBus, topic: str) -> None:
    bus, switch = await dead_letters(make_bus, topic)
    [record] = bus.dlq.peek()

    bus.dlq.replay([record.id])  # still broken
    await bus.drain(timeout=5)

    assert switch.calls == 6  # 3 attempts, then 3 more after the replay
    [again] = bus.dlq.peek()
    assert again.attempts == 3
    assert again.id != record.id


async def test_failed_replay_keeps_the_record(make_bus: MakeBus, topic: str) -> None:
    bus, switch = await dead_letters(make_bus, topic)
    [record] = bus.dlq.peek()
    await bus.registry.unregister(topic, switch)

    result = bus.dlq.replay([record.id])

    assert record.id in result.failed
    assert "not registered" in result.failed[record.id]
    assert bus.dlq.get(record.id) is not None


async def test_bulk_replay_of_1000_records_loses_none(make_bus: MakeBus, topic: str) -> None:
    bus, switch = await dead_letters(make_bus, topic, n=1000)
    assert bus.dlq.size() == 1000
    switch.broken = False

    result = await bus.dlq.areplay(topic=topic)
    await bus.drain(timeout=30)

    assert len(result.replayed) == 1000
    assert bus.dlq.size() == 0
    assert sorted(e.amount for e in switch.seen) == list(range(1000))  # type: ignore[attr-defined]


async def test_unknown_event_class_still_lists_and_replays(make_bus: MakeBus, topic: str) -> None:
    import eventbus.keys as keys

    bus, switch = await dead_letters(make_bus, topic, n=0)
    envelope = {"type": "another.service.Refund", "event": {"topic": topic, "refund_id": 9}}
    spec = bus.registry.get_handlers(topic)[0]
    from dramatiq import Message

    bus.broker.enqueue(
        Message(
            queue_name="eventbus",
            actor_name=spec.name,
            args=(envelope,),
            kwargs={},
            options={keys.TOPIC: topic},
        )
    )
    await bus.drain(timeout=5)

    [record] = bus.dlq.peek(topic=topic)
    assert record.event is not None
    assert record.event.event_type == "another.service.Refund"
    switch.broken = False
    assert bus.dlq.replay([record.id]).replayed == [record.id]
    await bus.drain(timeout=5)
    assert switch.seen[0].model_extra == {"refund_id": 9}


async def test_filters_and_purge(make_bus: MakeBus, topic: str) -> None:
    other = topic + ".b"

    async def typeerror(event: BaseEvent) -> None:
        raise TypeError("bad type")

    async def valueerror(event: BaseEvent) -> None:
        raise ValueError("bad value")

    bus = make_bus(retry_policy=RetryPolicy(max_retries=0))
    await bus.registry.register(topic, typeerror)
    await bus.registry.register(other, valueerror)
    await bus.start()
    await bus.publish_many([Charge(topic=topic), Charge(topic=other), Charge(topic=other)])
    await bus.drain(timeout=5)

    assert bus.dlq.size() == 3
    assert bus.dlq.size(topic=other) == 2
    assert [r.error_type for r in bus.dlq.peek(10, error_type="TypeError")] == ["TypeError"]
    assert len(bus.dlq.peek(1)) == 1
    with pytest.raises(ValueError, match="filter"):
        bus.dlq.purge()
    assert bus.dlq.purge(error_type="ValueError") == 2
    assert bus.dlq.purge(all_records=True) == 1
    assert bus.dlq.size() == 0


def test_memory_store_is_bounded_and_counts_evictions() -> None:
    store = MemoryDeadLetterStore(max_size=2)
    for i in range(5):
        store.add(
            FailedEvent(
                id=str(i),
                event=None,
                envelope=None,
                topic="t",
                handler="h",
                queue="q",
                attempts=1,
                error="e",
                error_type="E",
            )
        )
    assert [r.id for r in store.find(None)] == ["3", "4"]
    assert store.evicted == 3
    assert DeadLetterQueue(store).evicted == 3  # what bus.dlq.evicted shows


def test_failed_event_round_trips_through_json() -> None:
    event = Charge(topic="a.b", amount=5)
    record = FailedEvent(
        id="x",
        event=event,
        envelope=event.to_dict(),
        topic="a.b",
        handler="h",
        queue="q",
        attempts=2,
        error="boom",
        error_type="RuntimeError",
        traceback="tb",
        partition=3,
        offset=7,
    )
    again = FailedEvent.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again.to_dict() == record.to_dict()
    assert again.event == event


async def test_non_retryable_exceptions_go_straight_to_the_store(
    make_bus: MakeBus, topic: str
) -> None:
    calls: list[int] = []

    async def strict(event: BaseEvent) -> None:
        calls.append(1)
        raise ValueError("invalid amount")

    bus = make_bus(
        retry_policy=RetryPolicy(max_retries=5, delay=0.001, non_retryable_exceptions=(ValueError,))
    )
    await bus.registry.register(topic, strict)
    await bus.start()
    await bus.publish(Charge(topic=topic))
    await bus.drain(timeout=5)
    assert calls == [1]
    assert bus.dlq.peek()[0].attempts == 1


def test_jitter_spreads_delays_within_bounds() -> None:
    policy = RetryPolicy(delay=10.0, jitter=0.2, max_delay=100)
    delays = {policy.get_delay(0) for _ in range(200)}
    assert min(delays) >= 8.0 and max(delays) <= 12.0
    assert len(delays) > 100
    with pytest.raises(ConfigurationError):
        RetryPolicy(jitter=1.5)


# -- admin router ---------------------------------------------------------------------


def test_admin_router_refuses_to_mount_without_auth() -> None:
    with pytest.raises(ConfigurationError, match="auth dependency"):
        dlq_router()
    assert dlq_router(allow_unauthenticated=True).routes


def test_admin_router_lists_shows_replays_and_purges(topic: str) -> None:
    async def require_admin(x_admin_token: str = Header("")) -> None:
        if x_admin_token != "s3cret":
            raise HTTPException(403, "admins only")

    switch = Switch()
    bus = EventBus(
        settings=EventBusSettings(shutdown_timeout=1), retry_policy=RetryPolicy(max_retries=0)
    )
    app = FastAPI(lifespan=create_lifespan(bus))
    app.include_router(dlq_router(dependencies=[Depends(require_admin)]))

    @app.post("/charge")
    async def charge() -> None:
        await bus.publish_many([Charge(topic=topic), Charge(topic=topic)])
        await bus.drain(timeout=5)

    auth = {"X-Admin-Token": "s3cret"}
    with TestClient(app) as client:
        client.portal.call(bus.registry.register, topic, switch)  # type: ignore[union-attr]
        client.portal.call(bus.subscribe, topic)  # type: ignore[union-attr]
        client.post("/charge")

        assert client.get("/eventbus/dlq").status_code == 403
        listing = client.get("/eventbus/dlq", headers=auth, params={"topic": topic}).json()
        assert listing["size"] == 2
        first, second = (item["id"] for item in listing["items"])
        detail = client.get(f"/eventbus/dlq/{first}", headers=auth).json()
        assert "ledger unavailable" in detail["traceback"]
        assert client.get("/eventbus/dlq/nope", headers=auth).status_code == 404

        switch.broken = False
        script = {**auth, "X-Requested-With": "test"}  # POST and DELETE need it (CSRF)
        replayed = client.post(f"/eventbus/dlq/{first}/replay", headers=script).json()
        assert replayed["replayed"] == [first]
        client.portal.call(bus.drain, 5)  # type: ignore[union-attr]
        assert len(switch.seen) == 1

        assert client.post("/eventbus/dlq/purge", headers=auth, json={}).status_code == 422
        assert client.post("/eventbus/dlq/purge", headers=auth, json={"ids": [second]}).json() == {
            "purged": 1
        }
        assert client.get("/eventbus/dlq", headers=auth).json()["size"] == 0


# -- CLI ------------------------------------------------------------------------------


async def test_cli_lists_shows_replays_and_purges(make_bus: MakeBus, topic: str) -> None:
    bus, switch = await dead_letters(make_bus, topic, n=2)
    first, second = (r.id for r in bus.dlq.peek())

    out = io.StringIO()
    assert cli_run(["dlq", "list"], bus, out) == 0
    table = out.getvalue()
    assert "HANDLER" in table and first in table and "ConnectionError: ledger unavailable" in table

    out = io.StringIO()
    assert cli_run(["dlq", "show", first, "--json"], bus, out) == 0
    assert json.loads(out.getvalue())["id"] == first

    switch.broken = False
    out = io.StringIO()
    assert cli_run(["dlq", "replay", first, "--json"], bus, out) == 0
    assert json.loads(out.getvalue())["replayed"] == [first]
    await bus.drain(timeout=5)
    assert len(switch.seen) == 1

    assert cli_run(["dlq", "purge", "--all"], bus, io.StringIO()) == 2  # needs --yes
    assert cli_run(["dlq", "purge", "--all", "--yes"], bus, io.StringIO()) == 0
    assert bus.dlq.size() == 0
    assert cli_run(["dlq", "show", second], bus, io.StringIO()) == 1


def test_cli_refuses_the_embedded_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTBUS_BACKEND", "sync")
    assert cli_main(["dlq", "list"]) == 2


# -- hostile payloads -------------------------------------------------------------------


def nested(depth: int) -> object:
    """``depth`` nested lists, built without recursion."""
    value: object = 0
    for _ in range(depth):
        value = [value]
    return value


def undecodable(record_id: str, envelope: object, handler: str = "h") -> FailedEvent:
    return FailedEvent(
        id=record_id,
        event=None,
        envelope=envelope,
        topic="t",
        handler=handler,
        queue="eventbus",
        attempts=1,
        error="event envelope is too deeply nested",
        error_type="EventDecodeError",
    )


def test_a_record_of_a_100000_levels_deep_payload_round_trips_through_json() -> None:
    envelope = {"type": "x", "event": {"topic": "t", "p": nested(100_000)}}
    record = undecodable("deep", envelope)

    data = json.loads(json.dumps(record.to_dict()))
    again = FailedEvent.from_dict(data)

    assert isinstance(data["envelope"], str)  # kept whole, as its JSON text
    assert data["envelope"].startswith('{"type":"x","event":{"topic":"t","p":[[[')
    assert data["envelope"].count("[") == 100_000
    assert again.event is None and again.id == "deep"
    assert again.to_dict() == data


async def test_a_deeply_nested_message_is_dead_lettered_with_the_reason_and_listed(
    make_bus: MakeBus, topic: str
) -> None:
    from dramatiq import Message

    import eventbus.keys as keys

    bus, _ = await dead_letters(make_bus, topic, n=0)
    spec = bus.registry.get_handlers(topic)[0]
    deep = {"type": "x.Deep", "event": {"topic": topic, "p": nested(500)}}
    bus.broker.enqueue(
        Message(
            queue_name="eventbus",
            actor_name=spec.name,
            args=(deep,),
            kwargs={},
            options={keys.TOPIC: topic},
        )
    )
    await bus.publish(Charge(topic=topic))  # a good event after it
    await bus.drain(timeout=5)

    records = {r.error_type: r for r in bus.dlq.peek()}
    record = records["EventDecodeError"]
    assert "too deeply nested" in record.error
    assert record.event is None
    out = io.StringIO()
    assert cli_run(["dlq", "list"], bus, out) == 0
    assert record.id in out.getvalue()
    out = io.StringIO()
    assert cli_run(["dlq", "show", record.id, "--json"], bus, out) == 0
    assert json.loads(out.getvalue())["envelope"].count("[") == 500
    app = FastAPI()  # the bus runs on this test's loop already
    app.state.event_bus = bus
    app.include_router(dlq_router(allow_unauthenticated=True))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
        listed = (await client.get("/eventbus/dlq")).json()["items"]
        assert record.id in [item["id"] for item in listed]
        shown = (await client.get(f"/eventbus/dlq/{record.id}")).json()
        assert shown["envelope"].count("[") == 500 and shown["error_type"] == "EventDecodeError"


async def test_replay_of_an_undecodable_record_is_refused_and_keeps_the_record(
    make_bus: MakeBus, topic: str
) -> None:
    from dramatiq import Message

    import eventbus.keys as keys

    bus, switch = await dead_letters(make_bus, topic, n=0)
    spec = bus.registry.get_handlers(topic)[0]
    bus.broker.enqueue(
        Message(
            queue_name="eventbus",
            actor_name=spec.name,
            args=({"not": "an envelope"},),
            kwargs={},
            options={keys.TOPIC: topic},
        )
    )
    await bus.drain(timeout=5)
    [record] = bus.dlq.peek()
    assert record.event is None and record.error_type == "EventDecodeError"
    switch.broken = False

    result = bus.dlq.replay([record.id])
    await bus.drain(timeout=5)

    assert result.replayed == [] and list(result.failed) == [record.id]
    assert "cannot be replayed" in result.failed[record.id]
    assert "not an event envelope" in result.failed[record.id]
    [kept] = bus.dlq.peek()  # the same record, with its original reason; no new one
    assert kept.id == record.id and kept.error_type == "EventDecodeError"
    assert switch.calls == 0


# -- admin actions: ids never mix with filters or all -------------------------------------


async def test_dlq_api_refuses_ids_together_with_filters_or_all(
    make_bus: MakeBus, topic: str
) -> None:
    bus, _ = await dead_letters(make_bus, topic, n=3)
    first = bus.dlq.peek()[0].id

    for kwargs in ({"all_records": True}, {"topic": topic}, {"error_type": "ConnectionError"}):
        with pytest.raises(ValueError, match="either record ids or"):
            bus.dlq.purge([first], **kwargs)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="either record ids or"):
            bus.dlq.replay([first], **kwargs)  # type: ignore[arg-type]
    assert bus.dlq.size() == 3


@pytest.mark.parametrize(
    "argv",
    [
        ["dlq", "purge", "ID", "--all"],
        ["dlq", "purge", "ID", "--all", "--yes"],
        ["dlq", "purge", "ID", "--topic", "TOPIC", "--yes"],
        ["dlq", "replay", "ID", "--all"],
        ["dlq", "replay", "ID", "--error-type", "ConnectionError"],
    ],
)
async def test_cli_refuses_ids_together_with_all_or_filters(
    make_bus: MakeBus, topic: str, argv: list[str]
) -> None:
    bus, _ = await dead_letters(make_bus, topic, n=12)
    first = bus.dlq.peek()[0].id
    argv = [first if a == "ID" else topic if a == "TOPIC" else a for a in argv]
    out, err = io.StringIO(), io.StringIO()

    assert cli_run(argv, bus, out, err) == 2

    assert bus.dlq.size() == 12
    assert out.getvalue() == ""
    assert err.getvalue().startswith("eventbus: ") and "either record ids or" in err.getvalue()


def admin_app(bus: EventBus) -> FastAPI:
    app = FastAPI(lifespan=create_lifespan(bus))
    app.include_router(dlq_router(allow_unauthenticated=True))
    return app


@pytest.mark.parametrize(
    "body",
    [
        {"ids": ["nope"], "all": True},
        {"ids": ["nope"], "topic": "TOPIC"},
        {"ids": ["nope"], "handler": "h", "error_type": "ConnectionError"},
    ],
)
@pytest.mark.parametrize("action", ["purge", "replay"])
def test_admin_router_refuses_ids_together_with_all_or_filters(
    topic: str, action: str, body: dict[str, object]
) -> None:
    bus = EventBus(
        settings=EventBusSettings(shutdown_timeout=1), retry_policy=RetryPolicy(max_retries=0)
    )
    body = {k: topic if v == "TOPIC" else v for k, v in body.items()}
    with TestClient(admin_app(bus)) as client:
        for i in range(15):
            bus.dlq.store.add(
                FailedEvent(
                    id=str(i),
                    event=None,
                    envelope=None,
                    topic=topic,
                    handler="h",
                    queue="eventbus",
                    attempts=1,
                    error="e",
                    error_type="ConnectionError",
                )
            )
        response = client.post(f"/eventbus/dlq/{action}", json=body)

        assert response.status_code == 422
        assert "either ids or" in response.json()["detail"]
        assert client.get("/eventbus/dlq").json()["size"] == 15


def test_admin_router_reaches_record_ids_containing_slashes(topic: str) -> None:
    switch = Switch()
    switch.broken = False
    bus = EventBus(settings=EventBusSettings(shutdown_timeout=1))
    with TestClient(admin_app(bus)) as client:
        spec = client.portal.call(bus.registry.register, topic, switch)  # type: ignore[union-attr]
        client.portal.call(bus.subscribe, topic)  # type: ignore[union-attr]
        ids = [f"orders/eu/{topic}:0:17", f"orders/eu/{topic}:0:18", "a/replay", "x/ /y"]
        for record_id in ids:
            event = Charge(topic=topic)
            bus.dlq.store.add(
                FailedEvent(
                    id=record_id,
                    event=event,
                    envelope=event.to_dict(),
                    topic=topic,
                    handler=spec.name,
                    queue=spec.queue or "eventbus",
                    attempts=1,
                    error="e",
                    error_type="ConnectionError",
                )
            )
        first, second, third, fourth = ids

        assert client.get(f"/eventbus/dlq/{first}").json()["id"] == first
        assert client.get(f"/eventbus/dlq/{third}").json()["id"] == third
        assert client.get("/eventbus/dlq/x/%20/y").json()["id"] == fourth
        assert client.get("/eventbus/dlq/orders%2Feu%2Fnope").status_code == 404
        client.headers["X-Requested-With"] = "test"  # POST and DELETE need it (CSRF)
        replayed = client.post(f"/eventbus/dlq/{first}/replay")
        assert replayed.status_code == 200 and replayed.json()["replayed"] == [first]
        assert client.post(f"/eventbus/dlq/{third}/replay").json()["replayed"] == [third]
        assert client.delete(f"/eventbus/dlq/{second}").status_code == 204
        assert client.delete(f"/eventbus/dlq/{second}").status_code == 404
        client.portal.call(bus.drain, 5)  # type: ignore[union-attr]

        assert len(switch.seen) == 2
        assert [item["id"] for item in client.get("/eventbus/dlq").json()["items"]] == [fourth]


def test_admin_router_refuses_to_replay_an_undecodable_record() -> None:
    bus = EventBus(settings=EventBusSettings(shutdown_timeout=1))
    with TestClient(admin_app(bus)) as client:
        bus.dlq.store.add(
            FailedEvent(
                id="raw",
                event=None,
                envelope="not json",
                topic="t",
                handler="h",
                queue="eventbus",
                attempts=1,
                error="event envelope is not valid JSON",
                error_type="EventDecodeError",
            )
        )
        response = client.post("/eventbus/dlq/raw/replay", headers={"X-Requested-With": "t"})

        assert response.status_code == 409
        assert "not an event envelope" in response.json()["detail"]
        assert client.get("/eventbus/dlq/raw").status_code == 200


async def test_a_dead_letter_keeps_each_attempts_outcome(make_bus: MakeBus, topic: str) -> None:
    errors = iter(["timeout talking to smtp", "connection refused", "mailbox full"])

    async def flaky(event: BaseEvent) -> None:
        message = next(errors)
        if message.startswith("timeout"):
            raise TimeoutError(message)
        raise ConnectionError(message)

    bus = make_bus(retry_policy=RetryPolicy(max_retries=2, delay=0.01))
    await bus.registry.register(topic, flaky)
    await bus.start()
    await bus.publish(BaseEvent(topic=topic))
    await bus.drain(timeout=5)
    [record] = bus.dlq.peek(10)
    log = record.attempt_log
    assert [(e["error_type"], e["error"]) for e in log] == [
        ("TimeoutError", "timeout talking to smtp"),
        ("ConnectionError", "connection refused"),
        ("ConnectionError", "mailbox full"),
    ]
    assert [e["at"] for e in log] == sorted(e["at"] for e in log)
    assert FailedEvent.from_dict(record.to_dict()).attempt_log == log
    from eventbus.console.pages import attempt_rows  # the console's record page shows them

    rows = attempt_rows(record)
    assert [r["error"] for r in rows] == [
        "TimeoutError: timeout talking to smtp",
        "ConnectionError: connection refused",
        "ConnectionError: mailbox full",
    ]
    assert [r["outcome"] for r in rows][-1] == "failed, gave up: dead-lettered"


# -- cutting a dead letter to fit its store: the rules the Redis and Kafka stores share --


class Parcel(BaseEvent):
    blob: str = ""


def parcel_record(payload: int, *, error: str = "boom", traceback: str = "") -> FailedEvent:
    event = Parcel(topic="orders", blob="p" * payload)
    return FailedEvent(
        id="dl-1",
        event=event,
        envelope=event.to_dict(),
        topic="orders",
        handler="orders:h",
        queue="q",
        attempts=3,
        error=error,
        error_type="RuntimeError",
        traceback=traceback,
    )


def framed_size(record: FailedEvent, cut: tuple[str, ...]) -> int:
    """A store's size function: the record's JSON plus framing that names what was
    cut (as the Kafka store's ``eventbus-cut`` header does)."""
    return len(json.dumps(record.to_dict()).encode()) + 100 + 1_000 * len(cut)


def test_cut_text_keeps_head_and_tail_around_a_mark() -> None:
    text = "HEAD" + "x" * 10_000 + "TAIL"
    cut = cut_text(text, 100)
    assert cut.startswith("HEAD" + "x" * 46) and cut.endswith("x" * 46 + "TAIL")
    assert "[9908 characters cut]" in cut and len(cut) < 150
    assert cut_text("short", 100) == "short"


def test_a_dead_letter_that_fits_its_store_is_kept_unchanged() -> None:
    record = parcel_record(1_000, traceback="Traceback ...\n")
    assert fit_record(record, 100_000, framed_size) == (record, ())


def test_long_texts_are_cut_first_and_the_event_kept() -> None:
    record = parcel_record(
        20_000,
        error="E-HEAD " + "e" * 200_000 + " E-TAIL",
        traceback="Traceback (most recent call last):\n" + "t" * 300_000 + "\nT-TAIL",
    )
    fitted, cut = fit_record(record, 100_000, framed_size, "raise the bound")

    assert cut == ("traceback", "error")
    assert framed_size(fitted, cut) <= 100_000
    assert fitted.event == record.event and fitted.envelope == record.envelope  # replayable
    assert fitted.error.startswith("E-HEAD") and fitted.error.endswith("E-TAIL")
    assert fitted.traceback.startswith("Traceback") and fitted.traceback.endswith("T-TAIL")
    assert "characters cut] …" in fitted.error and "characters cut] …" in fitted.traceback
    assert payload_dropped(fitted) is None


@pytest.mark.parametrize(
    ("hint", "suffix"), [("", ""), ("a tenth of EVENTBUS_DLQ_MAX_BYTES", r" \(a tenth of .+\)")]
)
def test_a_payload_too_large_is_dropped_with_its_size_hash_and_reason(
    hint: str, suffix: str
) -> None:
    record = parcel_record(300_000, traceback="Traceback ...\nRuntimeError: boom")
    payload = json.dumps(record.envelope, separators=(",", ":"), ensure_ascii=False).encode()
    fitted, cut = fit_record(record, 100_000, framed_size, hint)

    assert cut == ("payload",)  # the texts were short: nothing else to cut
    assert framed_size(fitted, cut) <= 100_000
    kept = payload_dropped(fitted)
    assert kept is not None and fitted.envelope == {"payload_dropped": kept}
    match = re.fullmatch(
        rf"payload dropped: (\d+) bytes over the limit of 100000{suffix}", kept["reason"]
    )
    assert match is not None and int(match[1]) == framed_size(record, ()) - 100_000
    assert kept["bytes"] == len(payload)
    assert kept["sha256"] == hashlib.sha256(payload).hexdigest()  # finds the original
    assert kept["event_type"] == record.envelope["type"]
    assert kept["event_id"] == record.envelope["event"]["event_id"]
    assert fitted.event is None and fitted.error == f"{kept['reason']}; boom"
    assert FailedEvent.from_dict(json.loads(json.dumps(fitted.to_dict()))).event is None


def test_a_dead_letter_whose_texts_are_cut_and_still_too_large_loses_its_payload_too() -> None:
    record = parcel_record(150_000, error="e" * 50_000, traceback="t" * 50_000)
    fitted, cut = fit_record(record, 100_000, framed_size)

    assert cut == ("traceback", "error", "payload")
    assert framed_size(fitted, cut) <= 100_000
    kept = payload_dropped(fitted)
    assert kept is not None and kept["bytes"] > 150_000
    # N counts what was still over once the texts were cut (the traceback to its
    # 8,000 characters, the error to 2,000), framing included.
    texts_cut = replace(
        record, error=cut_text(record.error, 2_000), traceback=cut_text(record.traceback, 8_000)
    )
    over = framed_size(texts_cut, ("traceback", "error")) - 100_000
    assert kept["reason"] == f"payload dropped: {over} bytes over the limit of 100000"
    assert fitted.error.startswith(f"{kept['reason']}; eeee") and "characters cut" in fitted.error
