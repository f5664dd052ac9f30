"""The dead-letter console in a real browser: Playwright driving Debian's Chromium
against the app served by uvicorn (embedded backend, and Redis with a worker process).

Needs ``pip install playwright`` and ``apt-get install chromium chromium-driver``
(Playwright's own browser download is not used).  Without them the tests are
skipped, except under ``CI=true``, where a missing browser fails them.
"""

from __future__ import annotations

import asyncio
import html
import json
import os
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
import redis
import uvicorn
from fastapi import Depends, FastAPI, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from eventbus import BaseEvent, EventBus, EventBusSettings, FailedEvent, RetryPolicy
from eventbus.console.routes import dlq_console
from eventbus.events import decode_event
from eventbus.fastapi import eventbus_lifespan
from eventbus.redis.backend import RedisBackend
from tests import dlq_handlers as poison

pytest.register_assert_rewrite("tests.redis_support")
from tests.redis_support import (  # noqa: E402
    TEST_REDELIVERY_TIMEOUT,
    Workers,
    free_port,
    wait_settled,
    wait_until,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page

pytest_plugins = ["tests.redis_support"]
pytestmark = pytest.mark.timeout(180)

T = TypeVar("T")

#: Debian's Chromium (``apt-get install chromium chromium-driver``).
CHROMIUM = os.environ.get("EVENTBUS_TEST_CHROMIUM", "/usr/bin/chromium")
#: Flags for a headless Chromium in a container with loopback traffic only.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DOCS_IMG = Path(__file__).resolve().parent.parent / "docs" / "img"
USER, PASSWORD = "alice", "correct horse"
PREFIX = "/eventbus/console"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the playwright package is not installed (pip install playwright)"
    if missing is None and not os.path.exists(CHROMIUM):
        missing = f"no Chromium at {CHROMIUM} (apt-get install chromium chromium-driver)"
    if missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests cannot run: {missing}")
        pytest.skip(missing)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(
        http_credentials={"username": USER, "password": PASSWORD},
        viewport={"width": 1280, "height": 860},
    )
    yield ctx
    ctx.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    opened = context.new_page()
    opened.set_default_timeout(15_000)
    return opened


# -- the application under test -----------------------------------------------------------


basic = HTTPBasic()


def current_admin(credentials: HTTPBasicCredentials = Depends(basic)) -> str:
    if (credentials.username, credentials.password) != (USER, PASSWORD):
        raise HTTPException(401, "who are you?", headers={"WWW-Authenticate": "Basic"})
    return credentials.username


class Order(BaseEvent):
    topic: str = "shop.orders"
    order_id: int
    amount_cents: int
    currency: str = "EUR"


class Signup(BaseEvent):
    topic: str = "shop.signups"
    email: str


class Handler:
    """Fails with ``error`` while ``broken``; records what it handled."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.broken = True
        self.handled: list[BaseEvent] = []

    async def __call__(self, event: BaseEvent) -> None:
        if self.broken:
            raise self.error
        self.handled.append(event)


class LiveApp:
    """A FastAPI app with a bus and the console, served by uvicorn in a thread."""

    def __init__(self, bus: EventBus, **console: Any) -> None:
        self.bus = bus
        self.loop: asyncio.AbstractEventLoop | None = None

        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            self.loop = asyncio.get_running_loop()
            async with eventbus_lifespan(bus, app):
                yield

        self.app = FastAPI(lifespan=lifespan)
        self.app.include_router(dlq_console(bus, dependencies=[Depends(current_admin)], **console))
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PREFIX}"

    def start(self) -> LiveApp:
        self.thread.start()
        wait_until(lambda: self.server.started, 15, "uvicorn")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    def run(self, make: Callable[[], Awaitable[T]], timeout: float = 30) -> T:
        """Run a coroutine on the app's loop (where the embedded bus lives)."""
        assert self.loop is not None

        async def call() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout)

    def publish(self, *events: BaseEvent) -> None:
        async def go() -> None:
            await self.bus.publish_many(list(events))
            await self.bus.drain(timeout=20)

        self.run(go)


