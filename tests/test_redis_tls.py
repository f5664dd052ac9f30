"""TLS (``rediss://``): the publishing client and the workers read the same URL options."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from eventbus import EventBus, PublishError
from eventbus.redis.backend import RedisBackend
from tests import redis_handlers as h

pytest.register_assert_rewrite("tests.redis_support")  # before it is imported below
from tests.redis_support import (  # noqa: E402
    HOST,
    Workers,
    answers,
    free_port,
    require_redis_server_binary,
    wait_until,
)

pytest_plugins = ["tests.redis_support"]
pytestmark = pytest.mark.timeout(60)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A redis-server speaking only TLS, with a certificate signed by a test CA."""
    require_redis_server_binary()
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificates")
    ca_key, ca, key, csr, cert = (tmp_path / n for n in ("ca.key", "ca.pem", "k", "csr", "c"))
    _openssl(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
        *("-keyout", str(ca_key), "-out", str(ca), "-subj", "/CN=eventbus-test-ca"),
    )
    _openssl(
        *("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key)),
        *("-out", str(csr), "-subj", "/CN=127.0.0.1"),
    )
    ext = tmp_path / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(
        *("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key)),
        *("-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext)),
    )
    port = free_port()
    process = subprocess.Popen(
        [
            *("redis-server", "--port", "0", "--tls-port", str(port), "--bind", HOST),
            *("--tls-cert-file", str(cert), "--tls-key-file", str(key)),
            *("--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"),
            *("--save", "", "--appendonly", "no"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"rediss://{HOST}:{port}/0?ssl_ca_certs={ca}"

    def up() -> bool:
        try:
            return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
        except redis.ConnectionError:
            return False

    try:
        wait_until(up, 10, "TLS Redis")
        yield port, ca
    finally:
        process.terminate()
        process.wait(10)
    assert not answers(port)


async def test_web_and_worker_share_the_tls_options_of_one_url(
    tls_redis: tuple[int, Path], namespace: str, tmp_path: Path
) -> None:
    port, ca = tls_redis
    url = f"rediss://{HOST}:{port}/0?ssl_ca_certs={ca}"
    workers = Workers(url, namespace, tmp_path)
    try:
        workers.start(redis_url=url)
        bus = EventBus(backend=RedisBackend(url=url, namespace=namespace))
        await bus.start()
        await bus.publish(h.Numbered(n=5))
        r = redis.Redis.from_url(url)
        await asyncio.to_thread(
            wait_until,
            lambda: r.sismember(h.key("handled", namespace), 5) == 1,
            15,
            "the event over TLS",
        )
        await bus.stop()

        # Without the test CA, both sides refuse the server's certificate alike.
        untrusted = f"rediss://{HOST}:{port}/0"
        publisher = EventBus(backend=RedisBackend(url=untrusted, namespace=namespace))
        await publisher.start()
        with pytest.raises(PublishError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify"):
            await publisher.publish(h.Numbered(n=6))
        await publisher.stop()
        with pytest.raises(redis.ConnectionError, match=r"CERTIFICATE_VERIFY_FAILED|verify"):
            redis.Redis.from_url(untrusted, socket_timeout=2).ping()
    finally:
        workers.stop_all()
