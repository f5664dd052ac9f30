"""The three-service walkthrough of docs/services.md runs as written, on Redis and on
Kafka (Tansu): its files are taken from the page (and are those of
examples/services/), written to a directory per codebase and run unchanged as real
processes: ``shop`` (uvicorn) publishes, ``mailer`` and ``billing`` (``dramatiq
eventbus.actors``, each from its own directory and ``EVENTBUS_SERVICE``) handle.
Every order reaches each of mailer and billing exactly once; billing's failure is
dead-lettered for billing only, and ``eventbus dlq replay`` of it charges the order
without a second confirmation from mailer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

pytest.register_assert_rewrite("tests.redis_support")
from tests.kafka_helpers import TansuBroker, committed_offsets, create_topic  # noqa: E402
from tests.redis_support import ROOT, free_port, wait_settled, wait_until  # noqa: E402

pytest_plugins = ["tests.redis_support"]
pytestmark = pytest.mark.timeout(150)

PAGE = ROOT / "docs" / "services.md"
EXAMPLES = ROOT / "examples" / "services"
#: A file of the walkthrough: ```py title="<codebase>/<package>/<file>.py"
FILE = re.compile(r'^```py title="([^"]+)"\n(.*?)^```', re.MULTILINE | re.DOTALL)
SERVICES = ("shop", "mailer", "billing")
TOPIC = "order.placed"
#: Seconds processes get to start, and events to be handled.
WITHIN = 40.0
CONFIRMED = re.compile(r"\[mailer\.handlers\] \[INFO\] confirmation of order (\d+) sent to (\S+)")
CHARGED = re.compile(r"\[billing\.handlers\] \[INFO\] order (\d+) charged (\d+) cents")


def page_files() -> dict[str, str]:
    """The walkthrough's files as the page shows them, by path."""
    return {m.group(1): m.group(2) for m in FILE.finditer(PAGE.read_text())}


def write_codebases(root: Path) -> None:
    """The page's files under ``root``, one directory per codebase (plus the empty
    ``__init__.py`` of each package the page mentions)."""
    for path, text in page_files().items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        (target.parent / "__init__.py").touch()


def test_the_page_shows_every_file_of_examples_services() -> None:
    on_disk = {
        str(p.relative_to(EXAMPLES)): p.read_text()
        for p in sorted(EXAMPLES.rglob("*.py"))
        if "__pycache__" not in p.parts
    }
    shown = page_files()
    assert set(shown) == {path for path, text in on_disk.items() if text}
    assert all(on_disk[path] == text for path, text in shown.items())
    assert all(not text for path, text in on_disk.items() if path not in shown)
    assert {path.split("/")[0] for path in shown} == set(SERVICES)