@pytest.fixture
def shop() -> Iterator[tuple[LiveApp, Handler, Handler]]:
    bus = EventBus(
        settings=EventBusSettings(shutdown_timeout=2),
        retry_policy=RetryPolicy(max_retries=2, delay=0.001),
    )
    ledger = Handler(ConnectionError("ledger service unavailable (503)"))
    mailer = Handler(ValueError("template 'welcome' missing"))
    bus.registry.add(_spec(Order, ledger, "shop.orders:book_payment"))
    bus.registry.add(_spec(Signup, mailer, "shop.signups:send_welcome"))
    live = LiveApp(bus, trace_url="https://tracing.example.com/trace/{trace_id}").start()
    try:
        yield live, ledger, mailer
    finally:
        live.stop()


def _spec(event: type[BaseEvent], handler: Handler, name: str) -> Any:
    from eventbus.registry import make_spec

    return make_spec(event, handler, name=name)


def record_ids(page: Page) -> list[str]:
    return page.locator("input[name=id][type=checkbox]").evaluate_all(
        "boxes => boxes.map(b => b.value)"
    )


# -- the flows ------------------------------------------------------------------------------


def test_list_filter_detail_replay_then_the_record_is_gone_and_the_handler_ran(
    shop: tuple[LiveApp, Handler, Handler], page: Page
) -> None:
    live, ledger, _ = shop
    live.publish(Order(order_id=1, amount_cents=1299), Signup(email="ann@example.com"))
    assert live.bus.dlq.size() == 2

    page.goto(live.url + "/")
    assert len(record_ids(page)) == 2
    page.select_option("select[name=topic]", "shop.orders")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url(re.compile(r"topic=shop\.orders"))
    [record_id] = record_ids(page)
    assert "1 dead letter matches the filters" in page.inner_text("p.count")

    page.locator("table.records tbody a").first.click()
    page.wait_for_url(re.compile(r"/record\?id="))
    assert "ledger service unavailable (503)" in page.inner_text("pre.traceback")
    assert '"order_id": 1' in page.inner_text("pre.payload")
    assert page.inner_text("dl.facts dt:has-text('Attempts') + dd") == "3"

    ledger.broken = False
    page.get_by_role("button", name="Replay", exact=True).click()
    assert "Queued 1 event again" in page.inner_text("main")
    live.run(lambda: live.bus.drain(timeout=10))
    assert [e.order_id for e in ledger.handled] == [1]  # type: ignore[attr-defined]

    page.goto(live.url + "/")
    assert record_id not in record_ids(page) and len(record_ids(page)) == 1
    page.goto(f"{live.url}/record?id={record_id}")
    assert "Not found" in page.inner_text("h1")


def test_edit_and_replay_delivers_the_edited_payload_and_refuses_an_invalid_one(
    shop: tuple[LiveApp, Handler, Handler], page: Page
) -> None:
    live, ledger, _ = shop
    live.publish(Order(order_id=7, amount_cents=-500))
    [record] = live.bus.dlq.peek()

    page.goto(f"{live.url}/record?id={record.id}")
    page.get_by_role("link", name="Edit and replay").click()
    fields = json.loads(page.input_value("textarea#event"))
    assert fields["amount_cents"] == -500

    page.fill("textarea#event", json.dumps({**fields, "amount_cents": "five hundred"}))
    page.get_by_role("button", name="Validate and replay").click()
    alert = page.inner_text("div.problem")
    assert "invalid as" in alert and "amount_cents: Input should be a valid integer" in alert
    assert live.bus.dlq.size() == 1  # refused: nothing replayed
    assert "five hundred" in page.input_value("textarea#event")  # the edit is kept

    ledger.broken = False
    page.fill("textarea#event", json.dumps({**fields, "amount_cents": 500}, indent=2))
    page.get_by_role("button", name="Validate and replay").click()
    assert "Queued 1 event again" in page.inner_text("main")
    live.run(lambda: live.bus.drain(timeout=10))
    [handled] = ledger.handled
    assert isinstance(handled, Order) and (handled.order_id, handled.amount_cents) == (7, 500)
    assert live.bus.dlq.size() == 0

    page.goto(live.url + "/audit")
    row = page.locator("table.audit tbody tr").first.inner_text()
    assert USER in row and "replay-edited" in row and "amount_cents" in row


