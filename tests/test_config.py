"""Settings from the environment, with errors that name the variable."""

from __future__ import annotations

import pytest

from eventbus import ConfigurationError, EventBus, EventBusSettings


def test_defaults_match_the_seed_table_except_dlq_enabled() -> None:
    settings = EventBusSettings()
    assert settings.backend == "sync"
    assert settings.max_retries == 3
    assert settings.retry_delay == 1.0
    assert settings.retry_backoff_factor == 2.0
    assert settings.retry_max_delay == 60.0
    assert settings.dlq_enabled is True  # the seed said false: nothing is dropped silently
    assert settings.dlq_topic_suffix == ".dlq"
    assert settings.redis_url == "redis://localhost:6379/0"
    assert settings.redis_max_connections == 10
    assert settings.kafka_bootstrap_servers == "localhost:9092"
    assert settings.kafka_group_id is None  # the service name: services never share a group


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTBUS_MAX_RETRIES", "5")
    monkeypatch.setenv("EVENTBUS_DLQ_ENABLED", "false")
    settings = EventBusSettings()
    assert settings.max_retries == 5
    assert settings.dlq_enabled is False


def test_invalid_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTBUS_MAX_RETRIES", "many")
    with pytest.raises(ConfigurationError, match="EVENTBUS_MAX_RETRIES"):
        EventBusSettings()


def test_unknown_backend_fails_at_construction() -> None:
    with pytest.raises(ConfigurationError, match="EVENTBUS_BACKEND"):
        EventBusSettings(backend="rabbit")


def test_negative_retry_delay_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="EVENTBUS_RETRY_DELAY"):
        EventBusSettings(retry_delay=-1)


def test_seed_code_configuration_example() -> None:
    settings = EventBusSettings(
        backend="redis",
        redis_url="redis://my-redis:6379/1",
        max_retries=5,
        dlq_enabled=True,
    )
    assert settings.backend == "redis"
    assert settings.redis_url == "redis://my-redis:6379/1"


def test_bus_policy_comes_from_settings() -> None:
    bus = EventBus(settings=EventBusSettings(max_retries=7, retry_delay=0.5))
    assert bus.retry_policy.max_retries == 7
    assert bus.retry_policy.delay == 0.5
