"""Kafka settings, client options and event keys (no broker needed)."""

from __future__ import annotations

import ssl

import pytest

from eventbus import BaseEvent, EventBus, EventBusSettings
from eventbus.bus import create_backend
from eventbus.exceptions import ConfigurationError
from eventbus.kafka.backend import KafkaBackend
from eventbus.kafka.config import KafkaConfig, format_traceparent, parse_traceparent


class OrderPaid(BaseEvent):
    __partition_key__ = "order_id"
    topic: str = "order.paid"
    order_id: int


def test_partition_key_defaults_to_the_event_id_or_names_a_field() -> None:
    event = BaseEvent(topic="x")
    assert event.partition_key() == event.event_id
    assert OrderPaid(order_id=42).partition_key() == "42"


def test_settings_build_a_kafka_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTBUS_BACKEND", "kafka")
    monkeypatch.setenv("EVENTBUS_KAFKA_BOOTSTRAP_SERVERS", "k1:9093,k2:9093")
    monkeypatch.setenv("EVENTBUS_KAFKA_GROUP_ID", "orders")
    monkeypatch.setenv("EVENTBUS_KAFKA_SESSION_TIMEOUT_MS", "6000")
    monkeypatch.delenv("EVENTBUS_CONSUME", raising=False)
    backend = create_backend(EventBusSettings())
    assert isinstance(backend, KafkaBackend)
    assert backend.config.bootstrap_servers == "k1:9093,k2:9093"
    assert (backend.group_id, backend.session_timeout_ms) == ("orders", 6000)
    assert backend.acks == "all" and backend.auto_offset_reset == "earliest"
    bus = EventBus()
    assert isinstance(bus.backend, KafkaBackend)
    assert not bus.consumes  # a web process only publishes unless EVENTBUS_CONSUME=true
    monkeypatch.setenv("EVENTBUS_CONSUME", "true")
    assert EventBus().consumes


def test_auto_commit_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="enable_auto_commit"):
        KafkaBackend("localhost:9092", "g", enable_auto_commit=True)


def test_sasl_needs_a_mechanism_and_credentials() -> None:
    with pytest.raises(ConfigurationError, match="SASL_MECHANISM"):
        KafkaConfig("k:9092", security_protocol="SASL_SSL")
    with pytest.raises(ConfigurationError, match="USERNAME"):
        KafkaConfig("k:9092", security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN")
    with pytest.raises(ConfigurationError, match="SECURITY_PROTOCOL"):
        KafkaConfig("k:9092", security_protocol="TLS")


async def test_tls_and_sasl_reach_the_producer_the_consumer_and_the_admin_client() -> None:
    context = ssl.create_default_context()
    config = KafkaConfig(
        "k:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="orders",
        sasl_password="s3cret",
        ssl_context=context,
    )
    clients = [config.producer().client, config.consumer()._client, config.admin()._client]
    for client in clients:
        assert client._security_protocol == "SASL_SSL"
        assert client._ssl_context is context
        assert client._sasl_mechanism == "SCRAM-SHA-512"
        assert client._sasl_plain_username == "orders"
        assert client._sasl_plain_password == "s3cret"
        assert client._bootstrap_servers == "k:9093"


def test_settings_carry_tls_and_sasl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTBUS_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("EVENTBUS_KAFKA_SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("EVENTBUS_KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("EVENTBUS_KAFKA_SASL_PASSWORD", "pw")
    settings = EventBusSettings()
    assert "pw" not in repr(settings)
    options = KafkaConfig.from_settings(settings).client_options()
    assert options["sasl_plain_username"] == "svc" and options["sasl_plain_password"] == "pw"
    assert options["security_protocol"] == "SASL_PLAINTEXT" and "ssl_context" not in options


def test_traceparent_round_trip() -> None:
    header = format_traceparent("a" * 32, "b" * 16)
    assert header == f"00-{'a' * 32}-{'b' * 16}-01"
    assert parse_traceparent(header) == ("a" * 32, "b" * 16)
    assert format_traceparent("", "b" * 16) is None
    assert parse_traceparent("garbage") is None


def test_producer_idempotence_is_on_by_default_and_a_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert EventBusSettings().kafka_idempotence is True
    assert KafkaBackend("k:9092").idempotence is True
    monkeypatch.setenv("EVENTBUS_KAFKA_IDEMPOTENCE", "false")
    backend = KafkaBackend.from_settings(EventBusSettings())
    assert backend.idempotence is False
    assert KafkaBackend("k:9092", acks=1, idempotence=False).acks == 1
    with pytest.raises(ConfigurationError, match="EVENTBUS_KAFKA_IDEMPOTENCE"):
        KafkaBackend("k:9092", acks=1)  # idempotence needs acks=all