def test_replaying_a_failure_group_of_50_handles_all_of_them(
    shop: tuple[LiveApp, Handler, Handler], page: Page
) -> None:
    live, ledger, mailer = shop
    live.publish(*(Order(order_id=i, amount_cents=100 + i) for i in range(50)))
    live.publish(Signup(email="bob@example.com"))
    assert live.bus.dlq.size() == 51

    page.goto(live.url + "/groups")
    row = page.locator("table.groups tbody tr", has_text="shop.orders:book_payment")
    assert "ConnectionError" in row.inner_text() and "50" in row.inner_text()

    row.get_by_role("button", name="Dry run").click()
    assert "Dry run: would queue 50 of 50 dead letters" in page.inner_text("h1")
    assert live.bus.dlq.size() == 51 and ledger.handled == []

    ledger.broken = False
    page.goto(live.url + "/groups")
    page.locator("table.groups tbody tr", has_text="shop.orders:book_payment").get_by_role(
        "button", name="Replay", exact=True
    ).click()
    assert "50 of 50 queued" in page.inner_text("h1")
    live.run(lambda: live.bus.drain(timeout=20))
    assert sorted(e.order_id for e in ledger.handled) == list(range(50))  # type: ignore[attr-defined]
    assert [r.handler for r in live.bus.dlq.peek(100)] == ["shop.signups:send_welcome"]
    assert mailer.handled == []


def test_purge_asks_for_confirmation_first(
    shop: tuple[LiveApp, Handler, Handler], page: Page
) -> None:
    live, _, _ = shop
    live.publish(*(Order(order_id=i, amount_cents=1) for i in range(3)))
    page.goto(live.url + "/")
    boxes = page.locator("input[name=id][type=checkbox]")
    boxes.nth(0).check()
    boxes.nth(1).check()
    page.get_by_role("button", name="Purge selected…").click()

    assert "Purge 2 dead letters?" in page.inner_text("h1")
    assert "cannot be undone" in page.inner_text("main")
    assert live.bus.dlq.size() == 3  # asked, not done
    page.get_by_role("link", name="Cancel").click()
    assert live.bus.dlq.size() == 3

    page.goto(live.url + "/groups")
    page.get_by_role("button", name="Purge…").click()
    assert "Purge 3 dead letters?" in page.inner_text("h1")
    page.get_by_role("button", name="Yes, purge 3").click()
    assert "Purged 3 dead letters" in page.inner_text("main")
    assert live.bus.dlq.size() == 0


XSS = '<script>window.__xss = 1; alert("xss")</script>'
IMG = '<img src=x onerror="window.__xss = 2; alert(2)">'
JS_URL = "javascript:window.__xss=3;alert(3)"


def hostile_record(live: LiveApp) -> FailedEvent:
    envelope = {
        "type": f"evil.{XSS}",
        "event": {"topic": XSS, "note": IMG, "homepage": JS_URL, "q": "\"'><svg onload=alert(4)>"},
    }
    return FailedEvent(
        id=f'x"><script>alert(5)</script>{IMG}',
        event=None,
        envelope=envelope,
        topic=f"{XSS}.topic",
        handler=f"{IMG}:handler",
        queue="eventbus",
        attempts=2,
        error=f"boom {IMG} {XSS}",
        error_type=f"Err{IMG}",
        traceback=f'Traceback (most recent call last):\n  File "{XSS}"\n{IMG}\n{JS_URL}\n',
        correlation_id=JS_URL,
        trace_id=f"{JS_URL}{XSS}",
    )