class Processes:
    """The walkthrough's processes, each in its own process group, logs in files."""

    def __init__(self, root: Path, logs: Path, env: dict[str, str]) -> None:
        self.root = root
        self.logs = logs
        self.env = env
        self.started: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, service: str, command: list[str], **extra: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")}
        env.pop("PYTHONPATH", None)  # each codebase runs from its own directory only
        env |= {**self.env, "EVENTBUS_SERVICE": service, "PYTHONUNBUFFERED": "1", **extra}
        with (self.logs / f"{service}.log").open("ab") as out:
            self.started[service] = subprocess.Popen(
                command,
                cwd=self.root / service,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def worker(self, service: str, **extra: str) -> None:
        command = [sys.executable, "-m", "dramatiq", "eventbus.actors", f"{service}.handlers"]
        self.start(service, [*command, "--processes", "1", "--threads", "2"], **extra)

    def log(self, service: str) -> str:
        path = self.logs / f"{service}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def check_alive(self) -> None:
        for service, process in self.started.items():
            if process.poll() is not None:
                raise AssertionError(f"{service} exited:\n{self.log(service)}")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.cli_in("", *args)

    def cli_in(self, service: str, *args: str) -> subprocess.CompletedProcess[str]:
        """``eventbus ARGS`` in ``service``'s directory, as that service (or the root)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")}
        env.pop("PYTHONPATH", None)
        env |= self.env | ({"EVENTBUS_SERVICE": service} if service else {})
        return subprocess.run(
            [sys.executable, "-m", "eventbus.cli", *args],
            cwd=self.root / service,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def stop_all(self) -> None:
        for process in self.started.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.started.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(20)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def confirmed(run: Processes) -> Counter[int]:
    return Counter(int(m.group(1)) for m in CONFIRMED.finditer(run.log("mailer")))


def charged(run: Processes) -> Counter[int]:
    return Counter(int(m.group(1)) for m in CHARGED.finditer(run.log("billing")))


def wait_for(run: Processes, condition: Callable[[], bool], what: str) -> None:
    def ready() -> bool:
        run.check_alive()
        return condition()

    try:
        wait_until(ready, WITHIN, what)
    except AssertionError as exc:
        logs = "\n".join(f"--- {s}\n{run.log(s)[-3000:]}" for s in SERVICES)
        raise AssertionError(f"{exc}\n{logs}") from None


def order(n: int) -> dict[str, object]:
    return {"order_id": n, "email": f"customer{n}@example.com", "total_cents": 100 * n}


def walkthrough(run: Processes, outage: Path, settled: Callable[[int], None]) -> dict[str, object]:
    """The page's steps; returns billing's dead letter (replayed)."""
    port = free_port()
    if run.env["EVENTBUS_BACKEND"] == "redis":  # the release step of each service
        for service in ("mailer", "billing"):
            synced = run.cli_in(service, "subscriptions", "sync", f"{service}.handlers")
            assert synced.returncode == 0, synced.stdout + synced.stderr
    run.worker("mailer")
    run.worker("billing", BILLING_OUTAGE_FILE=str(outage))
    run.start("shop", [sys.executable, "-m", "uvicorn", "shop.app:app", "--port", str(port)])
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/docs", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(run, up, "shop's web process")
    with httpx.Client(base_url=base, timeout=10) as client:
        for n in range(1, 6):
            client.post("/orders", json=order(n)).raise_for_status()
        wait_for(run, lambda: set(confirmed(run)) == set(range(1, 6)), "mailer's confirmations")
        wait_for(run, lambda: set(charged(run)) == set(range(1, 6)), "billing's charges")
        # the fields arrived, validated into mailer's own copy of the class
        sent = {(int(m.group(1)), m.group(2)) for m in CONFIRMED.finditer(run.log("mailer"))}
        assert sent == {(n, f"customer{n}@example.com") for n in range(1, 6)}

        outage.touch()  # the payment provider is down
        client.post("/orders", json=order(6)).raise_for_status()
        wait_for(run, lambda: 6 in confirmed(run), "mailer's confirmation of order 6")

    def dead_letters() -> list[dict[str, object]]:
        done = run.cli("dlq", "list", "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        return list(json.loads(done.stdout)["items"])

    wait_for(run, lambda: len(dead_letters()) == 1, "billing's dead letter")
    [record] = dead_letters()
    assert record["handler"] == "billing.charge"
    assert "payment provider down: order 6 not charged" in str(record["error"])
    assert 6 not in charged(run)

    outage.unlink()  # the provider is back
    replayed = run.cli("dlq", "replay", str(record["id"]))
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    wait_for(run, lambda: 6 in charged(run), "billing's replayed charge")
    settled(6)
    # Every order once in each service: the replay reached billing only.
    assert confirmed(run) == Counter(range(1, 7))
    assert charged(run) == Counter(range(1, 7))
    assert dead_letters() == []
    return record


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], Processes]]:
    started: list[Processes] = []

    def factory(env: dict[str, str]) -> Processes:
        root = tmp_path / "services"
        write_codebases(root)
        logs = tmp_path / "logs"
        logs.mkdir()
        run = Processes(root, logs, env)
        started.append(run)
        return run

    yield factory
    for run in started:
        run.stop_all()


def test_the_walkthrough_runs_on_redis(
    redis_url: str,
    namespace: str,
    tmp_path: Path,
    processes: Callable[[dict[str, str]], Processes],
) -> None:
    run = processes(
        {
            "EVENTBUS_BACKEND": "redis",
            "EVENTBUS_REDIS_URL": redis_url,
            # the test's own namespace and fast retries: deployment settings, not code
            "EVENTBUS_REDIS_NAMESPACE": namespace,
            "EVENTBUS_RETRY_DELAY": "0.05",
            "EVENTBUS_RETRY_MAX_DELAY": "0.2",
        }
    )
    record = walkthrough(
        run, tmp_path / "payments.down", lambda _: wait_settled(redis_url, namespace)
    )
    listed = run.cli("subscriptions", "list", "--json")
    rows = {(r["service"], r["topic"], r["handler"]) for r in json.loads(listed.stdout)}
    assert rows == {("mailer", TOPIC, "mailer.confirm"), ("billing", TOPIC, "billing.charge")}
    assert record["queue"] == "billing.eventbus"  # billing's queue: the replay's target


def test_the_walkthrough_runs_on_kafka(
    tmp_path: Path, processes: Callable[[dict[str, str]], Processes]
) -> None:
    broker = TansuBroker.start()  # a broker of its own: the page's names are fixed
    try:
        asyncio.run(create_topic(broker.bootstrap, TOPIC, 3))
        run = processes(
            {
                "EVENTBUS_BACKEND": "kafka",
                "EVENTBUS_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
                "EVENTBUS_KAFKA_IDEMPOTENCE": "false",  # Tansu (see docs/kafka.md)
                "EVENTBUS_KAFKA_AUTO_OFFSET_RESET": "earliest",
                "EVENTBUS_KAFKA_SESSION_TIMEOUT_MS": "6000",
                "EVENTBUS_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
                "EVENTBUS_RETRY_DELAY": "0.05",
                "EVENTBUS_RETRY_MAX_DELAY": "0.2",
            }
        )

        def settled(records: int) -> None:
            # both groups committed every record (6 orders + 1 replay): final counts
            async def committed(group: str) -> int:
                offsets = await committed_offsets(broker.bootstrap, group, TOPIC, 3)
                return sum(max(0, o) for o in offsets.values())

            for group in ("mailer", "billing"):
                wait_until(
                    lambda g=group: asyncio.run(committed(g)) >= records + 1,  # type: ignore[misc]
                    WITHIN,
                    f"{group} to commit every record",
                )

        record = walkthrough(run, tmp_path / "payments.down", settled)
        assert str(record["id"]).endswith(":billing:billing.charge")
    finally:
        broker.stop()
