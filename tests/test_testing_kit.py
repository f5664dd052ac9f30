"""eventbus.testing: an app tested with the kit through TestClient and httpx, what it
records, re-raising handler failures, and each fault doing exactly what it claims."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from eventbus import (
    BaseEvent,
    EventBus,
    EventBusSettings,
    PublishError,
    RetryPolicy,
    create_lifespan,
)
from eventbus.kafka.backend import KafkaBackend
from eventbus.redis.backend import RedisBackend
from eventbus.testing import EventBusTestKit, InjectedFault, kit_fixture
from tests.kit_app import Shop, make_shop

ROOT = Path(__file__).resolve().parent.parent

#: 2 retries with a 5 s backoff: a test that waited for it would time out.
SLOW_RETRIES = RetryPolicy(max_retries=2, delay=5.0)


@pytest.fixture
def shop() -> Shop:
    return make_shop(retry_policy=SLOW_RETRIES)


def signup(client: TestClient, user_id: int = 1, email: str = "ada@example.org") -> None:
    response = client.post("/users", json={"user_id": user_id, "email": email})
    assert response.status_code == 201, response.text


# -- an app tested with the kit ---------------------------------------------------------


def test_sync_testclient_runs_handlers_of_a_redis_configured_app_in_process(shop: Shop) -> None:
    redis_backend = shop.bus.backend
    assert isinstance(redis_backend, RedisBackend)  # its Redis does not exist
    with EventBusTestKit(shop.bus) as kit, TestClient(shop.app) as client:
        signup(client, 1, "ada@example.org")
        kit.drain()
        created = kit.assert_published(shop.UserCreated, user_id=1, email="ada@example.org")
        kit.assert_published(shop.WelcomeSent, user_id=1)  # published by a handler
        assert shop.emails == ["ada@example.org"] and shop.welcomed == [1]
        welcome = kit.handler(shop.send_welcome)
        welcome.mock.assert_called_once_with(created)
        assert [(c.attempt, c.ok) for c in welcome.calls] == [(1, True)]
        assert created.metadata["correlation_id"]
    assert shop.bus.backend is redis_backend


async def test_async_httpx_client_drains_with_adrain(shop: Shop) -> None:
    transport = httpx.ASGITransport(app=shop.app)
    async with EventBusTestKit(shop.bus) as kit, shop.app.router.lifespan_context(shop.app):
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/users", json={"user_id": 7, "email": "g@x.org"})
        assert response.status_code == 201
        await kit.adrain()
        kit.assert_published(shop.UserCreated, user_id=7)
        assert shop.emails == ["g@x.org"] and shop.welcomed == [7]
        assert kit.handler(shop.count_signup).mock.call_count == 1


@pytest.mark.parametrize("backend", ["redis", "kafka", "sync"])
def test_the_bus_gets_its_backend_broker_and_dead_letters_back(backend: str) -> None:
    settings = EventBusSettings(
        backend=backend,  # type: ignore[arg-type]
        redis_url="redis://127.0.0.1:1/0",
        kafka_bootstrap_servers="127.0.0.1:1",
    )
    shop = make_shop(settings)
    before = (shop.bus.backend, shop.bus.broker, shop.bus.dlq, shop.bus.health)
    with EventBusTestKit(shop.bus) as kit, TestClient(shop.app) as client:
        assert shop.bus.backend is not before[0]
        signup(client)
        kit.drain()
        assert shop.emails == ["ada@example.org"]
    assert (shop.bus.backend, shop.bus.broker, shop.bus.dlq, shop.bus.health) == before
    if backend == "kafka":
        assert isinstance(shop.bus.backend, KafkaBackend)


def test_leaving_the_app_drains_pending_deliveries(shop: Shop) -> None:
    with EventBusTestKit(shop.bus) as kit:
        kit.delay(shop.UserCreated, seconds=0.3)
        with TestClient(shop.app) as client:
            signup(client)
            assert shop.emails == []  # not drained: the delivery is held back
        assert shop.emails == ["ada@example.org"] and shop.welcomed == [1]


async def test_leaving_an_async_kit_drains_and_stops_a_bus_the_test_started(shop: Shop) -> None:
    async with EventBusTestKit(shop.bus) as kit:
        kit.delay(shop.UserCreated, seconds=0.1)
        await shop.bus.start()
        await shop.bus.publish(shop.UserCreated(user_id=1, email="ada@example.org"))  # type: ignore[call-arg]
    assert shop.emails == ["ada@example.org"] and shop.welcomed == [1]
    assert not shop.bus.started and isinstance(shop.bus.backend, RedisBackend)


def test_drain_times_out_naming_what_is_pending(shop: Shop) -> None:
    with EventBusTestKit(shop.bus) as kit, TestClient(shop.app) as client:
        kit.delay(shop.UserCreated, handler=shop.send_welcome, seconds=0.5)
        signup(client)
        with pytest.raises(TimeoutError, match="1 event deliveries still pending"):
            kit.drain(timeout=0.05)
    assert shop.emails == ["ada@example.org"]  # leaving the app waited for it


def test_two_apps_in_a_row_on_one_kit(shop: Shop) -> None:
    with EventBusTestKit(shop.bus) as kit:
        for user_id in (1, 2):
            with TestClient(shop.app) as client:  # a new event loop each time
                signup(client, user_id)
                kit.drain()
        assert [e.user_id for e in kit.published(shop.UserCreated)] == [1, 2]  # type: ignore[attr-defined]


def test_the_kit_refuses_a_bus_that_already_runs(shop: Shop) -> None:
    with TestClient(shop.app), pytest.raises(RuntimeError, match="enter the kit before"):
        EventBusTestKit(shop.bus).__enter__()


def test_one_kit_at_a_time(shop: Shop) -> None:
    with EventBusTestKit(shop.bus), pytest.raises(RuntimeError, match="already active"):
        EventBusTestKit(shop.bus).__enter__()


async def test_sync_drain_on_the_bus_loop_points_to_adrain(shop: Shop) -> None:
    async with EventBusTestKit(shop.bus) as kit, shop.app.router.lifespan_context(shop.app):
        with pytest.raises(RuntimeError, match=r"await kit\.adrain\(\)"):
            kit.drain()


def test_testclient_without_with_says_the_lifespan_did_not_run() -> None:
    class Ping(BaseEvent):
        topic: str = "kit.ping"

    bus = EventBus()
    app = FastAPI(lifespan=create_lifespan(bus))

    @app.post("/ping")
    async def ping() -> None:
        await bus.publish(Ping())

    client = TestClient(app)  # no `with`: the lifespan does not run
    with pytest.raises(PublishError) as caught:
        client.post("/ping")
    message = str(caught.value)
    assert "lifespan did not run" in message
    assert "with TestClient(app) as client:" in message


# -- recording assertions -----------------------------------------------------------------


def test_assert_published_names_the_class_and_the_fields_that_differ(shop: Shop) -> None:
    with EventBusTestKit(shop.bus) as kit, TestClient(shop.app) as client:
        signup(client, 2, "bob@example.org")
        signup(client, 3, "cy@example.org")
        with pytest.raises(AssertionError) as caught:
            kit.assert_published(shop.UserCreated, user_id=1, email="cy@example.org")
        kit.drain()
    message = str(caught.value)
    assert message.startswith(
        "UserCreated with user_id=1, email='cy@example.org' was not published; "
        "the 2 published differ:"
    )
    assert "user_id=2 (expected 1), email='bob@example.org' (expected 'cy@example.org')" in (
        message
    )
    _, second = message.splitlines()[1:]
    assert "email" not in second and "user_id=3 (expected 1)" in second


def test_assert_published_when_nothing_of_the_class_was_published(shop: Shop) -> None:
    with EventBusTestKit(shop.bus) as kit:
        with pytest.raises(
            AssertionError,
            match=r"^UserCreated with user_id=1 was not published: nothing was published$",
        ):
            kit.assert_published(shop.UserCreated, user_id=1)
        with TestClient(shop.app) as client:
            signup(client)
            kit.drain()
        with pytest.raises(AssertionError) as caught:
            kit.assert_published(shop.WelcomeSent, user_id=2)

        class Refunded(BaseEvent):
            topic: str = "kit.refunded"

        with pytest.raises(
            AssertionError,
            match=r"^Refunded was not published: published: UserCreated x1, WelcomeSent x1$",
        ):
            kit.assert_published(Refunded)
    assert str(caught.value).startswith("WelcomeSent with user_id=2 was not published; ")
    assert "user_id=1 (expected 2)" in str(caught.value)


def test_assert_published_refuses_a_field_the_class_lacks(shop: Shop) -> None:
    with EventBusTestKit(shop.bus) as kit, pytest.raises(TypeError, match="no field 'usr_id'"):
        kit.assert_published(shop.UserCreated, usr_id=1)


def test_assert_not_published_and_published_by_topic(shop: Shop) -> None:
    with EventBusTestKit(shop.bus) as kit, TestClient(shop.app) as client:
        kit.assert_not_published(shop.UserCreated)
        signup(client, 5)
        kit.drain()
        kit.assert_not_published(shop.UserCreated, user_id=6)
        with pytest.raises(AssertionError, match=r"UserCreated with user_id=5 was published 1 "):
            kit.assert_not_published(shop.UserCreated, user_id=5)
        topic = shop.WelcomeSent.default_topic()
        assert topic is not None
        assert [e.topic for e in kit.published(topic)] == [topic]
        assert len(kit.published()) == 2


def test_handler_lookup_errors_name_the_handlers(shop: Shop) -> None:
    def stranger(event: BaseEvent) -> None: ...

    with EventBusTestKit(shop.bus) as kit, pytest.raises(LookupError, match="not a handler"):
        kit.handler(stranger)


# -- handler failures -------------------------------------------------------------------


def test_a_failing_handler_reraises_from_drain_after_its_retries_without_backoff(
    shop: Shop,
) -> None:
    shop.broken.add(4)
    started = time.monotonic()
    with EventBusTestKit(shop.bus) as kit, TestClient(shop.app) as client:
        signup(client, 4)
        with pytest.raises(ValueError, match="no mailbox for user 4") as caught:
            kit.drain()
        kit.drain()  # raised once
    assert time.monotonic() - started < 4  # the policy's 5 s backoff was skipped
    calls = kit.handler(shop.send_welcome).calls
    assert [(c.attempt, c.ok) for c in calls] == [(1, False), (2, False), (3, False)]
    assert any("after 3 attempt(s)" in note for note in caught.value.__notes__)
    assert shop.signups == [4]  # its sibling ran once: failures retry alone


def test_a_failure_nobody_drained_is_raised_when_the_kit_exits(shop: Shop) -> None:
    shop.broken.add(4)
    with pytest.raises(ValueError, match="no mailbox"):  # noqa: SIM117
        with EventBusTestKit(shop.bus), TestClient(shop.app) as client:
            signup(client, 4)


def test_raise_errors_false_keeps_the_dead_letter_as_production_does(shop: Shop) -> None:
    shop.broken.add(4)
    with EventBusTestKit(shop.bus, raise_errors=False) as kit, TestClient(shop.app) as client:
        signup(client, 4)
        kit.drain()
        (record,) = shop.bus.dlq.peek()
        assert record.error_type == "ValueError" and record.attempts == 3
        assert record.handler == kit.handler(shop.send_welcome).name
    (failure,) = kit.failures
    assert isinstance(failure.exception, ValueError) and failure.attempts == 3


def test_backoff_true_waits_the_policy_delays() -> None:
    shop = make_shop(retry_policy=RetryPolicy(max_retries=1, delay=0.3))
    shop.broken.add(4)
    with EventBusTestKit(shop.bus, raise_errors=False, backoff=True) as kit:
        with TestClient(shop.app) as client:
            signup(client, 4)
            kit.drain()
        first, second = kit.handler(shop.send_welcome).calls
    assert second.started - first.started >= 0.3


# -- fault injection --------------------------------------------------------------------


def test_deliver_twice_delivers_the_same_event_twice_one_after_the_other(shop: Shop) -> None:
    with EventBusTestKit(shop.bus) as kit, TestClient(shop.app) as client:
        kit.deliver_twice(shop.UserCreated)
        signup(client, 1)
        kit.drain()
        counted = kit.handler(shop.count_signup).calls
        welcome = kit.handler(shop.send_welcome).calls
    assert shop.signups == [1, 1]  # not idempotent: counted twice
    assert shop.emails == ["ada@example.org"]  # idempotent on event_id: one email
    for first, second in (counted, welcome):
        assert first.event.event_id == second.event.event_id
        assert first.message_id != second.message_id
        assert (first.duplicate, second.duplicate) == (False, True)
        assert first.attempt == second.attempt == 1
        assert second.started >= first.finished  # one after the other
    assert len(kit.published(shop.UserCreated)) == 1  # published once, delivered twice
    assert shop.welcomed == [1]


def test_deliver_twice_to_one_handler_only(shop: Shop) -> None:
    with EventBusTestKit(shop.bus) as kit, TestClient(shop.app) as client:
        kit.deliver_twice(handler=shop.count_signup)
        signup(client, 1)
        kit.drain()
        assert shop.signups == [1, 1]
        assert kit.handler(shop.send_welcome).mock.call_count == 1


def test_crash_after_the_handler_ran_redelivers_the_same_message(shop: Shop) -> None:
    with EventBusTestKit(shop.bus) as kit, TestClient(shop.app) as client:
        kit.crash_after(shop.UserCreated, handler=shop.send_welcome)
        kit.crash_after(handler=shop.count_signup, times=2)
        signup(client, 1)
        kit.drain()
        welcome = kit.handler(shop.send_welcome).calls
        counted = kit.handler(shop.count_signup).calls
        assert shop.bus.dlq.size() == 0
    assert [(c.redelivery, c.ok) for c in welcome] == [(0, True), (1, True)]
    assert welcome[0].message_id == welcome[1].message_id  # the very message, again
    assert [c.attempt for c in welcome] == [1, 1]  # a redelivery is not a retry
    assert welcome[1].started >= welcome[0].finished  # after the first run ended
    assert shop.emails == ["ada@example.org"]  # idempotent: the second run did nothing
    assert shop.signups == [1, 1, 1]  # not idempotent: times=2 -> three runs
    assert [c.redelivery for c in counted] == [0, 1, 2]


def test_fail_the_first_attempts_then_the_handler_succeeds(shop: Shop) -> None:
    with EventBusTestKit(shop.bus) as kit, TestClient(shop.app) as client:
        kit.fail(handler=shop.send_welcome, times=2)
        signup(client, 1)
        kit.drain()
        record = kit.handler(shop.send_welcome)
    calls = record.calls
    assert [(c.attempt, c.injected, c.ok) for c in calls] == [
        (1, True, False),
        (2, True, False),
        (3, False, True),
    ]
    assert all(isinstance(c.error, InjectedFault) for c in calls[:2])
    assert record.mock.call_count == 1  # the handler itself ran once
    assert shop.emails == ["ada@example.org"] and shop.signups == [1]


def test_fail_applies_to_every_delivery_of_the_handler(shop: Shop) -> None:
    with EventBusTestKit(shop.bus) as kit, TestClient(shop.app) as client:
        kit.fail(handler=shop.count_signup, times=1)
        signup(client, 1)
        signup(client, 2)
        kit.drain()
        calls = kit.handler(shop.count_signup).calls
    by_user = sorted((c.event.user_id, c.attempt, c.injected) for c in calls)  # type: ignore[attr-defined]
    assert by_user == [(1, 1, True), (1, 2, False), (2, 1, True), (2, 2, False)]
    assert sorted(shop.signups) == [1, 2]
    assert [c.ok for c in kit.handler(shop.send_welcome).calls] == [True, True]  # not its sibling


def test_fail_more_attempts_than_retries_dead_letters_the_event(shop: Shop) -> None:
    with EventBusTestKit(shop.bus, raise_errors=False) as kit, TestClient(shop.app) as client:
        kit.fail(shop.UserCreated, handler=shop.send_welcome, times=3)
        signup(client, 1)
        kit.drain()
        (record,) = shop.bus.dlq.peek()
    assert record.error_type == "InjectedFault" and record.attempts == 3
    assert kit.handler(shop.send_welcome).mock.call_count == 0
    assert shop.emails == []
    with EventBusTestKit(shop.bus) as kit, TestClient(shop.app) as client:  # raise by default
        kit.fail(handler=shop.send_welcome, times=3)
        signup(client, 1)
        with pytest.raises(InjectedFault, match="attempt 3 of the first 3"):
            kit.drain()


def test_fail_with_an_exception_type_meets_the_retry_policy() -> None:
    shop = make_shop(
        retry_policy=RetryPolicy(max_retries=3, delay=5.0, retryable_exceptions=(ConnectionError,))
    )
    with EventBusTestKit(shop.bus, raise_errors=False) as kit, TestClient(shop.app) as client:
        kit.fail(handler=shop.send_welcome, times=2, error=ConnectionError)
        kit.fail(handler=shop.count_signup, times=1, error=KeyError)  # not retryable
        signup(client, 1)
        kit.drain()
        welcome = kit.handler(shop.send_welcome).calls
        counted = kit.handler(shop.count_signup).calls
        (dead,) = shop.bus.dlq.peek()
    assert [c.ok for c in welcome] == [False, False, True]
    assert isinstance(welcome[0].error, ConnectionError)
    assert [c.ok for c in counted] == [False]
    assert dead.handler == kit.handler(shop.count_signup).name and dead.attempts == 1


def test_a_mock_side_effect_fails_the_attempt(shop: Shop) -> None:
    with EventBusTestKit(shop.bus, raise_errors=False) as kit, TestClient(shop.app) as client:
        mock = kit.handler(shop.count_signup).mock
        mock.side_effect = [ConnectionError("down"), None]
        signup(client, 1)
        kit.drain()
        calls = kit.handler(shop.count_signup).calls
    assert [c.ok for c in calls] == [False, True]
    assert isinstance(calls[0].error, InjectedFault)
    assert isinstance(calls[0].error.__cause__, ConnectionError)
    assert shop.signups == [1]


def test_delay_holds_the_delivery_back(shop: Shop) -> None:
    with EventBusTestKit(shop.bus) as kit, TestClient(shop.app) as client:
        kit.delay(shop.UserCreated, handler=shop.send_welcome, seconds=0.5)
        published = time.monotonic()
        signup(client, 1)
        assert shop.emails == []  # the endpoint answered; the delivery waits
        kit.drain()
        (welcome,) = kit.handler(shop.send_welcome).calls
        (counted,) = kit.handler(shop.count_signup).calls
    assert welcome.started - published >= 0.5
    assert counted.started - published < 0.5  # only send_welcome waited
    assert shop.emails == ["ada@example.org"]


def test_delay_holds_only_the_first_attempt_back(shop: Shop) -> None:
    with EventBusTestKit(shop.bus) as kit, TestClient(shop.app) as client:
        kit.delay(handler=shop.count_signup, seconds=0.3)
        kit.fail(handler=shop.count_signup, times=1)
        published = time.monotonic()
        signup(client, 1)
        kit.drain()
        first, second = kit.handler(shop.count_signup).calls
    assert first.started - published >= 0.3
    assert second.started - first.finished < 0.2  # the retry was not delayed again


def test_faults_apply_to_matching_events_only_and_clear(shop: Shop) -> None:
    with EventBusTestKit(shop.bus) as kit, TestClient(shop.app) as client:
        kit.deliver_twice(shop.WelcomeSent)
        signup(client, 1)
        kit.drain()
        assert shop.signups == [1] and shop.welcomed == [1, 1]
        kit.clear_faults()
        signup(client, 2)
        kit.drain()
        assert shop.signups == [1, 2] and shop.welcomed == [1, 1, 2]


# -- the pytest fixture ---------------------------------------------------------------------

FIXTURE_SHOP = make_shop(retry_policy=SLOW_RETRIES)
shop_kit = kit_fixture(FIXTURE_SHOP.bus)


@pytest.fixture
def fixture_client(shop_kit: EventBusTestKit) -> object:
    with TestClient(FIXTURE_SHOP.app) as client:
        yield client


def test_kit_fixture_wraps_the_test(shop_kit: EventBusTestKit, fixture_client: TestClient) -> None:
    signup(fixture_client, 9)
    shop_kit.drain()
    shop_kit.assert_published(FIXTURE_SHOP.UserCreated, user_id=9)
    assert not isinstance(FIXTURE_SHOP.bus.backend, RedisBackend)


def test_kit_fixture_restored_the_bus_after_the_previous_test() -> None:
    assert isinstance(FIXTURE_SHOP.bus.backend, RedisBackend)


# -- the docs page -----------------------------------------------------------------------

BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def test_the_testing_page_example_tests_pass(tmp_path: Path) -> None:
    """docs/testing.md's code blocks, in order, are one test module: run it with pytest."""
    page = (ROOT / "docs" / "testing.md").read_text()
    source = "\n\n".join(BLOCK.findall(page))
    tests = re.findall(r"^(?:async )?def (test_\w+)", source, re.MULTILINE)
    assert len(tests) >= 3
    (tmp_path / "test_testing_page.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_testing_page.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    passed = re.search(r"(\d+) passed", done.stdout)  # parametrized tests run more than once
    assert passed is not None and int(passed.group(1)) >= len(tests), done.stdout
