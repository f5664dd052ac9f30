"""Fixtures for tests against a real Redis server and real worker processes.

``redis_url`` uses the server at ``EVENTBUS_TEST_REDIS_URL`` (default
``redis://127.0.0.1:6379/0``) when one answers there, else starts ``redis-server``
on a free port (no persistence).  A URL set explicitly must answer: the suite
never silently swaps it for a server of its own.  With ``CI=true`` a missing
Redis is a failure, never a skip.  Every test gets its own key namespace and
deletes only its own keys.

Import the fixtures into a test module::

    from tests.redis_support import make_redis_bus, namespace, redis_url, workers  # noqa: F401
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from eventbus import EventBus, EventBusSettings, RetryPolicy
from eventbus.redis.backend import RedisBackend

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
DEFAULT_PORT = 6379
#: The variable naming the shared Redis of the test suite (a URL; db index honoured).
URL_VARIABLE = "EVENTBUS_TEST_REDIS_URL"
DEFAULT_URL = f"redis://{HOST}:{DEFAULT_PORT}/0"
#: Seconds a started redis-server or worker may take to become ready.
READY_TIMEOUT = 15.0
#: Redelivery timeout of test workers: short, so crash tests finish quickly.
TEST_REDELIVERY_TIMEOUT = 3.0
FAST_RETRIES = RetryPolicy(max_retries=3, delay=0.05, backoff_factor=2.0, max_delay=0.5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def answers(port: int, host: str = HOST) -> bool:
    """Whether a Redis server answers PING at host:port."""
    try:
        return bool(redis.Redis(host=host, port=port, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def url_answers(url: str) -> bool:
    """Whether a Redis server answers PING at ``url``."""
    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, ValueError):
        return False


def shared_redis_url() -> str | None:
    """The shared Redis of the suite: ``EVENTBUS_TEST_REDIS_URL`` if set (it must
    answer: a clear failure otherwise), else 127.0.0.1:6379 if it answers, else
    None (the fixture starts a ``redis-server`` of its own)."""
    configured = os.environ.get(URL_VARIABLE, "").strip()
    if configured:
        if not url_answers(configured):
            pytest.fail(
                f"{URL_VARIABLE}={configured} does not answer PING: start that Redis, "
                f"or unset {URL_VARIABLE} (the suite then uses {DEFAULT_URL} or starts "
                "redis-server itself)"
            )
        return configured
    return DEFAULT_URL if answers(DEFAULT_PORT) else None


class RedisServer:
    """A ``redis-server`` of our own, without persistence; restartable on its port."""

    def __init__(self, port: int | None = None, *, args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        #: Extra ``redis-server`` arguments (they override the defaults).
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.process = subprocess.Popen(
            [
                *(binary, "--port", str(self.port), "--bind", HOST),
                *("--save", "", "--appendonly", "no", *self.args),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + READY_TIMEOUT
        while not answers(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        """SIGKILL the server: a crash, no shutdown work."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def require_redis_server_binary() -> None:
    if shutil.which("redis-server") is None:
        message = "redis-server is not installed"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