def test_hostile_values_are_shown_as_text_and_never_run(
    shop: tuple[LiveApp, Handler, Handler], browser: Browser
) -> None:
    live, _, _ = shop
    live.bus.dlq.store.add(hostile_record(live))
    # CSP off: escaping alone must keep the page inert
    ctx = browser.new_context(
        http_credentials={"username": USER, "password": PASSWORD}, bypass_csp=True
    )
    page = ctx.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    try:
        page.goto(live.url + "/")
        pages = [live.url + "/", live.url + "/groups"]
        page.locator("table.records tbody a").first.click()
        page.wait_for_url(re.compile(r"/record\?id="))
        pages.append(page.url)
        pages.append(page.url.replace("/record?", "/record/edit?"))
        for url in pages:
            page.goto(url)
            page.wait_for_load_state("load")
            assert page.evaluate("() => window.__xss") is None, url
            assert page.locator("main script, main img, main svg").count() == 0, url
            assert page.locator("[onerror], [onload]").count() == 0, url
            assert page.locator('a[href^="javascript:"]').count() == 0, url
            text = page.inner_text("main")
            assert "<script>" in text or "<img" in text, url  # shown, as text
        page.goto(pages[2])
        source = page.content()
        assert "&lt;script&gt;window.__xss = 1" in source
        assert "<script>window" not in source
        assert page.inner_text("pre.traceback").count("<img src=x onerror=") == 1
        trace = page.locator("dl.facts a", has_text="javascript:")
        href = trace.get_attribute("href")
        assert href is not None and href.startswith("https://tracing.example.com/trace/")
        assert "javascript%3A" in href and "<" not in href

        # the purge confirmation page shows the hostile selection too
        page.goto(live.url + "/")
        page.locator("input[name=id][type=checkbox]").first.check()
        page.get_by_role("button", name="Purge selected…").click()
        assert page.evaluate("() => window.__xss") is None
        assert "<script>" in page.inner_text("main")
        assert dialogs == []
    finally:
        ctx.close()


