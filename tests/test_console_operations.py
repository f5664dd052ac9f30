"""The console's operations page and the code fingerprints of ``subscriptions list``
(issue 23, items 3 and 5), against real Redis with real worker processes, a real
Kafka-protocol broker (Tansu), and Debian's Chromium for the screenshots.

The worker processes are started as a team runs them: ``dramatiq eventbus.actors
handlers`` in a directory of its own (a codebase), with the settings in the
environment.  Codebases are written per test: ``v1`` (``send_mail``), ``v2`` (the
same module and handler name, other code, plus ``send_sms``) and ``v3`` (whose
subscriptions are synced but no worker runs it: ``send_fax`` on the shared queue,
whose events the live workers park, and ``archive`` on a queue nobody consumes).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import redis
import uvicorn
from fastapi import FastAPI

from eventbus import BaseEvent, EventBus, EventBusSettings, cli
from eventbus.backends.base import Operations
from eventbus.console import dlq_console
from eventbus.fastapi import eventbus_lifespan
from eventbus.kafka.backend import KafkaBackend
from eventbus.redis.backend import RedisBackend
from eventbus.redis.subscriptions import list_subscriptions
from tests.kafka_events import Numbered
from tests.kafka_helpers import (
    FAST,
    HEARTBEAT_INTERVAL_MS,
    SESSION_TIMEOUT_MS,
    create_topic,
    keys_of_partition,
)
from tests.test_console_browser import DOCS_IMG, browser  # noqa: F401 (the fixture)

pytest.register_assert_rewrite("tests.redis_support")
from tests.redis_support import (  # noqa: E402
    TEST_REDELIVERY_TIMEOUT,
    free_port,
    wait_until,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser

pytest_plugins = ["tests.redis_support", "tests.kafka_support"]
pytestmark = pytest.mark.timeout(180)

PREFIX = "/eventbus/console"
SERVICE = "mailer"
#: Seconds a worker process may take to boot and beat.
BOOT_WITHIN = 60.0

HANDLERS = '''
"""Codebase {version} of the mailer."""
import os
import time

from eventbus import BaseEvent, on_event


class Mail(BaseEvent):
    topic: str = os.environ["OPS_TOPIC"]
    n: int = 0


@on_event(Mail)
def send_mail(event: Mail) -> None:
    gate = os.environ.get("OPS_GATE", "")
    while event.n == 50 and gate and not os.path.exists(gate):  # held until the test opens it
        time.sleep(0.05)
    {body}
'''

EXTRA = {
    "sms": """

@on_event(Mail)
def send_sms(event: Mail) -> None:
    pass
""",
    "fax": """

@on_event(Mail)
def send_fax(event: Mail) -> None:
    pass


@on_event(Mail, queue="archive")
def archive(event: Mail) -> None:
    pass
