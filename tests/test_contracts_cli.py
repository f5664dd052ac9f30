"""``eventbus schema snapshot|check`` as a CI job runs them: real subprocesses on
small codebases written to temporary directories (a publisher's versions and a
subscriber built from different code)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

#: The console script installed with the package, next to this interpreter.
SCRIPT = Path(sys.executable).with_name("eventbus")

V1 = """
    from eventbus import BaseEvent

    class OrderPlaced(BaseEvent):
        topic: str = "order.placed"
        order_id: int
        email: str
"""
RENAMED = V1.replace("email: str", "email_address: str")
WITH_OPTIONAL = V1 + "        coupon: str | None = None\n"
SUBSCRIBER = """
    from eventbus import BaseEvent, on_event

    class OrderPlaced(BaseEvent):  # the subscriber's own copy: it reads order_id only
        topic: str = "order.placed"
        order_id: int

    @on_event(OrderPlaced)
    def ship(event: OrderPlaced) -> None:
        pass
"""
EVENT = "order.placed:OrderPlaced"


def write_code(root: Path, source: str, package: str = "shop") -> Path:
    """``root/<package>/events.py`` holding ``source``; returns ``root``."""
    (root / package).mkdir(parents=True, exist_ok=True)
    (root / package / "__init__.py").write_text("")
    (root / package / "events.py").write_text(textwrap.dedent(source))
    return root


def eventbus(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")}
    return subprocess.run(
        [str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def committed(tmp_path: Path) -> Path:
    """A publisher at version 1 with its snapshot committed as contracts.json."""
    code = write_code(tmp_path / "v1", V1)
    done = eventbus(code, "schema", "snapshot", "shop.events", "-o", "contracts.json")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "1 event type(s) written to contracts.json\n"
    return code / "contracts.json"


def test_the_snapshot_names_each_event_with_topic_schema_and_hash(committed: Path) -> None:
    document = json.loads(committed.read_text())
    entry = document["events"][EVENT]
    assert entry["topic"] == "order.placed"
    assert entry["class"] == "shop.events.OrderPlaced"
    assert set(entry["schema"]["properties"]) == {"order_id", "email"}
    assert len(entry["hash"]) == 16


def test_unchanged_code_passes(committed: Path) -> None:
    done = eventbus(committed.parent, "schema", "check", "shop.events")
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == "compatible: 1 event type(s) against contracts.json (mode full)\n"


def test_a_renamed_field_fails_with_one_line_naming_event_field_and_change(
    committed: Path, tmp_path: Path
) -> None:
    code = write_code(tmp_path / "v2", RENAMED)
    done = eventbus(code, "schema", "check", "shop.events", "--snapshot", str(committed))
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines() == [
        f"{EVENT}: email_address: new required field without a default (renamed from 'email'?)",
        f"{EVENT}: email: field removed while the reader requires it (renamed to 'email_address'?)",
    ]
    forward = eventbus(
        code, "schema", "check", "shop.events", "--snapshot", str(committed), "--mode", "forward"
    )
    assert forward.returncode == 1
    assert forward.stdout.splitlines() == [done.stdout.splitlines()[1]]


def test_a_new_optional_field_passes(committed: Path, tmp_path: Path) -> None:
    code = write_code(tmp_path / "v2", WITH_OPTIONAL)
    done = eventbus(code, "schema", "check", "shop.events", "--snapshot", str(committed))
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith("compatible: 1 event type(s)")


def test_a_rewritten_snapshot_keeps_history_for_the_transitive_modes(
    committed: Path, tmp_path: Path
) -> None:
    # v2 drops email (compatible backward); v3 brings it back as an int with a default.
    v2 = write_code(tmp_path / "v2", V1.replace("        email: str\n", ""))
    v3 = write_code(tmp_path / "v3", V1.replace("email: str", "email: int = 0"))
    snap = str(committed)
    assert (
        eventbus(
            v2, "schema", "check", "shop.events", "--snapshot", snap, "--mode", "backward"
        ).returncode
        == 0
    )
    assert eventbus(v2, "schema", "snapshot", "shop.events", "-o", snap).returncode == 0
    history = json.loads(committed.read_text())["events"][EVENT]["history"]
    assert [set(h["schema"]["properties"]) for h in history] == [{"order_id", "email"}]
    plain = eventbus(v3, "schema", "check", "shop.events", "--snapshot", snap, "--mode", "backward")
    assert plain.returncode == 0, plain.stdout
    transitive = eventbus(
        v3, "schema", "check", "shop.events", "--snapshot", snap, "--mode", "backward_transitive"
    )
    assert transitive.returncode == 1
    assert transitive.stdout.splitlines() == [
        f"{EVENT}: email: type changed: string -> integer (snapshot history entry 1, version 1)"
    ]


def test_against_another_service_in_its_role(committed: Path, tmp_path: Path) -> None:
    subscriber = write_code(tmp_path / "subscriber", SUBSCRIBER, package="shipping")
    done = eventbus(subscriber, "schema", "snapshot", "shipping.events", "-o", "contracts.json")
    assert done.returncode == 0, done.stderr
    theirs = str(subscriber / "contracts.json")
    # The publisher renames email: the subscriber never read it.
    renamed = write_code(tmp_path / "v2", RENAMED)
    ok = eventbus(
        renamed, "schema", "check", "shop.events", "--against", theirs, "--role", "subscriber"
    )
    assert (ok.returncode, ok.stdout) == (
        0,
        f"compatible: 1 event type(s) against {theirs} (as subscriber)\n",
    )
    # The publisher renames order_id: the subscriber requires it.
    broken = write_code(tmp_path / "v3", V1.replace("order_id: int", "order_ref: int"))
    done = eventbus(
        broken, "schema", "check", "shop.events", "--against", theirs, "--role", "subscriber"
    )
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        f"{EVENT}: order_id: field removed while the reader requires it (renamed to 'order_ref'?)"
    ]
    # Seen from the subscriber, with the publisher's snapshot: the same break.
    publisher = str(broken / "contracts.json")
    assert eventbus(broken, "schema", "snapshot", "shop.events", "-o", publisher).returncode == 0
    seen = eventbus(
        subscriber,
        "schema",
        "check",
        "shipping.events",
        "--against",
        publisher,
        "--role",
        "publisher",
    )
    assert seen.returncode == 1
    assert seen.stdout.splitlines() == [
        f"{EVENT}: order_id: new required field without a default (renamed from 'order_ref'?)"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--snapshot", "missing.json"], "eventbus: cannot read missing.json: [Errno 2]"),
        (["--snapshot", "garbage.json"], "eventbus: garbage.json is not"),
        (["--snapshot", "other.json"], "eventbus: other.json is not a contract snapshot"),
        (["--against", "missing.json"], "eventbus: cannot read missing.json"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(
    committed: Path, args: list[str], message: str
) -> None:
    code = committed.parent
    (code / "garbage.json").write_text("{not json: [")
    (code / "other.json").write_text('{"name": "something else"}')
    done = eventbus(code, "schema", "check", "shop.events", *args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith(message), done.stderr
    assert len(done.stderr.splitlines()) == 1


def test_modules_that_do_not_import_or_define_no_events_exit_2(committed: Path) -> None:
    code = committed.parent
    done = eventbus(code, "schema", "check", "shop.nowhere")
    assert done.returncode == 2
    assert done.stderr == (
        "eventbus: cannot import module 'shop.nowhere': "
        "ModuleNotFoundError: No module named 'shop.nowhere'\n"
    )
    (code / "empty.py").write_text("x = 1\n")
    done = eventbus(code, "schema", "snapshot", "empty")
    assert (done.returncode, done.stderr) == (2, "eventbus: no event classes found in empty\n")
    done = eventbus(code, "schema", "check", "shop.events", "--mode", "sideways")
    assert done.returncode == 2
    assert "invalid choice: 'sideways'" in done.stderr


SERVICE_TEST = """
    from eventbus.contracts import assert_compatible

    def test_events_stay_compatible():
        assert_compatible("shop.events", "contracts.json", mode="full")
"""


def test_assert_compatible_in_a_services_own_pytest_run(committed: Path, tmp_path: Path) -> None:
    def pytest_in(code: Path) -> subprocess.CompletedProcess[str]:
        (code / "test_contracts.py").write_text(textwrap.dedent(SERVICE_TEST))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTBUS_", "PYTEST_"))}
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_contracts.py"],
            cwd=code,
            env={**env, "PYTHONPATH": str(code)},
            capture_output=True,
            text=True,
            timeout=60,
        )

    passing = pytest_in(committed.parent)
    assert passing.returncode == 0, passing.stdout + passing.stderr
    renamed = write_code(tmp_path / "v2", RENAMED)
    (renamed / "contracts.json").write_text(committed.read_text())
    failing = pytest_in(renamed)
    assert failing.returncode == 1
    assert (
        f"{EVENT}: email: field removed while the reader requires it "
        "(renamed to 'email_address'?)" in failing.stdout
    )
    assert "2 breaking change(s) against contracts.json (mode full)" in failing.stdout
