"""docs/kafka.md's table of what eventbus sets on its Kafka clients says what the code
does: the settings' defaults, the options the producer is built with, and aiokafka's
own defaults the page names."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import aiokafka
import pytest

from eventbus import EventBus, EventBusSettings
from eventbus.kafka import KafkaBackend
from eventbus.kafka.config import KafkaConfig
from eventbus.kafka.partitioner import Murmur2Partitioner

PAGE = Path(__file__).resolve().parent.parent / "docs" / "kafka.md"


def table() -> dict[str, tuple[str, str]]:
    """Option -> (eventbus's value, setting) from the page's client table."""
    text = PAGE.read_text()
    section = text[text.index("### What eventbus sets on its clients") :]
    section = section[: section.index("\n### ")]
    rows: dict[str, tuple[str, str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] in ("producer", "consumer", "bridge"):
            rows[cells[1].strip("`")] = (cells[2], cells[3])
    return rows


def first_number(text: str) -> float:
    return float(re.search(r"\d+(\.\d+)?", text).group())  # type: ignore[union-attr]


def test_the_table_matches_the_settings_defaults() -> None:
    rows = table()
    defaults = EventBusSettings()
    assert rows["acks"][0] == f"`{defaults.kafka_acks}`"
    assert rows["enable_idempotence"][0].startswith("`true`") == defaults.kafka_idempotence
    assert rows["auto_offset_reset"][0].startswith(f"`{defaults.kafka_auto_offset_reset}`")
    assert first_number(rows["session_timeout_ms"][0]) == defaults.kafka_session_timeout_ms
    assert first_number(rows["heartbeat_interval_ms"][0]) == defaults.kafka_heartbeat_interval_ms
    held = rows["records held per worker before fetching pauses"]
    assert first_number(held[0]) == defaults.kafka_max_in_flight
    revoke = rows["seconds a revoked partition's handlers get"]
    assert first_number(revoke[0]) == defaults.kafka_revoke_timeout
    assert f"({defaults.kafka_publish_timeout:g} s)" in rows["request_timeout_ms"][0]
    for option, (_, setting) in rows.items():
        for name in re.findall(r"EVENTBUS_[A-Z_]+", setting):
            assert name.removeprefix("EVENTBUS_").lower() in EventBusSettings.model_fields, option


async def test_the_producer_is_built_with_the_options_the_table_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built: dict[str, Any] = {}

    def producer(self: KafkaConfig, **options: Any) -> Any:
        built.update(options)
        raise RuntimeError("stop here: only the options are checked")

    monkeypatch.setattr(KafkaConfig, "producer", producer)
    backend = KafkaBackend("127.0.0.1:9")
    bus = EventBus(backend=backend)
    with pytest.raises(RuntimeError, match="stop here"):
        await bus.start()
    defaults = EventBusSettings()
    assert isinstance(built.pop("partitioner"), Murmur2Partitioner)
    assert "Murmur2Partitioner" in table()["partitioner"][0]
    assert built == {
        "acks": defaults.kafka_acks,
        "enable_idempotence": defaults.kafka_idempotence,
        "request_timeout_ms": int(defaults.kafka_publish_timeout * 1000),
    }


def test_aiokafka_defaults_the_page_names() -> None:
    row = table()["linger_ms`, `compression_type`, `max_request_size"]
    assert row[0] == "aiokafka's: 0, none, 1 MiB"
    params = inspect.signature(aiokafka.AIOKafkaProducer.__init__).parameters
    assert params["linger_ms"].default == 0
    assert params["compression_type"].default is None
    assert params["max_request_size"].default == 1024 * 1024


def test_idempotence_with_acks_other_than_all_is_refused_as_the_page_says() -> None:
    from eventbus.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError, match="idempotence needs acks=all"):
        KafkaBackend("127.0.0.1:9", acks=1)
    KafkaBackend("127.0.0.1:9", acks=1, idempotence=False)
