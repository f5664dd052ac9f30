"""The console's replay tells the truth, on a real Redis with real worker processes
(issue 23, item 5): a dry run makes the checks the replay makes and counts what would
fail and why; a replay says "queued" (not "done"), is not green when nothing was
queued, and groups identical errors into one line; a replay that fails again is
linked from the old id to the new record; dead letters of a renamed handler replay
to its new name, from the console and from ``eventbus dlq replay --to-handler``."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from html import unescape
from pathlib import Path

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from eventbus import EventBus, EventBusSettings, FailedEvent, create_lifespan
from eventbus.console.routes import dlq_console
from eventbus.dlq.search import DeadLetterQuery
from eventbus.redis.backend import RedisBackend
from tests import replay_handlers as h

pytest.register_assert_rewrite("tests.redis_support")
from tests.redis_support import (  # noqa: E402
    TEST_REDELIVERY_TIMEOUT,
    TEST_SERVICE,
    Workers,
    wait_settled,
    wait_until,
)

pytest_plugins = ["tests.redis_support", "tests.kafka_support"]
pytestmark = pytest.mark.timeout(180)

PREFIX = "/eventbus/console"
ROOT = Path(__file__).resolve().parent.parent
#: Worker settings: no retries (one failure dead-letters), short retry delays.
NO_RETRIES = {"EVENTBUS_MAX_RETRIES": "0"}


class Web:
    """The web process: a bus on the test's Redis namespace, the console, a client."""

    def __init__(self, client: TestClient, bus: EventBus, r: redis.Redis, namespace: str):
        self.client = client
        self.bus = bus
        self.r = r
        self.namespace = namespace

    def token(self) -> str:
        self.client.get(PREFIX + "/")
        value = self.client.cookies.get("eventbus_console_csrf")
        assert value
        return value

    def post(self, **form: str | list[str]) -> tuple[int, str]:
        answer = self.client.post(PREFIX + "/actions", data={**form, "csrf_token": self.token()})
        return answer.status_code, unescape(answer.text)

    def publish(self, *events: h.ReplayOrder) -> None:
        self.client.portal.call(self.bus.publish_many, list(events))  # type: ignore[union-attr]

    def key(self, name: str) -> str:
        return f"{self.namespace}:test:{name}"

    def handled(self, handler: str) -> list[str]:
        return [i.decode() for i in self.r.lrange(self.key(f"handled:{handler}"), 0, -1)]

    def records(self) -> list[FailedEvent]:
        return self.bus.dlq.peek(1000)


@pytest.fixture
def web(redis_url: str, namespace: str) -> Iterator[Web]:
    bus = EventBus(
        backend=RedisBackend(
            url=redis_url, namespace=namespace, redelivery_timeout=TEST_REDELIVERY_TIMEOUT
        ),
        settings=EventBusSettings(shutdown_timeout=2),
    )
    app = FastAPI(lifespan=create_lifespan(bus))
    app.include_router(dlq_console(bus, allow_unauthenticated=True))
    r = redis.Redis.from_url(redis_url)
    try:
        with TestClient(app) as client:
            yield Web(client, bus, r, namespace)
    finally:
        r.close()


def h1(html: str) -> str:
    match = re.search(r"<h1>(.*?)</h1>", html, re.S)
    assert match, html[:500]
    return re.sub(r"<[^>]+>", "", match[1]).strip()


def banner(html: str) -> str:
    """The class of the result's status banner (ok, warning, problem)."""
    match = re.search(r'<p class="(\w+)[^"]*" role="status">', html)
    assert match, html[:2000]
    return match[1]


def reason_lines(html: str) -> list[str]:
    items = re.findall(r'<ul class="reasons">(.*?)</ul>', html, re.S)
    lines = [
        re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", li)).strip()
        for ul in items
        for li in re.findall(r"<li>(.*?)</li>", ul, re.S)
    ]
    return lines


