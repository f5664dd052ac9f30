"""The dead-letter console without a browser: what it reads from the stores (pages,
cursors, filters, groups, indexes) on memory and a real Redis, the audit trail, and
its HTTP rules (auth, CSRF, confirmation bounds, edit validation, dry runs)."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from html import unescape

import pytest
import redis
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
)
from eventbus.console.routes import dlq_console
from eventbus.dlq.audit_log import AuditEntry
from eventbus.dlq.search import DeadLetterQuery, ScanSearch, SearchableStore, micros
from eventbus.dlq.store import DeadLetterStore, MemoryDeadLetterStore
from eventbus.redis.dlq import RedisDeadLetterStore

pytest_plugins = ["tests.redis_support"]

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
_seq = itertools.count()


def record(
    record_id: str | None = None,
    *,
    topic: str = "orders.paid",
    handler: str = "orders.paid:book",
    error_type: str = "ConnectionError",
    at: datetime = T0,
    envelope: object = None,
) -> FailedEvent:
    return FailedEvent(
        id=record_id or f"r{next(_seq)}",
        event=None,
        envelope=envelope if envelope is not None else {"type": "x", "event": {"topic": topic}},
        topic=topic,
        handler=handler,
        queue="eventbus",
        attempts=3,
        error="ledger unavailable",
        error_type=error_type,
        first_failed_at=at - timedelta(seconds=5),
        last_failed_at=at,
    )


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> DeadLetterStore:
    if request.param == "memory":
        return MemoryDeadLetterStore()
    client = request.getfixturevalue("r")
    return RedisDeadLetterStore(client, namespace=request.getfixturevalue("namespace"))


def searchable_of(store: DeadLetterStore) -> SearchableStore:
    return store if isinstance(store, SearchableStore) else ScanSearch(store)


def walk(search: SearchableStore, query: DeadLetterQuery, limit: int) -> list[str]:
    ids: list[str] = []
    cursor = None
    for _ in range(1000):
        page = search.search(query, limit=limit, cursor=cursor)
        ids += [item.id for item in page.items]
        if page.next_cursor is None:
            return ids
        cursor = page.next_cursor
    raise AssertionError("the cursor never ended")


def newest_first(records: list[FailedEvent]) -> list[str]:
    ordered = sorted(records, key=lambda f: (micros(f.last_failed_at), f.id), reverse=True)
    return [f.id for f in ordered]


# -- what the console reads from a store ------------------------------------------------


def test_pages_walk_every_record_newest_first_once_even_with_equal_times(
    store: DeadLetterStore,
) -> None:
    # 25 records on 6 distinct instants: the cursor must split ties without loss
    records = [record(f"id-{i:02d}", at=T0 + timedelta(seconds=i % 6)) for i in range(25)]
    for f in records:
        store.add(f)
    search = searchable_of(store)

    for limit in (1, 4, 7, 25, 100):
        assert walk(search, DeadLetterQuery(), limit) == newest_first(records)
    first = search.search(DeadLetterQuery(), limit=7, cursor=None)
    assert first.total == 25 and len(first.items) == 7 and first.next_cursor is not None
    assert first.items[0].error == "ledger unavailable" and first.items[0].attempts == 3


def test_filters_and_time_range_select_exactly_the_matching_records(
    store: DeadLetterStore,
) -> None:
    records = [
        record(
            topic=f"t{i % 2}",
            handler=f"t{i % 2}:h{i % 3}",
            error_type=("ValueError", "KeyError", "OSError")[i % 3 if i % 4 else 0],
            at=T0 + timedelta(minutes=i),
        )
        for i in range(40)
    ]
    for f in records:
        store.add(f)
    search = searchable_of(store)
    since, until = T0 + timedelta(minutes=10), T0 + timedelta(minutes=30)
    queries = [
        DeadLetterQuery(topic="t1"),
        DeadLetterQuery(handler="t0:h2"),
        DeadLetterQuery(error_type="ValueError"),
        DeadLetterQuery(handler="t1:h1", error_type="KeyError"),
        DeadLetterQuery(topic="t0", error_type="OSError"),  # no shared index
        DeadLetterQuery(topic="t0", handler="t0:h1"),
        DeadLetterQuery(since=since, until=until),
        DeadLetterQuery(error_type="ValueError", since=since),
        DeadLetterQuery(topic="nope"),
    ]
    for query in queries:
        expected = newest_first(
            [
                f
                for f in records
                if f.matches(query.topic, query.handler, query.error_type)
                and (query.since is None or f.last_failed_at >= query.since)
                and (query.until is None or f.last_failed_at <= query.until)
            ]
        )
        assert walk(search, query, 3) == expected, query
        assert search.select(query) == expected, query
        total = search.search(query, limit=3, cursor=None).total
        assert total in (len(expected), None), query
    # a filter with its own index is counted exactly
    assert search.search(DeadLetterQuery(topic="t1"), limit=1, cursor=None).total == 20


def test_failure_groups_count_and_date_each_handler_and_exception(
    store: DeadLetterStore,
) -> None:
    for i in range(5):
        store.add(
            record(
                handler="orders.paid:book", error_type="ConnectionError", at=T0 + timedelta(hours=i)
            )
        )
    for i in range(2):
        store.add(
            record(
                handler="orders.paid:book",
                error_type="KeyError",
                at=T0 + timedelta(days=1, hours=i),
            )
        )
    store.add(record(topic="users", handler="users:mail", error_type="ConnectionError"))

    groups = searchable_of(store).failure_groups(DeadLetterQuery())

    summary = [(g.handler, g.error_type, g.topic, g.count) for g in groups]
    assert summary == [
        ("orders.paid:book", "ConnectionError", "orders.paid", 5),
        ("orders.paid:book", "KeyError", "orders.paid", 2),
        ("users:mail", "ConnectionError", "users", 1),
    ]
    assert groups[0].first_seen == T0 and groups[0].last_seen == T0 + timedelta(hours=4)
    assert groups[0].sample_error == "ledger unavailable"
    in_range = searchable_of(store).failure_groups(
        DeadLetterQuery(topic="orders.paid", since=T0 + timedelta(hours=3))
    )
    assert [(g.error_type, g.count) for g in in_range] == [("ConnectionError", 2), ("KeyError", 2)]


def test_claimed_removed_and_evicted_records_leave_the_indexes(
    r: redis.Redis, namespace: str
) -> None:
    store = RedisDeadLetterStore(r, namespace=namespace, max_size=4)
    for i in range(4):
        store.add(record(f"r{i}", handler="h", error_type="E", at=T0 + timedelta(seconds=i)))
    query = DeadLetterQuery(handler="h", error_type="E")

    claimed = store.claim("r3")
    assert claimed is not None
    assert store.select(query) == ["r2", "r1", "r0"]
    assert store.failure_groups(DeadLetterQuery())[0].count == 3
    store.release(claimed)
    assert store.select(query) == ["r3", "r2", "r1", "r0"]

    assert store.remove("r1") is not None
    assert store.claim("r0") is not None
    store.complete("r0")
    assert store.select(DeadLetterQuery()) == ["r3", "r2"]

    for i in range(4, 7):  # max_size 4: r2 is evicted, with its index entries
        store.add(record(f"r{i}", handler="h", error_type="F", at=T0 + timedelta(seconds=i)))
    assert store.select(DeadLetterQuery()) == ["r6", "r5", "r4", "r3"]
    assert store.select(query) == ["r3"]
    assert [(g.error_type, g.count) for g in store.failure_groups(DeadLetterQuery())] == [
        ("F", 3),
        ("E", 1),
    ]

    store.clear()
    assert store.failure_groups(DeadLetterQuery()) == []
    left = sorted(r.scan_iter(match=f"{namespace}:dlq*"))
    assert left == [f"{namespace}:dlq:{k}".encode() for k in ("evicted", "seq")]  # counters only


def test_replacing_a_record_moves_it_between_groups(r: redis.Redis, namespace: str) -> None:
    store = RedisDeadLetterStore(r, namespace=namespace)
    store.add(record("same", error_type="KeyError"))
    store.add(record("same", error_type="ValueError", at=T0 + timedelta(1)))

    groups = store.failure_groups(DeadLetterQuery())
    assert [(g.error_type, g.count) for g in groups] == [("ValueError", 1)]
    assert store.select(DeadLetterQuery(error_type="KeyError")) == []


def test_records_written_without_indexes_are_indexed_when_searched(
    r: redis.Redis, namespace: str
) -> None:
    store = RedisDeadLetterStore(r, namespace=namespace)
    store.add(record("new", topic="a", handler="a:h"))
    # as a version without indexes wrote them: the record hash and the order only
    old = record("old", topic="b", handler="b:h", at=T0 - timedelta(1))
    r.hset(f"{namespace}:dlq", "old", json.dumps(old.to_dict()))
    r.hset(f"{namespace}:dlq", "junk", b"\xff{not json")
    r.zadd(f"{namespace}:dlq:order", {"old": 100, "junk": 101})

    assert set(store.select(DeadLetterQuery())) == {"new", "old", "junk"}
    assert [f.id for f in store.find(None, topic="b")] == ["old"]
    assert {g.handler: g.count for g in store.failure_groups(DeadLetterQuery())} == {
        "a:h": 1,
        "b:h": 1,
        "": 1,
    }
    assert store.reindex() == 0  # nothing left to fix


def test_filtered_find_keeps_insertion_order_and_its_limit(r: redis.Redis, namespace: str) -> None:
    store = RedisDeadLetterStore(r, namespace=namespace)
    for i in range(6):  # inserted newest failure first
        store.add(record(f"r{i}", topic="t" if i % 2 else "u", at=T0 - timedelta(seconds=i)))
    assert [f.id for f in store.find(None, topic="t")] == ["r1", "r3", "r5"]
    assert [f.id for f in store.find(2, topic="t")] == ["r3", "r5"]
    assert store.find(0, topic="t") == []


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_the_audit_trail_lives_with_the_store_newest_first(
    kind: str, request: pytest.FixtureRequest
) -> None:
    if kind == "memory":
        store: MemoryDeadLetterStore | RedisDeadLetterStore = MemoryDeadLetterStore()
    else:
        client = request.getfixturevalue("r")
        namespace = request.getfixturevalue("namespace")
        store = RedisDeadLetterStore(client, namespace=namespace, audit_size=3)
        again = RedisDeadLetterStore(client, namespace=namespace)
    for i in range(4):
        store.audit.append(
            AuditEntry(at=T0, who=f"user{i}", action="purge", count=i, ids=("a", "b"), detail="x")
        )
    entries = store.audit.entries(10)
    assert [e.who for e in entries][:3] == ["user3", "user2", "user1"]
    assert entries[0].ids == ("a", "b") and entries[0].at == T0 and entries[0].count == 3
    if kind == "redis":
        assert len(entries) == 3  # capped
        assert [e.who for e in again.audit.entries(1)] == ["user3"]  # shared by processes


# -- the HTTP rules ------------------------------------------------------------------------------


class Order(BaseEvent):
    topic: str = "console.orders"
    amount: int = 1
    note: str = ""


class Ledger:
    """A handler that fails while ``broken``, recording what it handled."""

    def __init__(self) -> None:
        self.broken = True
        self.handled: list[Order] = []

    async def __call__(self, event: Order) -> None:
        if self.broken:
            raise ConnectionError("ledger unavailable")
        self.handled.append(event)


async def require_admin(x_admin: str = Header("")) -> str:
    if not x_admin:
        raise HTTPException(403, "admins only")
    return x_admin


ADMIN = {"X-Admin": "alice"}
PREFIX = "/eventbus/console"


@pytest.fixture
def console() -> Iterator[tuple[TestClient, EventBus, Ledger]]:
    bus = EventBus(
        settings=EventBusSettings(shutdown_timeout=1),
        retry_policy=RetryPolicy(max_retries=0),
    )
    ledger = Ledger()
    app = FastAPI(lifespan=create_lifespan(bus))
    app.include_router(dlq_console(bus, dependencies=[Depends(require_admin)]))
    with TestClient(app, headers=ADMIN) as client:
        client.portal.call(lambda: bus.registry.register(Order, ledger, name="orders:ledger"))  # type: ignore[union-attr]
        client.portal.call(bus.subscribe, Order.model_fields["topic"].default)  # type: ignore[union-attr]
        yield client, bus, ledger


def fail(client: TestClient, bus: EventBus, *events: Order) -> None:
    async def run() -> None:
        await bus.publish_many(list(events))
        await bus.drain(timeout=5)

    client.portal.call(run)  # type: ignore[union-attr]


def token(client: TestClient) -> str:
    client.get(PREFIX + "/")
    value = client.cookies.get("eventbus_console_csrf")
    assert value
    return value


def test_the_console_refuses_to_mount_without_auth() -> None:
    with pytest.raises(ConfigurationError, match="auth dependency"):
        dlq_console()
    assert dlq_console(allow_unauthenticated=True).routes
    with pytest.raises(ConfigurationError, match="trace_id"):
        dlq_console(allow_unauthenticated=True, trace_url="https://jaeger/trace/")
    with pytest.raises(ConfigurationError, match="https://"):
        dlq_console(allow_unauthenticated=True, trace_url="javascript:alert('{trace_id}')")


def test_every_page_and_asset_needs_the_auth_dependency(
    console: tuple[TestClient, EventBus, Ledger],
) -> None:
    client, _, _ = console
    for path in ("/", "/groups", "/audit", "/record?id=x", "/static/console.css"):
        assert client.get(PREFIX + path, headers={"X-Admin": ""}).status_code == 403, path
        assert client.get(PREFIX + path).status_code in (200, 404), path
    page = client.get(PREFIX + "/")
    assert "script-src" not in page.headers["content-security-policy"]
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert page.headers["server-timing"].startswith("app;dur=")


def test_state_changing_requests_without_a_matching_csrf_token_are_refused(
    console: tuple[TestClient, EventBus, Ledger],
) -> None:
    client, bus, _ = console
    fail(client, bus, Order())
    [record_id] = [f.id for f in bus.dlq.peek()]
    good = token(client)
    form = {"action": "purge:selected", "id": record_id, "confirm": "yes"}

    cases = [
        ({}, {}),
        ({"csrf_token": "x" * 43}, {}),
        ({"csrf_token": good}, {"Origin": "http://evil.example"}),
        ({"csrf_token": good}, {"Origin": "null"}),
        ({"csrf_token": good}, {"Sec-Fetch-Site": "cross-site"}),
    ]
    for extra, headers in cases:
        answer = client.post(PREFIX + "/actions", data={**form, **extra}, headers=headers)
        assert answer.status_code == 403, (extra, headers)
        assert "Refused" in answer.text
    edit = client.post(PREFIX + "/record/edit", data={"id": record_id, "event": "{}"})
    assert edit.status_code == 403
    assert bus.dlq.size() == 1

    same_origin = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}
    done = client.post(PREFIX + "/actions", data={**form, "csrf_token": good}, headers=same_origin)
    assert done.status_code == 200 and bus.dlq.size() == 0
    json_body = client.post(PREFIX + "/actions", json={**form, "csrf_token": good})
    assert json_body.status_code == 415


def test_a_confirmed_purge_leaves_records_that_failed_after_the_confirmation(
    console: tuple[TestClient, EventBus, Ledger],
) -> None:
    client, bus, _ = console
    fail(client, bus, Order(amount=1), Order(amount=2))
    csrf = token(client)
    group = {"handler": "orders:ledger", "error_type": "ConnectionError", "csrf_token": csrf}

    confirm = client.post(PREFIX + "/actions", data={**group, "action": "purge:group"})
    assert confirm.status_code == 200 and "Yes, purge 2" in confirm.text
    assert bus.dlq.size() == 2  # asking purges nothing
    bound = re.search(r'name="bound" value="(\d+)"', confirm.text)
    assert bound is not None

    fail(client, bus, Order(amount=3))  # fails after the page was shown
    done = client.post(
        PREFIX + "/actions",
        data={**group, "action": "purge:group", "confirm": "yes", "bound": bound[1]},
    )
    assert done.status_code == 200
    [left] = bus.dlq.peek()
    assert isinstance(left.event, Order) and left.event.amount == 3


def test_a_dry_run_changes_nothing_and_says_what_would_happen(
    console: tuple[TestClient, EventBus, Ledger],
) -> None:
    client, bus, ledger = console
    fail(client, bus, *(Order(amount=i) for i in range(3)))
    answer = client.post(
        PREFIX + "/actions",
        data={"action": "dry-run:filter", "topic": "console.orders", "csrf_token": token(client)},
    )
    assert answer.status_code == 200
    assert "Dry run: would queue 3 of 3 dead letters" in answer.text
    assert bus.dlq.size() == 3 and ledger.handled == []
    assert "Nothing replayed or purged yet" in client.get(PREFIX + "/audit").text


def test_an_edit_is_validated_against_the_handlers_event_class(
    console: tuple[TestClient, EventBus, Ledger],
) -> None:
    client, bus, ledger = console
    fail(client, bus, Order(amount=7))
    [record_id] = [f.id for f in bus.dlq.peek()]
    csrf = token(client)

    def submit(text: str, action: str = "replay") -> tuple[int, str]:
        answer = client.post(
            PREFIX + "/record/edit",
            data={"id": record_id, "event": text, "action": action, "csrf_token": csrf},
        )
        return answer.status_code, unescape(answer.text)

    page = client.get(PREFIX + "/record/edit", params={"id": record_id}).text
    fields = json.loads(unescape(re.search(r"<textarea[^>]*>(.*?)</textarea>", page, re.S)[1]))  # type: ignore[index]
    assert fields["amount"] == 7

    refusals = {
        '{"amount": "seven"}': "amount: Input should be a valid integer",
        '{"amount": NaN}': "NaN is not JSON",
        "[1, 2]": "must be a JSON object, not a JSON list",
        '{"amount": 1': "not valid JSON",
        "[" * 100 + "]" * 100: "nested more than 64 levels",
    }
    for text, message in refusals.items():
        status, html = submit(text)
        assert status == 422 and message in html, text
    assert bus.dlq.size() == 1

    status, html = submit(json.dumps({**fields, "amount": 8}), action="validate")
    assert status == 200 and "changed: amount" in html and bus.dlq.size() == 1

    ledger.broken = False
    status, html = submit(json.dumps({**fields, "amount": 9}))
    assert status == 200 and "Queued 1 event again" in html
    client.portal.call(bus.drain, 5)  # type: ignore[union-attr]
    assert [e.amount for e in ledger.handled] == [9] and bus.dlq.size() == 0
    audit = client.get(PREFIX + "/audit").text
    assert "alice" in audit and "replay-edited" in audit and "edited (amount)" in audit


def test_the_audit_trail_names_the_user_of_the_auth_dependency(
    console: tuple[TestClient, EventBus, Ledger],
) -> None:
    client, bus, ledger = console
    fail(client, bus, Order(), Order())
    ledger.broken = False
    answer = client.post(
        PREFIX + "/actions",
        data={"action": "replay:filter", "handler": "orders:ledger", "csrf_token": token(client)},
        headers={"X-Admin": "bob"},
    )
    assert answer.status_code == 200
    client.portal.call(bus.drain, 5)  # type: ignore[union-attr]
    assert len(ledger.handled) == 2
    entry, started = bus.dlq.store.audit.entries()  # type: ignore[attr-defined]
    assert (entry.who, entry.action, entry.count, entry.status) == ("bob", "replay", 2, "done")
    assert (started.status, started.action_id) == ("started", entry.action_id)
    assert "filter handler=orders:ledger" in entry.detail


def test_unknown_records_and_bad_forms_get_clear_pages(
    console: tuple[TestClient, EventBus, Ledger],
) -> None:
    client, _, _ = console
    missing = client.get(PREFIX + "/record", params={"id": "nope"})
    assert missing.status_code == 404 and "No dead letter" in missing.text
    csrf = token(client)
    nothing = client.post(
        PREFIX + "/actions", data={"action": "replay:selected", "csrf_token": csrf}
    )
    assert nothing.status_code == 400 and "select at least one record" in nothing.text
    group = client.post(PREFIX + "/actions", data={"action": "replay:group", "csrf_token": csrf})
    assert group.status_code == 400 and "handler and an error type" in group.text
    bad_time = client.get(PREFIX + "/", params={"since": "yesterday"})
    assert bad_time.status_code == 400 and "is not a date and time" in bad_time.text


def test_without_jinja2_the_import_names_the_extra_to_install() -> None:
    code = (
        "import sys; sys.modules['jinja2'] = None\n"
        "try:\n    import eventbus.console.routes\n"
        "except ImportError as exc:\n    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert 'eventbus.console.routes needs the "console" extra' in done.stdout, done.stderr
    assert 'pip install "fastapi-eventbus[console]"' in done.stdout


def test_a_time_range_includes_the_whole_minute_it_ends_with(
    console: tuple[TestClient, EventBus, Ledger],
) -> None:
    client, bus, _ = console
    for name, seconds in (("before", -1), ("first", 0), ("last", 59.999), ("after", 60)):
        bus.dlq.store.add(record(f"at-{name}", at=T0 + timedelta(seconds=seconds)))
    page = client.get(
        PREFIX + "/", params={"since": "2024-05-01T12:00", "until": "2024-05-01T12:00"}
    )
    shown = re.findall(r'name="id" value="([^"]+)"', page.text)
    assert shown == ["at-last", "at-first"]
    assert 'value="2024-05-01T12:00:59"' in page.text  # the field shows what was applied
