"""The backend contract: what the core asks of every backend, and nothing more."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker

from eventbus import ConfigurationError, EventBusSettings
from eventbus.backends import BACKENDS, create_backend
from eventbus.backends.base import Backend, CachedHooksBroker
from eventbus.health import HealthStatus

ROOT = Path(__file__).resolve().parents[1]


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