def test_dry_run_and_replay_of_a_renamed_handlers_dead_letters_tell_the_truth(
    web: Web, workers: Workers, redis_url: str, namespace: str
) -> None:
    # 6 failures of old_name, then 4 events still queued when its subscription is removed
    web.r.set(web.key("broken"), 1)
    old = workers.start(("tests.replay_handlers",), env=NO_RETRIES)
    web.publish(*(h.ReplayOrder(n=i) for i in range(6)))
    wait_until(lambda: web.bus.dlq.size() == 6, 60, "6 dead letters of old_name")
    old.stop()
    web.publish(*(h.ReplayOrder(n=10 + i) for i in range(4)))
    removed = web.bus.backend.remove_subscription(  # type: ignore[attr-defined]
        TEST_SERVICE, h.TOPIC, h.OLD_NAME, web.bus.dlq.store
    )
    assert removed == 4
    # a record no replay can deliver (its payload is not an event envelope)
    [sample] = [r for r in web.records() if r.error_type == "LookupError"][:1]
    web.bus.dlq.store.add(
        FailedEvent(
            id="not-an-envelope",
            event=None,
            envelope="garbage",
            topic=h.TOPIC,
            handler=h.OLD_NAME,
            queue=sample.queue,
            attempts=1,
            error="cannot decode",
            error_type="EventDecodeError",
        )
    )
    # the handler's new name is deployed; the old name's subscription is gone
    web.r.delete(web.key("broken"))
    workers.start(("tests.replay_handlers",), env={**NO_RETRIES, "REPLAY_HANDLER_NAME": h.NEW_NAME})
    kinds = sorted(r.error_type for r in web.records())
    assert kinds == ["EventDecodeError"] + ["LookupError"] * 6 + ["SubscriptionRemoved"] * 4

    # the dry run makes the replay's checks: none would be queued, two reasons
    status, page = web.post(action="dry-run:filter", topic=h.TOPIC)
    assert status == 200 and h1(page) == "Dry run: would queue 0 of 11 dead letters"
    assert banner(page) == "problem" and "11 would fail" in page
    lines = reason_lines(page)
    assert len(lines) == 2, lines  # 10 identical reasons are one line, not ten
    assert lines[0].startswith(f"10 handler '{h.OLD_NAME}' has no subscription to 'replay.orders'")
    assert lines[1].startswith("1 its payload is not an event envelope")
    assert "Replay these" not in page  # nothing to replay
    assert f'<option value="{h.NEW_NAME}"' in page  # the new name is offered as a target

    # the real replay agrees with the dry run: nothing queued, not green, one line per reason
    status, page = web.post(action="replay:filter", topic=h.TOPIC)
    assert status == 207 and h1(page) == "Replay: 0 of 11 queued, 11 failed"
    assert banner(page) == "problem"
    assert [line.split(" ", 1)[0] for line in reason_lines(page)] == ["10", "1"]
    assert web.bus.dlq.size() == 11

    # a dry run to the new name: the 10 events would be queued; "Replay these 10"
    status, page = web.post(action="dry-run:filter", topic=h.TOPIC, to_handler=h.NEW_NAME)
    assert h1(page) == f"Dry run: would queue 10 of 11 dead letters to handler {h.NEW_NAME}", (
        reason_lines(page)
    )
    assert banner(page) == "warning" and len(reason_lines(page)) == 1
    form = re.search(r'<form method="post" action="[^"]*/actions">(.*?)</form>', page, re.S)
    assert form and "Replay these 10" in form[1]
    ids = re.findall(r'name="id" value="([^"]+)"', form[1])
    assert len(ids) == 10 and "not-an-envelope" not in ids
    assert f'name="to_handler" value="{h.NEW_NAME}"' in form[1]

    # the console replays the 6 LookupErrors to the new name (the button's form, by ids)
    lookup_ids = [r.id for r in web.records() if r.error_type == "LookupError"]
    status, page = web.post(action="replay:selected", id=lookup_ids, to_handler=h.NEW_NAME)
    assert status == 200 and h1(page) == f"Replay: 6 of 6 queued to handler {h.NEW_NAME}"
    assert banner(page) == "ok" and "Queued is not handled yet" in page

    # the CLI replays the 4 SubscriptionRemoved ones to the new name
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "eventbus.cli",
            "dlq",
            "replay",
            "--error-type",
            "SubscriptionRemoved",
            "--to-handler",
            h.NEW_NAME,
        ],
        cwd=ROOT,
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "EVENTBUS_BACKEND": "redis",
            "EVENTBUS_REDIS_URL": redis_url,
            "EVENTBUS_REDIS_NAMESPACE": namespace,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0 and cli.stdout.strip() == "replayed 4", cli.stdout + cli.stderr

    wait_until(lambda: len(web.handled(h.NEW_NAME)) == 10, 60, "10 events handled by new_name")
    wait_settled(redis_url, namespace)
    assert web.handled(h.OLD_NAME) == [] and len(set(web.handled(h.NEW_NAME))) == 10
    assert [r.id for r in web.records()] == ["not-an-envelope"]
    audit = unescape(web.client.get(PREFIX + "/audit").text)
    assert f"to handler {h.NEW_NAME}" in audit and "6 queued" in audit


