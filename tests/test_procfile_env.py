"""The Procfile without ``EVENTBUS_BACKEND``: the worker stops with one line naming
what is missing, the allowed values and where to set them (no traceback), and
honcho exits non-zero.  ``.env.example`` copied to ``.env`` is what makes it run:
every variable in it is a setting, and honcho started with it brings the worker up."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import redis

pytest.register_assert_rewrite("tests.redis_support")
from tests.redis_support import ROOT, free_port, wait_until  # noqa: E402
from tests.test_procfile import HONCHO, stop  # noqa: E402

pytest_plugins = ["tests.redis_support"]
pytestmark = pytest.mark.timeout(120)

EXAMPLE = ROOT / ".env.example"


def clean_env(port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")}
    return env | {
        "PATH": f"{HONCHO.parent}{os.pathsep}{env.get('PATH', '')}",
        "PORT": str(port),
        "PYTHONUNBUFFERED": "1",
    }


def test_a_worker_without_eventbus_backend_says_so_in_one_line_and_exits_non_zero() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dramatiq", "eventbus.actors", "examples.app", "-p", "1"],
        cwd=ROOT,
        env=clean_env(free_port()),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    [line] = [ln for ln in output.splitlines() if "eventbus worker cannot start" in ln]
    assert "EVENTBUS_BACKEND is not set" in line
    assert "EVENTBUS_BACKEND=redis" in line and "EVENTBUS_BACKEND=kafka" in line
    assert ".env" in line and "environment" in line


def test_honcho_without_eventbus_backend_stops_with_that_line(tmp_path: Path) -> None:
    # an empty env file: whatever .env a developer has in the work tree is not read
    empty = tmp_path / "empty.env"
    empty.write_text("")
    done = subprocess.run(
        [str(HONCHO), "start", "--no-colour", "-e", str(empty), "-d", str(ROOT)],
        cwd=ROOT,
        env=clean_env(free_port()),
        capture_output=True,
        text=True,
        timeout=90,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "Traceback" not in output, output
    assert "EVENTBUS_BACKEND is not set" in output


def test_every_variable_of_env_example_is_a_setting() -> None:
    from eventbus.config import EventBusSettings

    names = re.findall(r"^#? ?(EVENTBUS_[A-Z0-9_]+)=", EXAMPLE.read_text(), re.MULTILINE)
    assert "EVENTBUS_BACKEND" in names
    fields = {f"EVENTBUS_{name.upper()}" for name in EventBusSettings.model_fields}
    assert set(names) <= fields


def test_honcho_with_env_example_as_env_runs_the_worker(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    text = EXAMPLE.read_text()
    text = re.sub(r"^EVENTBUS_REDIS_URL=.*$", f"EVENTBUS_REDIS_URL={redis_url}", text, flags=re.M)
    text = re.sub(
        r"^EVENTBUS_REDIS_NAMESPACE=.*$", f"EVENTBUS_REDIS_NAMESPACE={namespace}", text, flags=re.M
    )
    env_file = tmp_path / ".env"
    env_file.write_text(text)
    log = tmp_path / "honcho.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(HONCHO), "start", "--no-colour", "-e", str(env_file), "-d", str(ROOT)],
            cwd=ROOT,
            env=clean_env(free_port()),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    client = redis.Redis.from_url(redis_url)
    try:
        wait_until(
            lambda: bool(client.hkeys(f"{namespace}:workers")) or process.poll() is not None,
            40,
            "the worker to register",
        )
        assert process.poll() is None, log.read_text(errors="replace")
        assert client.hkeys(f"{namespace}:workers")
    finally:
        client.close()
        stop(process)
