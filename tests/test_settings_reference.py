"""The settings reference is generated from EventBusSettings and cannot drift; a
misspelt ``EVENTBUS_*`` variable is logged with the closest setting's name."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from eventbus import EventBusSettings
from eventbus.config import NOT_SETTINGS, TEST_PREFIX, setting_names, warn_unknown_variables
from eventbus.settings_reference import render

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "settings.md"
SCRIPT = Path(sys.executable).with_name("eventbus")
#: An environment variable named in a string or assigned in a shell line.
ENV_NAME = re.compile(r"""["'](EVENTBUS_[A-Z0-9_]+)["']|\b(EVENTBUS_[A-Z0-9_]+)=""")


def test_the_committed_reference_is_what_the_settings_generate() -> None:
    assert REFERENCE.read_text(encoding="utf-8") == render(), (
        "docs/settings.md is stale: run `eventbus settings -o docs/settings.md`"
    )


def test_the_command_prints_the_reference() -> None:
    done = subprocess.run(
        [str(SCRIPT), "settings"], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout == render()


def test_the_command_writes_the_reference_to_a_file(tmp_path: Path) -> None:
    target = tmp_path / "settings.md"
    subprocess.run(
        [str(SCRIPT), "settings", "-o", str(target)], capture_output=True, timeout=30, check=True
    )
    assert target.read_text(encoding="utf-8") == render()


def test_every_setting_has_a_description_and_a_row() -> None:
    page = render()
    for name, field in EventBusSettings.model_fields.items():
        assert field.description and len(field.description) > 10, name
        rows = [
            line for line in page.splitlines() if line.startswith(f"| `EVENTBUS_{name.upper()}`")
        ]
        assert len(rows) == 1, name
        assert field.description.split(".")[0] in rows[0]


@pytest.mark.parametrize(
    ("variable", "row"),
    [
        ("EVENTBUS_BACKEND", "| `EVENTBUS_BACKEND` | `sync` or `redis` or `kafka` | `sync` |"),
        ("EVENTBUS_MAX_RETRIES", "| `EVENTBUS_MAX_RETRIES` | int (≥ 0, ≤ 1000) | `3` |"),
        ("EVENTBUS_METRICS_PORT", "| `EVENTBUS_METRICS_PORT` | int (≥ 1, ≤ 65535) | unset |"),
        (
            "EVENTBUS_KAFKA_SASL_PASSWORD",
            "| `EVENTBUS_KAFKA_SASL_PASSWORD` | secret string | unset |",
        ),
        ("EVENTBUS_DLQ_ENABLED", "| `EVENTBUS_DLQ_ENABLED` | bool | `true` |"),
        ("EVENTBUS_WORKER_GC_FREEZE", "| `EVENTBUS_WORKER_GC_FREEZE` | bool | `false` |"),
        ("EVENTBUS_RETRY_DELAY", "| `EVENTBUS_RETRY_DELAY` | float (≥ 0, ≤ 604800) | `1` |"),
    ],
)
def test_rows_give_type_and_default_as_written_in_the_environment(variable: str, row: str) -> None:
    [line] = [line for line in render().splitlines() if line.startswith(f"| `{variable}`")]
    assert line.startswith(row)


def test_the_reference_documents_the_unknown_variable_warning_and_its_exceptions() -> None:
    page = render()
    assert "closest setting" in page
    for name in NOT_SETTINGS:
        assert f"`{name}`" in page


# -- unknown variables ------------------------------------------------------------------


def unique(prefix: str) -> str:
    """A variable name no other test (nor an earlier run in this process) used."""
    return f"{prefix}{uuid.uuid4().hex[:6].upper()}"


def test_a_misspelt_variable_is_warned_about_naming_the_closest_setting(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A fresh name per run: each is warned about once per process.
    typo = "EVENTBUS_REDIS_NAMESPCE_" + uuid.uuid4().hex[:2].upper()
    monkeypatch.setenv(typo, "tenant-a")

    with caplog.at_level(logging.WARNING, logger="eventbus.config"):
        settings = EventBusSettings()

    assert settings.redis_namespace == "eventbus"  # ignored, as the warning says
    [record] = [r for r in caplog.records if typo in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "did you mean EVENTBUS_REDIS_NAMESPACE?" in record.getMessage()


def test_the_warning_comes_once_per_variable_per_process(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = unique("EVENTBUS_MAX_RETRYS_"), unique("EVENTBUS_BACKND_")
    monkeypatch.setenv(first, "5")

    with caplog.at_level(logging.WARNING, logger="eventbus.config"):
        EventBusSettings()
        EventBusSettings()
        monkeypatch.setenv(second, "redis")
        EventBusSettings()
        EventBusSettings()

    messages = [r.getMessage() for r in caplog.records]
    assert sum(first in m for m in messages) == 1
    assert sum(second in m for m in messages) == 1
    assert any("did you mean EVENTBUS_BACKEND?" in m for m in messages)


def test_a_variable_like_no_setting_says_so() -> None:
    name = unique("EVENTBUS_ZZZZZZZZ")
    assert warn_unknown_variables({name: "1"}) == [name]
    assert warn_unknown_variables({name: "1"}) == []


def test_settings_and_other_variables_are_not_warned_about() -> None:
    environ = {name: "x" for name in setting_names()}
    environ |= {name: "x" for name in NOT_SETTINGS}
    environ |= {"eventbus_backend": "sync", "PATH": "/bin", "MY_EVENTBUS_THING": "1"}
    environ |= {TEST_PREFIX + "WORKER": "1"}

    assert warn_unknown_variables(environ) == []


def test_a_group_variable_is_checked_against_its_settings_once_loaded() -> None:
    import eventbus.outbox.outbox  # noqa: F401  (loads OutboxSettings)

    typo = unique("EVENTBUS_OUTBOX_DATABASE_UR_")
    assert warn_unknown_variables({"EVENTBUS_OUTBOX_DATABASE_URL": "x", typo: "x"}) == [typo]


def test_a_group_variable_is_not_warned_about_while_its_module_is_not_loaded() -> None:
    code = (
        "import sys, eventbus.config as c\n"
        "assert 'eventbus.outbox.outbox' not in sys.modules\n"
        "print(c.warn_unknown_variables({'EVENTBUS_OUTBOX_RELAY': 'false'}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout.strip() == "[]"


def test_every_eventbus_variable_the_project_uses_is_a_setting_or_allowed() -> None:
    """The test suites and benchmarks set no variable that would be warned about."""
    from eventbus.outbox.outbox import OutboxSettings

    known = set(setting_names()) | NOT_SETTINGS
    known |= {f"EVENTBUS_OUTBOX_{name.upper()}" for name in OutboxSettings.model_fields}
    used: dict[str, str] = {}
    files = [*(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").glob("*.py")]
    files += [ROOT / "Procfile", *(ROOT / "docs").glob("*.md"), ROOT / ".ci" / "run"]
    for path in files:
        if not path.exists() or path == Path(__file__):
            continue
        for match in ENV_NAME.finditer(path.read_text(encoding="utf-8")):
            used.setdefault(match.group(1) or match.group(2), str(path.relative_to(ROOT)))
    unknown = {
        name: where
        for name, where in used.items()
        if name not in known and not name.startswith(TEST_PREFIX)
    }
    assert unknown == {}
    assert "EVENTBUS_BACKEND" in used  # the scan finds what it looks for
