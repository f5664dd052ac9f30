"""The top-level API: small, complete for an application, and kind to old imports."""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import pytest

import eventbus


def test_the_top_level_names_an_application_needs_and_no_more() -> None:
    assert len(eventbus.__all__) <= 27
    # defined in the module itself, not produced by the lazy fallback
    assert set(eventbus.__all__) <= set(vars(eventbus))
    # what a FastAPI app with durable delivery uses every day
    for name in (
        "BaseEvent",
        "EventBus",
        "on_event",
        "create_lifespan",
        "get_event_bus",
        "EventBusMiddleware",
        "health_router",
        "dlq_router",
        "RetryPolicy",
        "PublishError",
        "FailedEvent",
        "CorrelationIdFilter",
    ):
        assert name in eventbus.__all__


@pytest.mark.parametrize("name", sorted(eventbus._MOVED))
def test_a_moved_name_still_imports_with_a_warning_naming_its_home(name: str) -> None:
    module = eventbus._MOVED[name][0]
    with pytest.warns(DeprecationWarning, match=f"import it from {module}"):
        value = getattr(eventbus, name)
    assert value is getattr(importlib.import_module(module), name)


def test_backends_import_from_the_top_level_without_a_warning() -> None:
    from eventbus.kafka.backend import KafkaBackend
    from eventbus.redis.backend import RedisBackend

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert eventbus.RedisBackend is RedisBackend
        assert eventbus.KafkaBackend is KafkaBackend


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = eventbus.Nope  # type: ignore[attr-defined]


def test_a_misspelled_top_level_name_is_a_type_error(tmp_path: Path) -> None:
    from mypy import api

    source = tmp_path / "app.py"
    source.write_text(
        "from eventbus import EvnetBus\n"
        "from eventbus import RedisBackend\n"
        "reveal_type(RedisBackend)\n"
    )
    out, _, status = api.run([str(source), "--strict", "--no-error-summary"])
    assert status == 1
    assert 'Module "eventbus" has no attribute "EvnetBus"' in out
    # the lazily imported backends keep their real type, not Any
    assert "eventbus.redis.backend.RedisBackend" in out