""",
}


def write_codebase(root: Path, version: str, body: str, *extra: str) -> Path:
    code = root / version
    code.mkdir()
    source = HANDLERS.format(version=version, body=body) + "".join(EXTRA[e] for e in extra)
    (code / "handlers.py").write_text(source)
    return code


@pytest.fixture
def codebases(tmp_path: Path) -> dict[str, Path]:
    return {
        "v1": write_codebase(tmp_path, "v1", "print('mail', event.n)"),
        "v2": write_codebase(tmp_path, "v2", "print('mail v2', event.n, flush=True)", "sms"),
        "v3": write_codebase(tmp_path, "v3", "print('mail v3', event.n)", "sms", "fax"),
    }


@pytest.fixture
def topic(namespace: str) -> str:
    return f"ops.{namespace}.mail"


def environment(code: Path, redis_url: str, namespace: str, topic: str) -> dict[str, str]:
    return {
        **os.environ,
        "EVENTBUS_BACKEND": "redis",
        "EVENTBUS_REDIS_URL": redis_url,
        "EVENTBUS_REDIS_NAMESPACE": namespace,
        "EVENTBUS_REDIS_REDELIVERY_TIMEOUT": str(TEST_REDELIVERY_TIMEOUT),
        "EVENTBUS_SERVICE": SERVICE,
        "OPS_TOPIC": topic,
        "OPS_GATE": str(code.parent / "gate"),
        "PYTHONPATH": str(code),
    }


class Codebases:
    """Worker processes of the codebases; all stopped after the test."""

    def __init__(self, redis_url: str, namespace: str, topic: str) -> None:
        self.redis_url, self.namespace, self.topic = redis_url, namespace, topic
        self.started: list[subprocess.Popen[bytes]] = []
        self.client = redis.Redis.from_url(redis_url)

    def live_pids(self) -> set[int]:
        ids = self.client.zrange(f"{self.namespace}:heartbeats", 0, -1)
        return {int(w.decode().split(".")[-2]) for w in ids}

    def start(self, code: Path) -> subprocess.Popen[bytes]:
        """``dramatiq eventbus.actors handlers -p 1`` in ``code``; returns once its one
        worker process beats (its pid is the master's child)."""
        before = self.live_pids()
        process = subprocess.Popen(
            [sys.executable, "-m", "dramatiq", "eventbus.actors", "handlers", "-p", "1", "-t", "2"],
            cwd=code,
            env=environment(code, self.redis_url, self.namespace, self.topic),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started.append(process)
        wait_until(
            lambda: bool(self.live_pids() - before) or process.poll() is not None,
            BOOT_WITHIN,
            f"a worker of {code.name} to beat",
        )
        assert process.poll() is None, f"the worker of {code.name} exited"
        return process

    def sync(self, code: Path) -> None:
        """``eventbus subscriptions sync handlers`` in ``code`` (a release step)."""
        done = subprocess.run(
            [sys.executable, "-m", "eventbus.cli", "subscriptions", "sync", "handlers"],
            cwd=code,
            env=environment(code, self.redis_url, self.namespace, self.topic),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        """SIGTERM: the worker finishes, puts back what it holds and unregisters."""
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()

    def stop_all(self) -> None:
        for process in self.started:
            self.stop(process)
        self.client.close()


@pytest.fixture
def workers(redis_url: str, namespace: str, topic: str) -> Iterator[Codebases]:
    pool = Codebases(redis_url, namespace, topic)
    try:
        yield pool
    finally:
        pool.stop_all()


def mail_class(topic: str) -> Any:
    """The test's own copy of the codebases' ``Mail`` (same topic and class name)."""
    return type(
        "Mail", (BaseEvent,), {"__annotations__": {"topic": str, "n": int}, "topic": topic, "n": 0}
    )


@pytest.fixture
async def publisher(redis_url: str, namespace: str) -> AsyncIterator[EventBus]:
    """A web process of another service: publishes, never consumes."""
    bus = EventBus(
        backend=RedisBackend(
            url=redis_url, namespace=namespace, redelivery_timeout=TEST_REDELIVERY_TIMEOUT
        ),
        settings=EventBusSettings(shutdown_timeout=2.0, service="web"),
    )
    await bus.start()
    yield bus
    await bus.stop()
    broker = bus.backend.broker  # type: ignore[attr-defined]
    if broker is not None:
        broker.close()


def console_client(bus: EventBus) -> httpx.AsyncClient:
    app = FastAPI()
    app.include_router(dlq_console(bus, allow_unauthenticated=True))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://console")


def handler_name(topic: str, name: str) -> str:
    return f"{topic}:handlers.{name}"


def row_of(ops: Operations, topic: str, name: str) -> Any:
    [row] = [s for s in ops.subscriptions if s.handler == handler_name(topic, name)]
    return row


def page_row(html: str, handler: str) -> str:
    """The ``<tr>`` of ``handler`` in the page's subscriptions tables."""
    match = re.search(
        r"<tr class=\"sub[^\"]*\">(?:(?!</tr>).)*?<code>" + re.escape(handler) + r"</code>.*?</tr>",
        html,
        re.S,
    )
    assert match is not None, f"no row of {handler} on the page"
    return match.group(0)


def cell(row: str, css: str) -> str:
    match = re.search(r"<td class=\"[^\"]*\b" + css + r"\b[^\"]*\"[^>]*>(.*?)</td>", row, re.S)
    assert match is not None, f"no {css} cell in {row}"
    return re.sub(r"<[^>]+>", "", match.group(1)).strip()


async def eventually(
    check: Callable[[Operations], bool], read: Callable[[], Any], what: str
) -> Operations:
    """The first reading that passes ``check`` (polled; fails after 30 s)."""
    deadline = time.monotonic() + 30
    while True:
        ops: Operations = await read()
        if check(ops):
            return ops
        assert time.monotonic() < deadline, f"waited 30 s for {what}: {ops}"
        await asyncio.sleep(0.1)


# -- code fingerprints ---------------------------------------------------------------------


def list_subscriptions_cli(bus: EventBus, *args: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    assert cli.run(["subscriptions", "list", *args], bus, out, err) == 0, err.getvalue()
    return out.getvalue()


async def test_subscriptions_list_flags_two_codebases_serving_one_subscription(
    workers: Codebases, codebases: dict[str, Path], publisher: EventBus, topic: str
) -> None:
    first = workers.start(codebases["v1"])
    second = workers.start(codebases["v2"])  # same service, module and handler name
    mail = handler_name(topic, "send_mail")

    text = await asyncio.to_thread(list_subscriptions_cli, publisher)
    [line] = [row for row in text.splitlines() if row.startswith(SERVICE) and f" {mail} " in row]
    assert " 2 MIXED " in line, text
    assert "MIXED code versions among live workers" in text
    [note] = [row for row in text.splitlines() if row.strip().startswith(f"{mail} (mailer)")]
    assert f":{first.pid}" not in note  # the master's pid: its child is the worker
    assert "rolling deploy" in note
    rows = json.loads(await asyncio.to_thread(list_subscriptions_cli, publisher, "--json"))
    [data] = [r for r in rows if r["handler"] == mail]
    assert data["code_versions"] == 2 and data["live_workers"] == 2
    [sms] = [r for r in rows if r["handler"] == handler_name(topic, "send_sms")]
    assert sms["code_versions"] == 1 and sms["mixed_code"] is None  # v2 alone serves it
    # one fingerprint per codebase, each naming its worker (host:pid)
    assert len(data["code"]) == 2
    named = sorted(int(n.rsplit(":", 1)[1]) for ns in data["code"].values() for n in ns)
    assert named == sorted(workers.live_pids())

    async with console_client(publisher) as client:
        page = (await client.get(f"{PREFIX}/operations")).text
    assert 'id="mixed-code"' in page and "2 versions" in page_row(page, mail)
    assert "rolling deploy" in page

    # The second codebase goes; the first runs twice: one code version, not flagged.
    workers.stop(second)
    workers.start(codebases["v1"])
    wait_until(
        lambda: (
            len(workers.live_pids()) == 2
            and next(
                s
                for s in list_subscriptions(workers.client, workers.namespace, 2.0)
                if s.handler == mail
            ).live_workers
            == 2
        ),
        BOOT_WITHIN,
        "two workers of v1",
    )
    rows = json.loads(await asyncio.to_thread(list_subscriptions_cli, publisher, "--json"))
    [data] = [r for r in rows if r["handler"] == mail]
    assert data["live_workers"] == 2 and data["code_versions"] == 1
    assert data["mixed_code"] is None
    text = await asyncio.to_thread(list_subscriptions_cli, publisher)
    assert "MIXED" not in text
    async with console_client(publisher) as client:
        page = (await client.get(f"{PREFIX}/operations")).text
    assert 'id="mixed-code"' not in page


# -- the operations page on Redis ------------------------------------------------------------


async def test_operations_page_shows_workers_backlog_and_its_age_parked_and_unrouted(
    workers: Codebases, codebases: dict[str, Path], publisher: EventBus, topic: str
) -> None:
    workers.sync(codebases["v3"])  # send_mail, send_sms, send_fax and archive subscribed
    worker = workers.start(codebases["v1"])  # a worker that has send_mail only
    [pid] = workers.live_pids()
    Mail = mail_class(topic)
    nobody = f"ops.{workers.namespace}.nobody"

    async with console_client(publisher) as client:
        page = (await client.get(f"{PREFIX}/operations")).text
        assert f":{pid}</code>" in page  # the live worker, host:pid
        assert f"<code>{SERVICE}.eventbus</code>" in page  # the queue it consumes
        assert "subscription(s) with no live worker" in page  # send_sms, send_fax, archive

        await publisher.publish_many([Mail(n=i) for i in range(3)])
        Nobody = mail_class(nobody)
        await publisher.publish(Nobody(n=99))  # no subscription: kept as unrouted

        async def read() -> Operations:
            return await publisher.backend.operations()

        # v1's worker handles send_mail and parks send_sms's and send_fax's events
        # (a rolling deploy's newer handlers); archive's queue has no consumer.
        ops = await eventually(
            lambda ops: row_of(ops, topic, "send_fax").parked == 3, read, "3 events parked"
        )
        assert row_of(ops, topic, "send_sms").parked == 3
        assert row_of(ops, topic, "archive").backlog == 3
        assert row_of(ops, topic, "archive").oldest_age is not None
        assert ops.unrouted_waiting == {nobody: 1}
        [live] = ops.workers
        assert live.name.endswith(f":{pid}") and live.in_flight == 0
        assert live.beat_age is not None and live.beat_age < TEST_REDELIVERY_TIMEOUT

        page = (await client.get(f"{PREFIX}/operations")).text
        fax = page_row(page, handler_name(topic, "send_fax"))
        assert cell(fax, "parked") == "3" and cell(fax, "backlog") == "3"
        assert cell(page_row(page, handler_name(topic, "archive")), "backlog") == "3"
        assert f"<code>{nobody}</code>" in page
        assert re.search(r'class="num waiting"[^>]*>1<', page)

        # An event its handler holds: the worker's in-flight count, until it finishes.
        await publisher.publish(Mail(n=50))
        await eventually(lambda ops: ops.workers[0].in_flight == 1, read, "an event in flight")
        page = (await client.get(f"{PREFIX}/operations")).text
        assert re.search(r'data-label="In flight">1<', page)
        (codebases["v1"].parent / "gate").touch()
        await eventually(lambda ops: ops.workers[0].in_flight == 0, read, "it to finish")

        # The worker stops: send_mail's events wait too, and their age grows.
        workers.stop(worker)
        await publisher.publish_many([Mail(n=10 + i) for i in range(2)])
        before = row_of(await read(), topic, "send_mail")
        assert before.backlog == 2 and before.live_workers == 0
        assert before.oldest_age is not None
        await asyncio.sleep(1.0)
        after = row_of(await read(), topic, "send_mail")
        assert after.oldest_age is not None and after.oldest_age >= before.oldest_age + 0.9
        await publisher.publish(Mail(n=12))
        assert row_of(await read(), topic, "send_mail").backlog == 3

        page = (await client.get(f"{PREFIX}/operations")).text
        assert "No live worker." in page
        mail_row = page_row(page, handler_name(topic, "send_mail"))
        assert cell(mail_row, "backlog") == "3" and cell(mail_row, "workers") == "none"
        assert cell(mail_row, "oldest") not in ("", "-")


async def test_operations_page_reports_a_redis_it_cannot_reach(namespace: str) -> None:
    bus = EventBus(
        backend=RedisBackend(url=f"redis://127.0.0.1:{free_port()}/0", namespace=namespace),
        settings=EventBusSettings(service="web"),
    )
    async with console_client(bus) as client:
        response = await client.get(f"{PREFIX}/operations")
    assert response.status_code == 503
    assert "Could not read the redis backend at redis://127.0.0.1:" in response.text
    assert "default-src 'none'" in response.headers["content-security-policy"]


def lags_of(page: str, topic: str) -> list[str]:
    """The lag cells of ``topic``'s partitions on the page, in partition order."""
    pattern = r"<code>" + re.escape(topic) + r':\d+</code>.*?<td class="num lag"[^>]*>(\d+)</td>'
    return re.findall(pattern, page, re.S)


# -- Kafka -------------------------------------------------------------------------------------


async def test_operations_page_shows_the_kafka_group_members_and_lag_per_partition(
    kafka_bootstrap: str, kafka_names: tuple[str, str]
) -> None:
    topic, group = kafka_names
    await create_topic(kafka_bootstrap, topic, 2)

    async def handler(event: Numbered) -> None:
        pass

    def bus(**options: Any) -> EventBus:
        return EventBus(
            backend=KafkaBackend(kafka_bootstrap, group, idempotence=False, **options),
            settings=EventBusSettings(shutdown_timeout=3, service="ledger"),
            retry_policy=FAST,
        )

    web = bus()
    await web.registry.register(topic, handler, name=f"{topic}.book")
    await web.start()
    worker = None
    try:
        for i, key in enumerate(keys_of_partition(0, 2, 4)):  # one publish each (Tansu)
            await web.publish(Numbered(topic=topic, n=i, key=key))
        async with console_client(web) as client:
            page = (await client.get(f"{PREFIX}/operations")).text
            assert f"<code>{topic}:0</code>" in page and f"<code>{topic}:1</code>" in page
            assert lags_of(page, topic) == ["4", "0"]
            assert "No live worker." in page and "unassigned" in page
            assert f"<code>{topic}.book</code>" in page

            worker = bus(
                session_timeout_ms=SESSION_TIMEOUT_MS, heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS
            )
            await worker.registry.register(topic, handler, name=f"{topic}.book")
            await worker.start(consume=True)
            await web.drain(timeout=30)
            ops = await web.backend.operations()
            # (this test's topic: decorated handlers of other test modules subscribe theirs)
            mine = [p for p in ops.partitions if p.topic == topic]
            assert [p.lag for p in mine] == [0, 0]
            assert mine[0].committed == 4
            assert len(ops.workers) == 1 and ops.workers[0].group == group
            page = (await client.get(f"{PREFIX}/operations")).text
            assert lags_of(page, topic) == ["0", "0"]
            assert f"group {group}" in page and "No live worker." not in page
    finally:
        if worker is not None:
            await worker.stop()
        await web.stop()


# -- in a browser: screenshots at 1366 and 800 px ------------------------------------------


class LiveConsole:
    """The console of ``bus`` served by uvicorn in a thread."""

    def __init__(self, bus: EventBus) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None

        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            self.loop = asyncio.get_running_loop()
            async with eventbus_lifespan(bus, app):
                yield

        app = FastAPI(lifespan=lifespan)
        app.include_router(dlq_console(bus, allow_unauthenticated=True))
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, 15, "uvicorn")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PREFIX}"

    def run(self, make: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run a coroutine on the app's loop, where its bus was started."""
        assert self.loop is not None
        asyncio.run_coroutine_threadsafe(make(), self.loop).result(30)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def test_operations_page_in_chromium_at_1366_and_800_px(
    browser: Browser,  # noqa: F811 (the fixture imported above)
    workers: Codebases,
    codebases: dict[str, Path],
    redis_url: str,
    namespace: str,
    topic: str,
) -> None:
    workers.sync(codebases["v3"])
    workers.start(codebases["v1"])
    workers.start(codebases["v2"])  # a rolling deploy under way: two code versions
    publisher = EventBus(
        backend=RedisBackend(
            url=redis_url, namespace=namespace, redelivery_timeout=TEST_REDELIVERY_TIMEOUT
        ),
        settings=EventBusSettings(shutdown_timeout=2.0, service="web"),
    )
    live = LiveConsole(publisher)
    Mail = mail_class(topic)
    Nobody = mail_class(f"ops.{namespace}.nobody")

    async def publish() -> None:
        await publisher.publish_many([Mail(n=i) for i in range(5)])
        await publisher.publish(Nobody(n=1))

    try:
        live.run(publish)
        client = workers.client
        wait_until(
            lambda: any(s.parked == 5 for s in list_subscriptions(client, namespace, 2.0)),
            30,
            "send_fax's events parked",
        )
        shots = {}
        for width in (1366, 800):
            context = browser.new_context(viewport={"width": width, "height": 900})
            page = context.new_page()
            page.goto(f"{live.url}/operations")
            assert page.inner_text("h1") == "Operations"
            assert "More than one code version" in page.inner_text("#mixed-code")
            overflow = page.evaluate(
                "() => [document.documentElement.scrollWidth, window.innerWidth]"
            )
            assert overflow[0] <= overflow[1], f"horizontal overflow at {width} px: {overflow}"
            path = DOCS_IMG / f"console-operations-{width}.png"
            page.screenshot(path=str(path), full_page=True)
            shots[width] = path.stat().st_size
            # the nav links every page to it
            page.goto(f"{live.url}/")
            assert page.get_by_role("link", name="Operations").get_attribute("href") == (
                f"{PREFIX}/operations"
            )
            context.close()
        assert all(size > 10_000 for size in shots.values())
    finally:
        live.stop()
        broker = publisher.backend.broker  # type: ignore[attr-defined]
        if broker is not None:
            broker.close()