class _AttackerPage(BaseHTTPRequestHandler):
    """Another origin's page with a form aimed at the console (a CSRF attempt)."""

    target = ""
    record_id = ""

    def do_GET(self) -> None:
        body = (
            "<!doctype html><title>win a prize</title>"
            f'<form method="post" action="{html.escape(self.target)}">'
            '<input type="hidden" name="action" value="purge:selected">'
            '<input type="hidden" name="confirm" value="yes">'
            f'<input type="hidden" name="id" value="{html.escape(self.record_id)}">'
            '<input type="hidden" name="csrf_token" value="guessed-token-guessed-token-guessed">'
            "<button>Claim your prize</button></form>"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_posts_without_the_csrf_token_are_refused(
    shop: tuple[LiveApp, Handler, Handler], page: Page
) -> None:
    live, _, _ = shop
    live.publish(Order(order_id=1, amount_cents=1))
    [record] = live.bus.dlq.peek()
    page.goto(live.url + "/")  # the browser now holds the console's cookie and credentials

    answer = page.request.post(
        live.url + "/actions",
        form={"action": "purge:selected", "confirm": "yes", "id": record.id},
    )
    assert answer.status == 403 and "no CSRF token" in answer.text()
    assert live.bus.dlq.size() == 1

    # another origin's form: the browser attaches the cookie and the credentials
    _AttackerPage.target = live.url + "/actions"
    _AttackerPage.record_id = record.id
    attacker = ThreadingHTTPServer(("127.0.0.1", 0), _AttackerPage)
    thread = threading.Thread(target=attacker.serve_forever, daemon=True)
    thread.start()
    try:
        page.goto(f"http://127.0.0.1:{attacker.server_address[1]}/")
        page.get_by_role("button", name="Claim your prize").click()
        page.wait_for_url(live.url + "/actions")
        assert "Refused" in page.inner_text("h1")
    finally:
        attacker.shutdown()
    assert live.bus.dlq.size() == 1


#: A handler name and an error message longer than any column (the layout must wrap them).
LONG_HANDLER = "shop.fulfilment:reserve_stock_for_marketplace_orders_with_backorder_fallback_eu"
LONG_ERROR = (
    "warehouse API refused the reservation: POST https://warehouse.internal.example.com/api/v3/"
    "reservations/bulk?include=backorders&region=eu-central-1&idempotency_key=5f0c9e2b7a41d3"
    " answered 409 Conflict: " + "stock-level-mismatch;" * 12
)


def fill_samples(store: Any) -> None:
    """Dead letters of five handlers (two of them not subscribed here), fixed times."""
    now = datetime(2025, 3, 14, 9, 30, tzinfo=UTC)  # fixed: the images only change with the UI
    samples = [
        (
            "shop.orders",
            "shop.orders:book_payment",
            "ConnectionError",
            "ledger service unavailable (503)",
            14,
        ),
        (
            "shop.orders",
            "shop.orders:book_payment",
            "TimeoutError",
            "ledger call timed out after 5.0 s",
            4,
        ),
        ("shop.orders", LONG_HANDLER, "WarehouseConflictError", LONG_ERROR, 3),
        (
            "shop.signups",
            "shop.signups:send_welcome",
            "ValueError",
            "template 'welcome' missing",
            6,
        ),
        (
            "shop.refunds",
            "shop.refunds:notify_finance",
            "HandlerTimeout",
            "handler exceeded its time limit",
            2,
        ),
    ]
    n = 0
    for topic, handler, error_type, error, count in samples:
        for i in range(count):
            n += 1
            at = now - timedelta(minutes=7 * n + i)
            event = {
                "event_id": f"{n:04x}9f2c6d1e4b8a7f3c5d2e1a0b{n:04x}",
                "topic": topic,
                "timestamp": (at - timedelta(seconds=9)).isoformat(),
                "metadata": {"correlation_id": f"req-{n:05d}"},
                "order_id": 40_000 + n,
                "amount_cents": 1299 + n,
                "currency": "EUR",
            }
            envelope = {"type": "shop.events.Order", "event": event}
            store.add(
                FailedEvent(
                    id=f"{n:08x}-5e1b-4c3a-9d2f-{n:012x}",
                    event=decode_event(envelope),
                    envelope=envelope,
                    topic=topic,
                    handler=handler,
                    queue="shop.default",
                    attempts=4,
                    error=error,
                    error_type=error_type,
                    traceback=(
                        "Traceback (most recent call last):\n"
                        '  File "/app/shop/handlers.py", line 42, in book_payment\n'
                        "    await ledger.book(event.order_id, event.amount_cents)\n"
                        '  File "/app/shop/ledger.py", line 88, in book\n'
                        "    response.raise_for_status()\n"
                        f"{error_type}: {error}\n"
                    ),
                    first_failed_at=at - timedelta(seconds=8),
                    last_failed_at=at,
                    correlation_id=f"req-{n:05d}",
                    trace_id=f"4bf92f3577b34da6a3ce929d0e0e{n:04x}",
                    attempt_log=[
                        {
                            "at": at - timedelta(seconds=8 - 2 * k - (k == 3) * 2),
                            "error_type": error_type,
                            "error": error if k == 3 else f"{error} (attempt {k + 1})",
                        }
                        for k in range(4)
                    ],
                )
            )


def fits(page: Page, what: str) -> None:
    """The page scrolls only vertically: nothing is wider than the window."""
    width, inner = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert width <= inner, f"{what}: the page is {width}px wide in a {inner}px window"


@pytest.mark.parametrize("width", [1366, 800])
def test_every_page_fits_the_window_from_800_px_and_screenshots(
    shop: tuple[LiveApp, Handler, Handler], browser: Browser, width: int
) -> None:
    live, _, _ = shop
    fill_samples(live.bus.dlq.store)
    ctx = browser.new_context(
        http_credentials={"username": USER, "password": PASSWORD},
        viewport={"width": width, "height": 900},
    )
    page = ctx.new_page()
    page.set_default_timeout(15_000)
    suffix = "" if width == 1366 else f"-{width}"
    DOCS_IMG.mkdir(parents=True, exist_ok=True)

    def shot(name: str) -> None:
        fits(page, f"{name} at {width}px")
        path = DOCS_IMG / f"console-{name}{suffix}.png"
        page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 10_000

    try:
        page.goto(live.url + "/?limit=25")
        # the bulk buttons come before the records, not below 25 (or 200) rows
        bar = page.locator("div.actions-top").first.bounding_box()
        table = page.locator("table.records").bounding_box()
        assert bar is not None and table is not None and bar["y"] < table["y"]
        shot("list")
        page.goto(live.url + "/groups")
        row = page.locator("table.groups tbody tr", has_text=LONG_HANDLER)
        assert "3" in row.inner_text() and row.get_by_role("button", name="Dry run").is_visible()
        shot("groups")
        page.goto(live.url + "/")
        page.locator("table.records tbody a").first.click()
        page.wait_for_url(re.compile(r"/record\?id="))
        shot("detail")
        # the dry run of every record: the truth about the two handlers not subscribed here
        page.goto(live.url + "/")
        page.get_by_role("button", name="Dry run").nth(1).click()
        assert "Dry run: would queue 24 of 29 dead letters" in page.inner_text("h1")
        reasons = page.locator("ul.reasons li").all_inner_texts()
        assert len(reasons) == 2 and reasons[0].startswith(f"3 handler '{LONG_HANDLER}'")
        assert reasons[1].startswith("2 handler 'shop.refunds:notify_finance'")
        assert page.get_by_role("button", name="Replay these 24").is_visible()
        shot("dry-run")
    finally:
        ctx.close()


def test_select_all_then_replay_these_from_the_dry_run(
    shop: tuple[LiveApp, Handler, Handler], page: Page
) -> None:
    live, ledger, _ = shop
    live.publish(*(Order(order_id=i, amount_cents=1) for i in range(3)))
    live.bus.dlq.store.add(
        FailedEvent(
            id="orphan-1",
            event=None,
            envelope={"type": "shop.events.Order", "event": {"topic": "shop.orders"}},
            topic="shop.orders",
            handler="shop.orders:removed_handler",
            queue="default",
            attempts=1,
            error="gone",
            error_type="SubscriptionRemoved",
        )
    )
    page.goto(live.url + "/")
    boxes = page.locator("input[name=id][type=checkbox]")
    assert boxes.count() == 4 and not any(boxes.nth(i).is_checked() for i in range(4))
    page.get_by_role("link", name="Select all 4 on this page").click()
    assert all(boxes.nth(i).is_checked() for i in range(4))  # no script: the server checks them
    page.get_by_role("button", name="Dry run").first.click()
    assert "Dry run: would queue 3 of 4 dead letters" in page.inner_text("h1")
    assert live.bus.dlq.size() == 4 and ledger.handled == []

    ledger.broken = False
    page.get_by_role("button", name="Replay these 3").click()
    assert "Replay: 3 of 3 queued" in page.inner_text("h1")
    live.run(lambda: live.bus.drain(timeout=10))
    assert sorted(e.order_id for e in ledger.handled) == [0, 1, 2]  # type: ignore[attr-defined]
    assert [r.id for r in live.bus.dlq.peek(10)] == ["orphan-1"]


# -- Redis: the web process shows what worker processes dead-lettered ----------------------------


def test_replaying_a_group_of_50_on_redis_reaches_the_worker(
    redis_url: str, namespace: str, workers: Workers, page: Page
) -> None:
    workers.start(("tests.dlq_handlers",), threads=8, env={"EVENTBUS_MAX_RETRIES": "0"})
    bus = EventBus(
        backend=RedisBackend(
            url=redis_url, namespace=namespace, redelivery_timeout=TEST_REDELIVERY_TIMEOUT
        ),
        settings=EventBusSettings(shutdown_timeout=2),
    )
    live = LiveApp(bus).start()
    r = redis.Redis.from_url(redis_url)
    try:
        live.run(lambda: bus.publish_many([poison.Poison(n=i) for i in range(50)]))
        wait_until(lambda: bus.dlq.size() == 50, 60, "50 dead letters")

        page.goto(live.url + "/groups")
        row = page.locator("table.groups tbody tr", has_text="dlq.poison:poison")
        assert "LookupError" in row.inner_text() and "50" in row.inner_text()
        r.set(poison.key("fixed", namespace), 1)
        row.get_by_role("button", name="Replay", exact=True).click()
        assert "50 of 50 queued" in page.inner_text("h1")

        def handled() -> int:
            return int(r.llen(poison.key("handled", namespace)))

        wait_until(lambda: handled() == 50, 60, "the 50 replayed events")
        wait_settled(redis_url, namespace)  # nothing left that could be delivered twice
        assert handled() == 50 and bus.dlq.size() == 0
        page.goto(live.url + "/audit")
        assert "50" in page.locator("table.audit tbody tr").first.inner_text()
        entries = bus.dlq.store.audit.entries()  # type: ignore[attr-defined]
        assert [(e.who, e.status) for e in entries] == [(USER, "done"), (USER, "started")]
    finally:
        live.stop()
        r.close()
