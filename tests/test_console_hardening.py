"""The console and the admin router against hostile input and interrupted actions, on a
real Redis store: CSRF on the JSON router, audit entries written before a bulk action
and completed after it, no-ops that cannot evict real actions, out-of-range dates and
forged values (400 in a query, shown from a record), long errors cut on the page, edits
with non-finite numbers, and the dead-letter store bounded by bytes."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import redis
from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from fastapi.testclient import TestClient

from eventbus import (
    BaseEvent,
    EventBus,
    EventBusSettings,
    FailedEvent,
    RetryPolicy,
    create_lifespan,
)
from eventbus.config import DEFAULT_DLQ_MAX_BYTES
from eventbus.console.routes import dlq_console
from eventbus.console.views import MAX_ERROR_SHOWN
from eventbus.dlq.audit_log import MemoryAuditLog
from eventbus.events import encode_event
from eventbus.fastapi import CSRF_HEADER, dlq_router
from eventbus.redis.backend import RedisBackend
from eventbus.redis.dlq import DROP_HINT, RedisAuditLog, RedisDeadLetterStore
from tests import dlq_handlers as h

pytest.register_assert_rewrite("tests.redis_support")
from tests.redis_support import (  # noqa: E402
    ROOT,
    RedisServer,
    free_port,
    queue_name,
    require_redis_server_binary,
    sync_subscriptions,
    wait_until,
)

pytest_plugins = ["tests.redis_support"]
pytestmark = pytest.mark.timeout(120)

PREFIX = "/eventbus/console"
ADMIN = {"X-Admin": "alice"}
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
POISON_HANDLER = "dlq.poison:poison"
#: The audit page's status cell of an action that started and never completed.
NOT_COMPLETED = '<span class="problem">not completed</span>'


def poison_record(n: int, *, at: datetime = T0, error: str = "no account") -> FailedEvent:
    """A dead letter of tests.dlq_handlers' poison handler (replayable on Redis)."""
    event = h.Poison(n=n)
    return FailedEvent(
        id=f"rec-{n:05d}",
        event=event,
        envelope=encode_event(event),
        topic=h.POISON,
        handler=POISON_HANDLER,
        queue=queue_name(),
        attempts=3,
        error=error,
        error_type="LookupError",
        traceback=f"Traceback (most recent call last):\nLookupError: {error}\n",
        first_failed_at=at - timedelta(seconds=5),
        last_failed_at=at,
    )


async def require_admin(x_admin: str = Header("")) -> str:
    if not x_admin:
        raise HTTPException(403, "admins only")
    return x_admin


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def redis_bus(redis_url: str, namespace: str, **settings: object) -> EventBus:
    backend = RedisBackend(url=redis_url, namespace=namespace)
    return EventBus(backend=backend, settings=EventBusSettings(shutdown_timeout=2, **settings))  # type: ignore[arg-type]


@pytest.fixture
def bus(redis_url: str, namespace: str) -> EventBus:
    """A web-side bus on Redis (not started: the console reads and replays through it)."""
    return redis_bus(redis_url, namespace)


def console_client(bus: EventBus, **options: object) -> TestClient:
    app = FastAPI()
    app.state.event_bus = bus
    app.include_router(dlq_console(bus, dependencies=[Depends(require_admin)], **options))  # type: ignore[arg-type]
    return TestClient(app, headers=ADMIN, raise_server_exceptions=False)


def csrf(client: TestClient) -> str:
    client.get(PREFIX + "/audit")
    value = client.cookies.get("eventbus_console_csrf")
    assert value
    return value


# -- the admin JSON router: CSRF ---------------------------------------------------------------


PASSWORD = "s3cret"
BASIC = HTTPBasic()


def basic_admin(credentials: HTTPBasicCredentials = Depends(BASIC)) -> str:
    if credentials.password != PASSWORD:
        raise HTTPException(401, headers={"WWW-Authenticate": "Basic"})
    return credentials.username