def test_a_replay_that_fails_again_links_the_old_id_to_the_new_record(
    web: Web, workers: Workers
) -> None:
    web.r.set(web.key("broken"), 1)
    workers.start(("tests.replay_handlers",), env=NO_RETRIES)
    web.publish(h.ReplayOrder(n=1))
    wait_until(lambda: web.bus.dlq.size() == 1, 60, "the dead letter")
    [first] = web.records()
    assert first.replay_of == ""

    status, page = web.post(action="replay:selected", id=first.id)
    assert status == 200 and h1(page) == "Replay: 1 of 1 queued"
    assert "Queued is not handled yet" in page

    # the handler still fails: the replayed event becomes a new record naming the old one
    wait_until(
        lambda: [r.id for r in web.records()] not in ([], [first.id]), 60, "the new dead letter"
    )
    [second] = web.records()
    assert second.id != first.id and second.replay_of == first.id
    assert second.event is not None and second.event.event_id == first.event.event_id  # type: ignore[union-attr]

    gone = web.client.get(PREFIX + "/record", params={"id": first.id})
    assert gone.status_code == 404 and "Replayed, and failed again" in gone.text
    assert f'href="{PREFIX}/record?id={second.id}"' in gone.text

    audit = web.client.get(PREFIX + "/audit").text
    assert f'failed again as <a href="{PREFIX}/record?id={second.id}">' in audit

    new_page = web.client.get(PREFIX + "/record", params={"id": second.id}).text
    text = unescape(re.sub(r"<[^>]+>", "", new_page))
    assert f"This is a replay that failed again: it was dead letter {first.id}" in text

    # fixed now: the second replay is handled and nothing links any more
    web.r.delete(web.key("broken"))
    status, page = web.post(action="replay:selected", id=second.id)
    assert h1(page) == "Replay: 1 of 1 queued"
    wait_until(lambda: len(web.handled(h.OLD_NAME)) == 1, 60, "the handled replay")
    assert web.bus.dlq.size() == 0
    assert web.bus.dlq.replayed_as([first.id, second.id]) == {}


# -- Kafka (Tansu): the same rules through the consumer group ---------------------------