def redis_cli(redis_url: str, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``eventbus ARGS`` in a subprocess, as an operator runs it against ``redis_url``
    and ``namespace`` (the test process's own ``EVENTBUS_*`` variables left out)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")}
    env |= {
        "PYTHONPATH": str(ROOT),
        "EVENTBUS_BACKEND": "redis",
        "EVENTBUS_REDIS_URL": redis_url,
        "EVENTBUS_REDIS_NAMESPACE": namespace,
    }
    return subprocess.run(
        [sys.executable, "-m", "eventbus.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` every 50 ms until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def unfinished(client: redis.Redis, namespace: str) -> int:
    """Messages not finished yet in every subscription's queue of ``namespace``: ready,
    delayed, parked or taken by a worker and not acked (what ``RedisBackend.pending``
    and ``bus.drain`` count).  Zero: nothing published so far can be delivered again."""
    from eventbus.redis.scripts import bodies_key

    queues = [q.decode() for q in client.smembers(f"{namespace}:queues")]
    return sum(int(client.hlen(bodies_key(namespace, queue))) for queue in queues)


def wait_settled(redis_url: str, namespace: str, timeout: float = 30.0) -> None:
    """Wait until every message of ``namespace`` was handled (or dead-lettered) and
    acked: after that, counts of deliveries are final (no fixed sleep needed)."""
    client = redis.Redis.from_url(redis_url)
    try:
        wait_until(lambda: unfinished(client, namespace) == 0, timeout, "the queues to drain")
    finally:
        client.close()


#: The service of the test handler modules (their top-level package).
TEST_SERVICE = "tests"


def queue_name(queue: str = "eventbus", service: str = TEST_SERVICE) -> str:
    """The Redis queue of a handler queue of a service: ``<service>.<queue>``."""
    return f"{service}.{queue}"


def sync_subscriptions(
    redis_url: str,
    namespace: str,
    modules: tuple[str, ...] = ("tests.redis_handlers",),
    env: dict[str, str] | None = None,
) -> str:
    """Run ``eventbus subscriptions sync MODULES`` as a deploy's release step would;
    returns its output."""
    full_env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "EVENTBUS_BACKEND": "redis",
        "EVENTBUS_REDIS_URL": redis_url,
        "EVENTBUS_REDIS_NAMESPACE": namespace,
        **(env or {}),
    }
    done = subprocess.run(
        [sys.executable, "-m", "eventbus.cli", "subscriptions", "sync", *modules],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise AssertionError(f"subscriptions sync failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The URL of a Redis server for this test session (see :func:`shared_redis_url`)."""
    shared = shared_redis_url()
    if shared is not None:
        yield shared
        return
    require_redis_server_binary()
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def namespace(redis_url: str) -> Iterator[str]:
    """A key namespace of this test only; its keys are deleted afterwards."""
    ns = f"ebtest-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield ns
    client = redis.Redis.from_url(redis_url)
    with contextlib.suppress(redis.RedisError):
        keys = list(client.scan_iter(match=f"{ns}:*", count=1000))
        if keys:
            client.delete(*keys)
    client.close()


@pytest.fixture
async def make_redis_bus(redis_url: str, namespace: str) -> AsyncIterator[Callable[..., EventBus]]:
    """Build buses on the Redis backend (this test's namespace); stopped afterwards."""
    buses: list[EventBus] = []

    def factory(**backend_options: Any) -> EventBus:
        backend_options.setdefault("url", redis_url)
        backend_options.setdefault("namespace", namespace)
        backend_options.setdefault("redelivery_timeout", TEST_REDELIVERY_TIMEOUT)
        bus = EventBus(
            backend=RedisBackend(**backend_options),
            # the handler modules' service, whatever other test modules imported
            settings=EventBusSettings(shutdown_timeout=2.0, service=TEST_SERVICE),
            retry_policy=FAST_RETRIES,
        )
        buses.append(bus)
        return bus

    yield factory
    for bus in buses:
        await bus.stop()
        broker = bus.backend.broker  # type: ignore[attr-defined]
        if broker is not None:
            broker.close()


class WorkerProcess:
    """A ``dramatiq eventbus.actors`` command in its own process group."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path) -> None:
        self.process = process
        self.log = log

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the dramatiq master and its worker processes at once."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (graceful), then SIGKILL after ``timeout`` seconds."""
        if self.process.poll() is None:
            # The master forwards SIGTERM to its worker processes; signalling them
            # directly too would make them exit before shutting down cleanly.
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.process.wait()
        self.kill(signal.SIGKILL)  # stray children, if any
        return self.process.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Workers:
    """Starts worker processes for one test and stops them all afterwards."""

    def __init__(self, redis_url: str, namespace: str, log_dir: Path) -> None:
        self.redis_url = redis_url
        self.namespace = namespace
        self.log_dir = log_dir
        self.started: list[WorkerProcess] = []

    def start(
        self,
        modules: tuple[str, ...] = ("tests.redis_handlers",),
        *,
        processes: int = 1,
        threads: int = 4,
        env: dict[str, str] | None = None,
        redis_url: str | None = None,
        wait: bool = True,
        args: tuple[str, ...] = (),
    ) -> WorkerProcess:
        """Start ``dramatiq eventbus.actors *modules`` (more dramatiq options in
        ``args``); wait until its processes beat."""
        url = redis_url or self.redis_url
        full_env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "EVENTBUS_BACKEND": "redis",
            "EVENTBUS_REDIS_URL": url,
            "EVENTBUS_REDIS_NAMESPACE": self.namespace,
            "EVENTBUS_REDIS_REDELIVERY_TIMEOUT": str(TEST_REDELIVERY_TIMEOUT),
            "EVENTBUS_RETRY_DELAY": "0.05",
            "EVENTBUS_RETRY_MAX_DELAY": "0.5",
            **(env or {}),
        }
        log = self.log_dir / f"worker-{len(self.started)}.log"
        command = [sys.executable, "-m", "dramatiq", "eventbus.actors", *modules]
        command += ["--processes", str(processes), "--threads", str(threads), *args]
        with log.open("wb") as out:
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = WorkerProcess(process, log)
        self.started.append(worker)
        if wait:
            self.wait_registered(worker, processes, url)
        return worker

    def registered(self, url: str | None = None) -> set[bytes]:
        client = redis.Redis.from_url(url or self.redis_url)
        try:
            return set(client.hkeys(f"{self.namespace}:workers"))
        finally:
            client.close()

    def wait_registered(self, worker: WorkerProcess, count: int, url: str | None = None) -> None:
        """Wait until ``count`` processes of ``worker`` registered their heartbeat."""
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            fresh = [w for w in self.registered(url) if self._is_child(worker, w)]
            if len(fresh) >= count:
                return
            if worker.process.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{worker.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker did not register in time:\n{worker.output()}")
            time.sleep(0.05)

    @staticmethod
    def _is_child(worker: WorkerProcess, worker_id: bytes) -> bool:
        try:
            pid = int(worker_id.decode().split(".")[-2])
        except (ValueError, IndexError):
            return False
        try:
            return os.getpgid(pid) == worker.process.pid
        except ProcessLookupError:
            return False

    def stop_all(self) -> None:
        for worker in self.started:
            worker.stop()


@pytest.fixture
def workers(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[Workers]:
    """Start ``dramatiq eventbus.actors`` processes; all are stopped after the test."""
    pool = Workers(redis_url, namespace, tmp_path)
    try:
        yield pool
    finally:
        pool.stop_all()
