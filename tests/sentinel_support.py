"""A Sentinel-managed Redis on loopback: a primary, a replica and three sentinels.

Sentinel's defaults are lowered so that a failover takes seconds
(``down-after-milliseconds 1000``, ``failover-timeout 5000``).  Every server
binds 127.0.0.1 on free ports; nothing is persisted.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from pathlib import Path

import redis

from tests.redis_support import HOST, READY_TIMEOUT, RedisServer, free_port

MASTER = "mymaster"
#: Sentinels that must agree the primary is down (of three).
QUORUM = 2
#: Milliseconds without an answer before a sentinel calls a server down.
DOWN_AFTER_MS = 1000
#: Milliseconds a failover may take before the sentinels try another.
FAILOVER_TIMEOUT_MS = 5000


class SentinelCluster:
    """One primary, ``replicas`` replicas, three sentinels; ``url`` is the Sentinel URL."""

    def __init__(self, directory: Path, replicas: int = 1) -> None:
        self.directory = directory
        self.primary = RedisServer()
        self.replicas = [RedisServer() for _ in range(replicas)]
        self.replica = self.replicas[0]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"{HOST}:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{MASTER}/0"

    def start(self) -> SentinelCluster:
        # Each server in a directory of its own: a replica writes the snapshot of
        # its full sync there (not in the working directory).
        for server in (self.primary, *self.replicas):
            data = self.directory / f"redis-{server.port}"
            data.mkdir()
            server.args = ("--dir", str(data))
            if server is not self.primary:
                server.args += ("--replicaof", HOST, str(self.primary.port))
            server.start()
        binary = shutil.which("redis-server")
        assert binary is not None
        for port in self.sentinel_ports:
            conf = self.directory / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind {HOST}\ndir {self.directory}\n"
                "sentinel resolve-hostnames no\n"
                f"sentinel monitor {MASTER} {HOST} {self.primary.port} {QUORUM}\n"
                f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}\n"
            )
            log = (self.directory / f"sentinel-{port}.log").open("wb")
            self.sentinels.append(
                subprocess.Popen([binary, str(conf), "--sentinel"], stdout=log, stderr=log)
            )
        self.wait_ready()
        return self

    def sentinel(self, index: int = 0) -> redis.Redis:
        return redis.Redis(HOST, self.sentinel_ports[index], socket_timeout=1)

    def _ready(self) -> bool:
        """Every sentinel knows the replicas and the two other sentinels, and the
        replicas are in sync (otherwise a failover could not promote one)."""
        try:
            for replica in self.replicas:
                info = redis.Redis(HOST, replica.port, socket_timeout=1).info("replication")
                if info.get("master_link_status") != "up":
                    return False
            for index in range(len(self.sentinel_ports)):
                client = self.sentinel(index)
                if len(client.sentinel_slaves(MASTER)) < len(self.replicas):
                    return False
                if len(client.sentinel_sentinels(MASTER)) < len(self.sentinel_ports) - 1:
                    return False
        except redis.RedisError:
            return False
        return True

    def wait_ready(self) -> None:
        # Sentinels discover replicas by INFO (every 10 s) and each other by hello
        # messages (every 2 s): allow for both.
        deadline = time.monotonic() + READY_TIMEOUT + 10
        while not self._ready():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the sentinels did not see the replica; logs in {self.directory}"
                )
            time.sleep(0.1)

    def master_port(self) -> int | None:
        """The primary's port as the first sentinel that answers names it."""
        for index in range(len(self.sentinel_ports)):
            with contextlib.suppress(redis.RedisError):
                address = self.sentinel(index).sentinel_get_master_addr_by_name(MASTER)
                if address:
                    return int(address[1])
        return None

    def promoted(self) -> RedisServer | None:
        """The replica the sentinels name as the primary, if one is."""
        port = self.master_port()
        return next((r for r in self.replicas if r.port == port), None)

    def wait_promoted(self, timeout: float = 15.0) -> float:
        """Wait until a replica is the primary (the sentinels say so and it answers
        ROLE master); returns the seconds it took."""
        started = time.monotonic()
        while True:
            with contextlib.suppress(redis.RedisError):
                replica = self.promoted()
                if replica is not None:
                    role = redis.Redis(HOST, replica.port, socket_timeout=1).role()
                    if role[0] == b"master":
                        return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise AssertionError(f"the replica was not promoted within {timeout:g}s")
            time.sleep(0.05)

    def stop(self) -> None:
        for process in self.sentinels:
            if process.poll() is None:
                process.terminate()
        for process in self.sentinels:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for server in (*self.replicas, self.primary):
            server.stop()