async def test_kafka_replay_that_fails_again_links_back_and_a_renamed_handler_gets_the_rest(
    make_kafka_bus: Callable[..., EventBus], kafka_bootstrap: str, kafka_names: tuple[str, str]
) -> None:
    from tests.kafka_events import Numbered
    from tests.kafka_helpers import create_topic, wait_for

    topic, _ = kafka_names
    await create_topic(kafka_bootstrap, topic, 1)
    old_name, new_name = f"{topic}.old_name", f"{topic}.new_name"
    handled: list[tuple[str, int]] = []

    async def old_handler(event: Numbered) -> None:
        raise RuntimeError("payment service down")

    async def new_handler(event: Numbered) -> None:
        handled.append((new_name, event.n))

    first = make_kafka_bus()
    await first.registry.register(topic, old_handler, name=old_name)
    await first.start()
    await first.publish_many([Numbered(topic=topic, n=n, key=f"k{n}") for n in range(3)])
    await first.drain(timeout=30)
    records = await first.dlq.apeek(10)
    assert sorted(r.event.n for r in records) == [0, 1, 2]  # type: ignore[union-attr]

    # a replay to the same (still failing) handler becomes a new record naming the old one
    again = records[0]
    assert first.dlq.refusal(again) is None
    assert (await first.dlq.areplay([again.id])).replayed == [again.id]

    await wait_for(
        lambda: bool(first.dlq.replayed_as([again.id])), 30, "the new dead letter of the replay"
    )
    [(old_id, new_id)] = first.dlq.replayed_as([again.id]).items()
    new_record = await first.dlq.aget(new_id)
    assert old_id == again.id and new_record is not None and new_record.replay_of == again.id
    await first.stop()

    # the handler is renamed: this service's process has new_name only
    second = make_kafka_bus()
    await second.registry.register(topic, new_handler, name=new_name)
    await second.start()
    left = await second.dlq.apeek(10)
    assert len(left) == 3 and all(r.handler == old_name for r in left)
    # the dry run's checks: the old name would be refused, the new name accepted
    assert "would write the dead letter back as ReplayRefused" in (
        second.dlq.refusal(left[0]) or ""
    )
    assert second.dlq.refusal(left[0], new_name) is None
    assert second.dlq.targets(left[0]) == [new_name]
    result = await asyncio.to_thread(second.dlq.replay, [r.id for r in left], to_handler=new_name)
    assert sorted(result.replayed) == sorted(r.id for r in left)

    await wait_for(lambda: len(handled) == 3, 30, "the 3 events handled by the new name")
    assert sorted(handled) == [(new_name, 0), (new_name, 1), (new_name, 2)]
    await second.drain(timeout=30)
    assert await second.dlq.asize() == 0


async def test_a_dry_run_when_the_backend_cannot_be_reached_says_so_once() -> None:
    from eventbus.console.actions import ConsoleActions, Selection
    from eventbus.dlq.queue import DeadLetterQueue
    from eventbus.dlq.store import MemoryDeadLetterStore
    from eventbus.events import decode_event
    from eventbus.registry import HandlerRegistry
    from tests.redis_support import free_port

    # a real Redis client aimed at a port nothing listens on
    backend = RedisBackend(url=f"redis://127.0.0.1:{free_port()}/0", namespace="nowhere")
    store = MemoryDeadLetterStore()
    for i in range(30):
        envelope = {"type": "replay.orders:ReplayOrder", "event": {"topic": h.TOPIC, "n": i}}
        store.add(
            FailedEvent(
                id=f"r{i}",
                event=decode_event(envelope),
                envelope=envelope,
                topic=h.TOPIC,
                handler=h.OLD_NAME,
                queue=f"{TEST_SERVICE}.eventbus",
                attempts=1,
                error="x",
                error_type="LookupError",
            )
        )
    dlq = DeadLetterQueue(
        store,
        replayer=backend.replay,
        refusal=backend.replay_refusal,
        refusals=backend.replay_refusals,
        targets=backend.replay_targets,
    )
    actions = ConsoleActions(dlq, HandlerRegistry(), store.audit)
    outcome = await actions.preview("replay", Selection("filter", query=DeadLetterQuery()))
    assert outcome.would_replay == [] and len(outcome.failed) == 30
    [reason] = outcome.reasons
    assert reason.count == 30 and reason.text.startswith("cannot be checked: ConnectionError")
