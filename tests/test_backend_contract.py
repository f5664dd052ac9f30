"""The backend contract: what the core asks of every backend, and nothing more."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker

from eventbus import ConfigurationError, EventBus, EventBusSettings, cli
from eventbus.backends import (
    BACKENDS,
    DEV_SERVERS,
    DevServer,
    StoresSubscriptions,
    create_backend,
    dev_server,
)
from eventbus.backends.base import Backend, CachedHooksBroker
from eventbus.health import HealthStatus

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "hunter2-s3cret"


class _Cached(CachedHooksBroker, StubBroker):
    pass


class _Broken(dramatiq.Middleware):
    def after_ack(self, broker: dramatiq.Broker, message: Any) -> None:
        raise RuntimeError("boom in after_ack")


def test_a_failing_hook_is_logged_with_the_middleware_that_failed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = _Cached(middleware=[_Broken()])
    message = dramatiq.Message(
        queue_name="q", actor_name="a", args=(), kwargs={}, options={}, message_id="m"
    )
    with caplog.at_level(logging.CRITICAL):
        broker.emit_after("ack", message)
    assert "after_ack of <tests.test_backend_contract._Broken" in caplog.text
    assert "boom in after_ack" in caplog.text


def test_every_configured_backend_kind_is_built_through_the_table() -> None:
    settings = EventBusSettings(backend="sync")
    backend = create_backend(settings)
    assert isinstance(backend, Backend)
    assert backend.name == "sync"
    assert set(BACKENDS) == {"sync", "redis", "kafka"}


def test_the_embedded_backend_refuses_to_feed_a_worker_process() -> None:
    backend = create_backend(EventBusSettings(backend="sync"))
    with pytest.raises(ConfigurationError, match="needs a shared backend"):
        backend.prepare_worker_process(lambda reason: None)


def test_an_embedded_bus_that_never_started_is_not_alive() -> None:
    backend = create_backend(EventBusSettings(backend="sync"))
    [result] = backend.liveness()
    assert result.status is HealthStatus.UNHEALTHY
    assert result.detail == "not started"


def test_hooks_bench_smoke_prints_its_row() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "hooks_bench.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "| 6 signals (enqueue, ack, nack) |" in done.stdout


# -- the dead-letter stores carry their audit trail ----------------------------------------


def test_the_kafka_store_carries_its_audit_trail_on_the_documented_topic() -> None:
    """Upgrading keeps the console's audit trail: the same topic as before (and as
    docs/console.md says), reached through the store, with no Kafka knowledge in
    the dead-letter core."""
    from eventbus.dlq.audit import audit_log_for
    from eventbus.kafka.audit import KafkaAuditLog
    from eventbus.kafka.config import KafkaConfig
    from eventbus.kafka.dlq import KafkaDeadLetterStore

    config = KafkaConfig("127.0.0.1:9")  # nothing connects: only built
    store = KafkaDeadLetterStore(config)
    audit = audit_log_for(store)

    assert isinstance(audit, KafkaAuditLog) and audit is store.audit
    assert audit.topic == "eventbus.dlq-audit"
    assert "the topic `eventbus.dlq-audit`" in (ROOT / "docs" / "console.md").read_text()
    other = KafkaAuditLog(config, topic="ops.audit")
    assert audit_log_for(KafkaDeadLetterStore(config, audit=other)) is other


# -- what the CLI asks of a backend ---------------------------------------------------------


def _backends() -> dict[str, Backend]:
    """One backend of each kind, built from settings (nothing connects)."""
    return {
        name: create_backend(
            EventBusSettings(
                backend=name,
                redis_url=f"redis://admin:{PASSWORD}@127.0.0.1:9/0",
                kafka_bootstrap_servers="127.0.0.1:9",
            )
        )
        for name in BACKENDS
    }


def test_only_a_backend_with_a_subscription_store_is_a_stores_subscriptions() -> None:
    kinds = {name: isinstance(b, StoresSubscriptions) for name, b in _backends().items()}
    assert kinds == {"sync": False, "redis": True, "kafka": False}


def test_subscriptions_list_on_a_backend_without_a_store_prints_where_they_live() -> None:
    for name, backend in _backends().items():
        if isinstance(backend, StoresSubscriptions):
            continue
        bus = EventBus(backend=backend, settings=EventBusSettings(backend=name))
        out, err = io.StringIO(), io.StringIO()

        code = cli.run(["subscriptions", "list"], bus, out, err)

        assert code == cli.EXIT_USAGE, name
        assert out.getvalue() == ""
        home = backend.subscriptions_home()
        assert err.getvalue() == (
            f"eventbus: the {name} backend stores no subscriptions to act on: {home}\n"
        )
    assert "consumer group" in _backends()["kafka"].subscriptions_home()


def test_dlq_commands_are_refused_only_where_dead_letters_stay_in_the_app(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    refusals = {name: b.dead_letters_out_of_reach() for name, b in _backends().items()}
    assert refusals["redis"] is None and refusals["kafka"] is None
    assert refusals["sync"] is not None and "dlq_router()" in refusals["sync"]
    monkeypatch.setenv("EVENTBUS_BACKEND", "sync")

    assert cli.main(["dlq", "list"]) == cli.EXIT_USAGE

    assert capsys.readouterr().err == f"eventbus: {refusals['sync']}\n"


def test_a_backend_names_its_server_without_secrets_and_knows_its_connection_errors() -> None:
    import aiokafka.errors
    import redis

    backends = _backends()
    assert backends["redis"].address() == "redis://admin:***@127.0.0.1:9/0"
    assert backends["kafka"].address() == "127.0.0.1:9"
    own = {
        "redis": redis.ConnectionError("refused"),
        "kafka": aiokafka.errors.KafkaConnectionError("refused"),
    }
    for name, backend in backends.items():
        assert backend.unreachable(ConnectionRefusedError()), name
        assert not backend.unreachable(ValueError("bad input")), name
        for kind, error in own.items():
            assert backend.unreachable(error) is (kind == name), (name, kind)


def test_the_dev_server_table_gives_what_eventbus_dev_runs() -> None:
    assert set(DEV_SERVERS) == {"kafka"}
    server = dev_server("kafka")
    assert isinstance(server, DevServer)
    assert (server.host, server.port) == ("127.0.0.1", 9092)
    assert "Tansu" in server.summary and "kafka-dev" in server.details
    with pytest.raises(ConfigurationError, match="no local server 'rabbitmq'"):
        dev_server("rabbitmq")
    dev = cli._parser().parse_args(["dev", "kafka", "--port", "19092"])
    assert (dev.action, dev.host, dev.port) == ("kafka", "127.0.0.1", 19092)


#: Python code that runs ``eventbus ARGV`` with the package ``BLOCKED`` unimportable.
WITHOUT = """
import importlib.abc, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Blocker())
from eventbus.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def test_the_cli_works_without_the_kafka_extra() -> None:
    """With only the redis extra installed, every command still runs; ``dev kafka``
    names the extra it needs."""

    def eventbus(*argv: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")}
        env["EVENTBUS_BACKEND"] = "sync"
        return subprocess.run(
            [sys.executable, "-c", "BLOCKED = 'aiokafka'\n" + WITHOUT, *argv],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    usage = eventbus("--help")
    assert usage.returncode == 0, usage.stderr
    assert "dlq" in usage.stdout and "dev" in usage.stdout
    refused = eventbus("dlq", "list")
    assert refused.returncode == 2, refused.stderr
    assert "keeps dead letters in the application's memory" in refused.stderr
    dev = eventbus("dev", "kafka")
    assert dev.returncode == 2, dev.stderr
    assert 'pip install "fastapi-eventbus[kafka]"' in dev.stderr
    assert len(dev.stderr.splitlines()) == 1