def test_the_admin_router_refuses_what_another_site_can_make_a_browser_send(
    bus: EventBus, redis_url: str, namespace: str
) -> None:
    sync_subscriptions(redis_url, namespace, ("tests.dlq_handlers",))
    for n in range(3):
        bus.dlq.store.add(poison_record(n))
    app = FastAPI()
    app.state.event_bus = bus
    app.include_router(dlq_router(dependencies=[Depends(basic_admin)]))
    # the browser sends the Basic credentials it cached for this site with every request
    client = TestClient(app)
    client.auth = ("ops", PASSWORD)
    url = "/eventbus/dlq"

    forged = [  # what a page elsewhere can send without a CORS preflight
        ("POST", "/rec-00000/replay", {"Content-Type": "application/x-www-form-urlencoded"}, b""),
        ("POST", "/rec-00000/replay", {"Content-Type": "text/plain"}, b"{}"),
        ("POST", "/rec-00000/replay", {}, b""),  # fetch(url, {method: "POST", mode: "no-cors"})
        ("POST", "/replay", {"Content-Type": "text/plain"}, b'{"all": true}'),
        ("POST", "/purge", {"Content-Type": "multipart/form-data; boundary=x"}, b"--x--"),
        ("DELETE", "/rec-00001", {}, b""),
        # a JSON body or the custom header from another origin (a preflight the
        # browser let through, say) is refused on Origin / Sec-Fetch-Site
        ("POST", "/purge", {"Origin": "https://evil.example"}, b'{"all": true}'),
        ("POST", "/rec-00000/replay", {CSRF_HEADER: "x", "Sec-Fetch-Site": "cross-site"}, b""),
        ("DELETE", "/rec-00001", {CSRF_HEADER: "x", "Origin": "null"}, b""),
    ]
    for method, path, headers, body in forged:
        if body.startswith(b"{") and "Content-Type" not in headers:
            headers = {**headers, "Content-Type": "application/json"}
        answer = client.request(method, url + path, headers=headers, content=body)
        assert answer.status_code == 403, (method, path, headers, answer.text)
        assert "refused" in answer.json()["detail"], answer.text
    assert bus.dlq.size() == 3  # nothing replayed, nothing purged
    refusal = client.post(url + "/rec-00000/replay").json()["detail"]
    assert "Content-Type: application/json" in refusal and CSRF_HEADER in refusal

    # reads need nothing; scripts and API clients send JSON or the header
    assert client.get(url).json()["size"] == 3
    same_origin = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}
    replayed = client.post(url + "/rec-00000/replay", headers={CSRF_HEADER: "curl"})
    assert replayed.status_code == 200 and replayed.json()["replayed"] == ["rec-00000"]
    deleted = client.delete(url + "/rec-00001", headers={CSRF_HEADER: "1", **same_origin})
    assert deleted.status_code == 204
    purged = client.post(url + "/purge", json={"ids": ["rec-00002"]}, headers=same_origin)
    assert purged.json() == {"purged": 1}
    assert bus.dlq.size() == 0


# -- the audit trail: started before, completed after; no-ops never evict ----------------------


APP = """
import sys
import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException
from eventbus import EventBus, EventBusSettings, create_lifespan
from eventbus.redis.backend import RedisBackend
from eventbus.console.routes import dlq_console

url, namespace, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
bus = EventBus(backend=RedisBackend(url=url, namespace=namespace),
               settings=EventBusSettings(shutdown_timeout=2))

async def admin(x_admin: str = Header("")) -> str:
    if not x_admin:
        raise HTTPException(403)
    return x_admin

app = FastAPI(lifespan=create_lifespan(bus))
app.include_router(dlq_console(bus, dependencies=[Depends(admin)]))
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
"""


