"""Processes of the outbox tests: worker, relay and web processes on Redis or Kafka.

A :class:`Stack` is one backend set up for one test: the environment every
process of the test shares (backend settings, the database, the test's topic),
a publishing bus for the test process, and the processes it started (killed
after the test).  Handlers are :mod:`tests.outbox_handlers`; they record each
delivery in PostgreSQL, so counting rows tells deliveries, duplicates and order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from eventbus import EventBus, EventBusSettings
from tests.kafka_helpers import wait_committed
from tests.redis_support import ROOT, TEST_REDELIVERY_TIMEOUT, Workers, wait_settled

_ids = itertools.count()
#: Partitions of each test's topic on Kafka.
KAFKA_PARTITIONS = 4
#: Outbox rows not sent yet.
PENDING = "SELECT count(*) FROM eventbus_outbox WHERE sent_at IS NULL"


class Process:
    """A process in its own process group, its output in a log file."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.popen = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL the process and its children: no shutdown work at all."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait for the exit (SIGKILL after ``timeout``); the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.popen.returncode

    async def wait_output(self, needle: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.output():
            if self.popen.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no {needle!r} from {self.popen.args}:\n{self.output()}")
            await asyncio.sleep(0.05)


@dataclass
class Stack:
    """One backend of one test (see the module docstring)."""

    backend: str
    env: dict[str, str]
    topic: str
    tmp: Path
    make_bus: Callable[[], EventBus]
    workers: Workers | None = None
    processes: list[Process] = field(default_factory=list)
    #: Partitions of the topic (Kafka).
    partitions: int = KAFKA_PARTITIONS

    def start(self, command: list[str], env: dict[str, str] | None = None) -> Process:
        log = self.tmp / f"{Path(command[-1]).name}-{next(_ids)}.log"
        process = Process([sys.executable, *command], {**self.env, **(env or {})}, log)
        self.processes.append(process)
        return process

    def start_relay(self, env: dict[str, str] | None = None) -> Process:
        """``eventbus outbox relay`` in a process of its own."""
        return self.start(["-m", "eventbus.cli", "outbox", "relay"], env)

    async def start_worker(self, env: dict[str, str] | None = None, threads: int = 4) -> Any:
        """A worker process running :mod:`tests.outbox_handlers`, ready to take events."""
        env = {**self.env, **(env or {})}
        if self.workers is not None:
            return await asyncio.to_thread(
                self.workers.start, ("tests.outbox_handlers",), threads=threads, env=env
            )
        worker = self.start(["-m", "eventbus.kafka", "tests.outbox_handlers"], env)
        await worker.wait_output("Kafka bridge assigned")
        return worker

    async def wait_settled(self, engine: AsyncEngine, records: int, timeout: float = 60.0) -> None:
        """Wait until nothing committed so far can be delivered again: the relays sent
        every row, then on Redis every queue drained (each message handled and acked),
        on Kafka the group committed the ``records`` records the relays sent.  From
        then on, counts of deliveries are final (no fixed sleep needed)."""
        deadline = time.monotonic() + timeout
        while (left := await count(engine, PENDING)) != 0:
            if time.monotonic() > deadline:
                pytest.fail(f"{left} outbox row(s) still pending after {timeout:g}s")
            await asyncio.sleep(0.05)
        left_s = max(1.0, deadline - time.monotonic())
        if self.workers is not None:
            url, namespace = self.env["EVENTBUS_REDIS_URL"], self.env["EVENTBUS_REDIS_NAMESPACE"]
            await asyncio.to_thread(wait_settled, url, namespace, left_s)
        else:
            bootstrap = self.env["EVENTBUS_KAFKA_BOOTSTRAP_SERVERS"]
            group = self.env["EVENTBUS_KAFKA_GROUP_ID"]
            await wait_committed(
                bootstrap, group, self.topic, self.partitions, records, timeout=left_s
            )

    def stop_all(self) -> None:
        for process in self.processes:
            process.kill()


async def count(engine: AsyncEngine, sql: str, **params: Any) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(text(sql), params) or 0)


async def wait_rows(
    engine: AsyncEngine, sql: str, expected: int, timeout: float = 60.0, **params: Any
) -> None:
    """Wait until ``sql`` (a count) reaches ``expected``; fail on timeout."""
    deadline = time.monotonic() + timeout
    while (found := await count(engine, sql, **params)) < expected:
        if time.monotonic() > deadline:
            pytest.fail(f"{sql}: {found} after {timeout:g}s, expected {expected}")
        await asyncio.sleep(0.1)


def redis_stack(
    pg_url: str, redis_url: str, namespace: str, tmp: Path, topic: str, workers: Workers
) -> Stack:
    from eventbus.redis.backend import RedisBackend

    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "EVENTBUS_BACKEND": "redis",
        "EVENTBUS_REDIS_URL": redis_url,
        "EVENTBUS_REDIS_NAMESPACE": namespace,
        "EVENTBUS_REDIS_REDELIVERY_TIMEOUT": str(TEST_REDELIVERY_TIMEOUT),
        **_common_env(pg_url, topic),
    }

    def make_bus() -> EventBus:
        backend = RedisBackend(
            redis_url, namespace=namespace, redelivery_timeout=TEST_REDELIVERY_TIMEOUT
        )
        return EventBus(backend=backend, settings=EventBusSettings(shutdown_timeout=5))

    return Stack("redis", env, topic, tmp, make_bus, workers=workers)


def kafka_stack(pg_url: str, bootstrap: str, group: str, tmp: Path, topic: str) -> Stack:
    from eventbus.kafka.backend import KafkaBackend
    from tests.kafka_helpers import HEARTBEAT_INTERVAL_MS, SESSION_TIMEOUT_MS, worker_env

    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        **worker_env(bootstrap, group),
        **_common_env(pg_url, topic),
    }

    def make_bus() -> EventBus:
        backend = KafkaBackend(
            bootstrap,
            group_id=group,
            idempotence=False,
            session_timeout_ms=SESSION_TIMEOUT_MS,
            heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS,
        )
        return EventBus(backend=backend, settings=EventBusSettings(shutdown_timeout=5))

    return Stack("kafka", env, topic, tmp, make_bus)


def _common_env(pg_url: str, topic: str) -> dict[str, str]:
    return {
        "EVENTBUS_RETRY_DELAY": "0.05",
        "EVENTBUS_RETRY_MAX_DELAY": "0.5",
        "EVENTBUS_SHUTDOWN_TIMEOUT": "5",
        "EVENTBUS_OUTBOX_DATABASE_URL": pg_url,
        "OUTBOX_TEST_DATABASE_URL": pg_url,
        "OUTBOX_TEST_TOPIC": topic,
        "OUTBOX_TEST_POOL": "1",
    }