def test_a_group_replay_killed_midway_is_in_the_audit_trail_as_not_completed(
    bus: EventBus, redis_url: str, namespace: str
) -> None:
    total = 5_000
    sync_subscriptions(redis_url, namespace, ("tests.dlq_handlers",))
    store = bus.dlq.store
    assert isinstance(store, RedisDeadLetterStore)
    store.add_many(poison_record(n, at=T0 + timedelta(milliseconds=n)) for n in range(total))
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", APP, redis_url, namespace, str(port)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    base = f"http://127.0.0.1:{port}{PREFIX}"
    try:
        web = httpx.Client(headers=ADMIN, timeout=60)
        wait_until(lambda: _answers(web, base + "/audit"), 30, "the console process")
        token = web.cookies["eventbus_console_csrf"]
        form = {
            "action": "replay:group",
            "handler": POISON_HANDLER,
            "error_type": "LookupError",
            "csrf_token": token,
        }
        request = threading.Thread(target=_post_quietly, args=(web, base + "/actions", form))
        request.start()
        wait_until(lambda: store.size() < total - 200, 30, "the replay to be under way")
        server.send_signal(signal.SIGKILL)  # the process dies in the middle of the action
        server.wait(10)
        request.join(30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
    left = store.size()
    assert 0 < left < total - 200  # interrupted: some replayed, some not

    [entry] = store.audit.entries(10)
    assert (entry.status, entry.action, entry.who, entry.count) == (
        "started",
        "replay",
        "alice",
        total,
    )
    assert f"handler={POISON_HANDLER}" in entry.detail
    page = console_client(bus).get(PREFIX + "/audit")
    assert page.status_code == 200
    assert NOT_COMPLETED in page.text and f"{total:,} selected" in page.text


def _answers(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(url).status_code == 200
    except httpx.TransportError:
        return False


def _post_quietly(client: httpx.Client, url: str, form: dict[str, str]) -> None:
    with contextlib.suppress(httpx.TransportError):  # the server was killed: the point
        client.post(url, data=form)


def test_a_bulk_action_is_audited_when_it_starts_and_when_it_completes(bus: EventBus) -> None:
    for n in range(3):
        bus.dlq.store.add(poison_record(n))
    client = console_client(bus)
    form = {"action": "purge:selected", "id": ["rec-00000", "rec-00001", "nope"]}
    answer = client.post(
        PREFIX + "/actions", data={**form, "confirm": "yes", "csrf_token": csrf(client)}
    )
    assert answer.status_code == 200

    done, started = bus.dlq.store.audit.entries(10)  # type: ignore[attr-defined]
    assert (started.status, started.count, done.status, done.count) == ("started", 3, "done", 2)
    assert started.action_id and started.action_id == done.action_id
    assert "1 missing" in done.detail
    audit = client.get(PREFIX + "/audit").text
    assert NOT_COMPLETED not in audit and "3 selected, 2 done" in audit


def test_a_replay_stopped_by_a_redis_outage_is_completed_as_failed_with_its_counts() -> None:
    require_redis_server_binary()
    server = RedisServer().start()
    try:
        sync_subscriptions(server.url, "outage", ("tests.dlq_handlers",))
        bus = redis_bus(server.url, "outage")
        store = bus.dlq.store
        assert isinstance(store, RedisDeadLetterStore)
        total = 5_000
        store.add_many(poison_record(n) for n in range(total))
        trail = MemoryAuditLog()  # elsewhere than the Redis that goes down
        client = console_client(bus, audit=trail)
        form = {
            "action": "replay:group",
            "handler": POISON_HANDLER,
            "error_type": "LookupError",
            "csrf_token": csrf(client),
        }
        answers: list[httpx.Response] = []
        request = threading.Thread(
            target=lambda: answers.append(client.post(PREFIX + "/actions", data=form))
        )
        request.start()
        wait_until(lambda: store.size() < total - 200, 30, "the replay to be under way")
        server.kill()  # Redis goes away in the middle of the action
        request.join(60)
    finally:
        server.stop()

    [answer] = answers
    assert answer.status_code == 500 and "Stopped midway" in answer.text
    done, started = trail.entries(10)
    assert (started.status, started.count) == ("started", total)
    assert done.status == "failed" and done.action_id == started.action_id
    assert 200 <= done.count < total
    assert "not tried" in done.detail and "ConnectionError" in done.detail
    audit = client.get(PREFIX + "/audit").text
    assert "failed midway" in audit and f"{total:,} selected, {done.count:,} queued" in audit


def test_no_op_actions_do_not_push_a_purge_out_of_the_audit_trail(
    bus: EventBus, r: redis.Redis, namespace: str
) -> None:
    bus.dlq.store.add(poison_record(1))
    trail = RedisAuditLog(r, f"{namespace}:dlq:audit", max_size=4)
    client = console_client(bus, audit=trail)
    token = csrf(client)
    purge = {"action": "purge:selected", "id": "rec-00001", "confirm": "yes", "csrf_token": token}
    assert client.post(PREFIX + "/actions", data=purge).status_code == 200
    assert [e.action for e in trail.entries(10)] == ["purge", "purge"]  # started, done

    no_ops = [
        {"action": "replay:selected", "id": "rec-00001"},  # gone already
        {"action": "purge:selected", "id": "nope", "confirm": "yes"},
        {"action": "replay:filter", "topic": "no.such.topic"},
        {"action": "purge:filter", "topic": "no.such.topic", "confirm": "yes"},
        {"action": "replay:group", "handler": "h", "error_type": "E"},
    ]
    for _ in range(5):
        for form in no_ops:
            answer = client.post(PREFIX + "/actions", data={**form, "csrf_token": token})
            assert answer.status_code == 200, answer.text
            assert "Nothing to do" in answer.text
    assert [(e.action, e.status) for e in trail.entries(10)] == [
        ("purge", "done"),
        ("purge", "started"),
    ]


# -- dates and forged values ------------------------------------------------------------------


def test_out_of_range_dates_and_forged_cursors_in_a_query_are_refused_with_400(
    bus: EventBus,
) -> None:
    bus.dlq.store.add(poison_record(1))
    client = console_client(bus)
    bad = [
        {"since": "9999-12-31T23:59:59-01:00"},
        {"until": "0001-01-01T00:00:00+01:00"},
        {"since": "yesterday"},
        {"cursor": "²:rec-00001"},  # a digit to str.isdigit(), not to int()
        {"cursor": "١٢٣:rec-00001"},  # Arabic-Indic digits
        {"cursor": "99999999999999999999999999:x"},
        {"cursor": "12:"},
        {"cursor": "not a cursor"},
    ]
    for params in bad:
        for page in ("/", "/groups"):
            if page == "/groups" and "cursor" in params:
                continue
            answer = client.get(PREFIX + page, params=params)
            assert answer.status_code == 400, (page, params, answer.status_code)
            assert '<p class="problem" role="alert">' in answer.text, params
    listed = client.get(PREFIX + "/", params={"since": "9999-12-31T23:59:59-01:00"})
    assert "outside the dates" in listed.text
    cursor = client.get(PREFIX + "/", params={"cursor": "²:rec-00001"})
    assert "cursor" in cursor.text and "first page" in cursor.text

    token = csrf(client)
    for form in (
        {"action": "replay:filter", "since": "0001-01-01T00:00:00+01:00"},
        {
            "action": "purge:group",
            "handler": "h",
            "error_type": "E",
            "confirm": "yes",
            "bound": "²",
        },
        {
            "action": "purge:group",
            "handler": "h",
            "error_type": "E",
            "confirm": "yes",
            "bound": "9" * 40,
        },
    ):
        answer = client.post(PREFIX + "/actions", data={**form, "csrf_token": token})
        assert answer.status_code == 400, (form, answer.status_code)
    assert bus.dlq.size() == 1
    # the far end of the calendar itself is fine
    assert client.get(PREFIX + "/", params={"until": "9999-12-31"}).status_code == 200


def test_far_dates_and_forged_values_in_stored_records_are_shown_not_500(
    bus: EventBus, r: redis.Redis, namespace: str
) -> None:
    store = bus.dlq.store
    far = poison_record(1).to_dict()
    far["last_failed_at"] = "9999-12-31T23:59:59-01:00"  # after year 9999 in UTC
    far["first_failed_at"] = "0001-01-01T00:00:00+01:00"  # before year 1 in UTC
    far["attempt_log"] = [{"at": "9999-12-31T23:59:59-01:00", "error_type": "E", "error": "x"}]
    store.add(FailedEvent.from_dict(far))
    store.add(poison_record(2))
    store.add(poison_record(3))
    store.add(poison_record(4))
    # forged in Redis: infinite index scores, an infinite attempt count, an Infinity payload
    r.zadd(f"{namespace}:dlq:ix", {"rec-00002": math.inf})
    r.zadd(
        f"{namespace}:dlq:ix:g:{len(POISON_HANDLER)}:{POISON_HANDLER}LookupError",
        {"rec-00002": -math.inf},
    )
    raw = json.dumps(poison_record(3).to_dict())
    r.hset(f"{namespace}:dlq", "rec-00003", raw.replace('"attempts": 3', '"attempts": Infinity'))
    raw = json.dumps(poison_record(4).to_dict())
    r.hset(f"{namespace}:dlq", "rec-00004", raw.replace('"n": 4', '"n": Infinity'))

    client = console_client(bus)
    for path in ("/", "/groups", "/audit", "/record?id=rec-00001", "/record?id=rec-00002"):
        answer = client.get(PREFIX + path)
        assert answer.status_code == 200, (path, answer.text[-2000:])
    assert "9999-12-31T23:59:59-01:00" in client.get(PREFIX + "/record?id=rec-00001").text
    for record_id in ("rec-00003", "rec-00004"):
        page = client.get(PREFIX + "/record", params={"id": record_id})
        assert page.status_code == 200 and "Infinity" in page.text, record_id
        assert "UnreadableRecord" in page.text

    app = FastAPI()
    app.state.event_bus = bus
    app.include_router(dlq_router(allow_unauthenticated=True))
    api = TestClient(app)
    assert api.get("/eventbus/dlq").status_code == 200
    for record_id in ("rec-00001", "rec-00003", "rec-00004"):
        assert api.get(f"/eventbus/dlq/{record_id}").status_code == 200, record_id


# -- long errors --------------------------------------------------------------------------------


def test_a_10_mb_error_is_cut_on_the_page_with_a_link_to_the_full_text(bus: EventBus) -> None:
    error = "E" * 10_000_000  # the traceback repeats it: 20 MB, under a tenth of the bound
    record = poison_record(1, error=error)
    record.attempt_log = [{"at": T0, "error_type": "LookupError", "error": error[:200]}] * 3
    bus.dlq.store.add(record)
    client = console_client(bus)

    page = client.get(PREFIX + "/record", params={"id": record.id})
    assert page.status_code == 200
    assert len(page.content) < 1_000_000  # was 30 MB: the error in the facts, each attempt, ...
    assert "E" * MAX_ERROR_SHOWN in page.text
    links = re.findall(r'href="([^"]*/record/text\?[^"]*)"', page.text)
    assert len(links) == 2  # the error and the traceback
    for link in links:
        full = client.get(link.replace("&amp;", "&"))
        assert full.status_code == 200 and full.headers["content-type"].startswith("text/plain")
        assert full.headers["x-content-type-options"] == "nosniff"
        assert error in full.text
    token = csrf(client)
    for action in ("dry-run:selected", "purge:selected"):  # a preview of the record
        answer = client.post(
            PREFIX + "/actions", data={"action": action, "id": record.id, "csrf_token": token}
        )
        assert answer.status_code == 200 and len(answer.content) < 1_000_000, action
    assert (
        client.get(PREFIX + "/record/text", params={"id": "nope", "part": "error"}).status_code
        == 404
    )
    assert (
        client.get(PREFIX + "/record/text", params={"id": record.id, "part": "x"}).status_code
        == 422
    )


# -- edit and replay --------------------------------------------------------------------------


class Quote(BaseEvent):
    topic: str = "console.quotes"
    price: float = 1.0


def test_edit_and_replay_refuses_numbers_json_cannot_carry() -> None:
    bus = EventBus(
        settings=EventBusSettings(shutdown_timeout=1), retry_policy=RetryPolicy(max_retries=0)
    )
    handled: list[Quote] = []
    broken = [True]

    async def price(event: Quote) -> None:
        if broken[0]:
            raise ConnectionError("pricing down")
        handled.append(event)

    app = FastAPI(lifespan=create_lifespan(bus))
    app.include_router(dlq_console(bus, dependencies=[Depends(require_admin)]))
    with TestClient(app, headers=ADMIN) as client:
        client.portal.call(lambda: bus.registry.register(Quote, price, name="quotes:price"))  # type: ignore[union-attr]
        client.portal.call(bus.subscribe, "console.quotes")  # type: ignore[union-attr]

        async def fail() -> None:
            await bus.publish(Quote(price=2.5))
            await bus.drain(timeout=5)

        client.portal.call(fail)  # type: ignore[union-attr]
        [record] = bus.dlq.peek()
        broken[0] = False
        token = csrf(client)
        for text in ('{"price": 1e999}', '{"price": -1e400}', '{"price": [1E309]}'):
            answer = client.post(
                PREFIX + "/record/edit",
                data={"id": record.id, "event": text, "action": "replay", "csrf_token": token},
            )
            assert answer.status_code == 422, text
            assert "not a finite number" in answer.text, text
        assert bus.dlq.size() == 1 and handled == []

        with pytest.raises(ValueError, match="Infinity"):
            bus.dlq.replay_edited(
                record.id, {"type": record.envelope["type"], "event": {"price": math.inf}}
            )
        assert bus.dlq.size() == 1

        fine = client.post(
            PREFIX + "/record/edit",
            data={
                "id": record.id,
                "event": '{"price": 3.5}',
                "action": "replay",
                "csrf_token": token,
            },
        )
        assert fine.status_code == 200
        client.portal.call(bus.drain, 5)  # type: ignore[union-attr]
        assert [q.price for q in handled] == [3.5]


# -- the Redis store: bounded by bytes ----------------------------------------------------------


def test_the_redis_store_is_bounded_by_bytes_oldest_evicted_first(
    r: redis.Redis, namespace: str, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert EventBusSettings().dlq_max_bytes == DEFAULT_DLQ_MAX_BYTES
    configured = redis_bus(redis_url, namespace, dlq_max_bytes=300_000).dlq.store
    assert isinstance(configured, RedisDeadLetterStore) and configured.max_bytes == 300_000

    store = RedisDeadLetterStore(r, namespace=namespace, max_size=10_000, max_bytes=300_000)
    caplog.set_level(logging.WARNING, logger="eventbus.redis.dlq")
    for n in range(100):  # ~20 KB each: 2 MB offered to a 300 KB store
        store.add(poison_record(n, at=T0 + timedelta(seconds=n), error="x" * 10_000))
    held = store.find(None)
    assert 10 <= len(held) < 20
    assert [f.id for f in held] == [f"rec-{n:05d}" for n in range(100 - len(held), 100)]  # newest
    assert store.evicted == 100 - len(held)
    assert store.used_bytes <= 300_000
    stored = sum(r.hstrlen(f"{namespace}:dlq", f.id) for f in held)
    assert stored <= store.used_bytes  # the counter covers what is stored
    assert any("evicted" in m and "300,000 bytes" in m for m in caplog.messages)

    # removing, claiming and completing keep the counter true
    for record in held[:5]:
        store.remove(record.id)
    claimed = store.claim(held[5].id)
    assert claimed is not None
    store.complete(claimed.id)
    left = store.find(None)
    assert store.used_bytes == sum(
        r.hstrlen(f"{namespace}:dlq", f.id) + r.hstrlen(f"{namespace}:dlq:sum", f.id) for f in left
    )
    store.clear()
    assert store.used_bytes == 0 and store.size() == 0


def test_a_record_bigger_than_the_byte_bound_is_kept_cut_with_its_reason(
    r: redis.Redis, namespace: str, caplog: pytest.LogCaptureFixture, bus: EventBus
) -> None:
    store = RedisDeadLetterStore(r, namespace=namespace, max_bytes=200_000)
    caplog.set_level(logging.WARNING, logger="eventbus.redis.dlq")
    store.add(poison_record(0))
    big_error = poison_record(1, error="e" * 1_000_000)  # 1 MB error, 1 MB traceback
    store.add(big_error)
    kept = store.get(big_error.id)
    assert kept is not None and kept.event is not None  # still replayable
    assert len(kept.error) < 2_000 and kept.error.startswith("e" * 300)
    assert "characters cut] …" in kept.error and "characters cut] …" in kept.traceback
    assert kept.envelope == big_error.envelope

    huge = poison_record(2)
    huge.envelope["event"]["blob"] = "b" * 500_000  # type: ignore[index]
    store.add(huge)
    dropped = store.get(huge.id)
    assert dropped is not None and dropped.event is None
    kept_of_it = dropped.envelope["payload_dropped"]
    assert kept_of_it["event_id"] == huge.envelope["event"]["event_id"]  # type: ignore[index]
    assert kept_of_it["bytes"] > 500_000 and len(kept_of_it["sha256"]) == 64
    reason = kept_of_it["reason"]
    assert re.fullmatch(
        rf"payload dropped: \d+ bytes over the limit of 20000 \({re.escape(DROP_HINT)}\)", reason
    )
    assert dropped.error.startswith(f"{reason}; ")
    assert bus.dlq.replay([huge.id]).failed  # refused, and kept
    assert store.get(huge.id) is not None
    assert store.used_bytes <= 200_000
    assert any(huge.id in m and "cut" in m for m in caplog.messages)

    # the console shows why
    client = console_client(bus)  # the same keys, through the backend's store
    page = client.get(PREFIX + "/record", params={"id": huge.id})
    assert page.status_code == 200 and reason in page.text
