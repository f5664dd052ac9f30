"""Redis Sentinel: the ``redis+sentinel://`` URL, and a publisher, a worker and
health that follow a failover without a restart (a primary, a replica and three
sentinels on loopback: :class:`tests.sentinel_support.SentinelCluster`)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from eventbus import EventBus, EventBusSettings, PublishError
from eventbus.dlq import FailedEvent
from eventbus.exceptions import ConfigurationError
from eventbus.health import HealthStatus
from eventbus.redact import redact_url
from eventbus.redis.backend import RedisBackend
from eventbus.redis.resp import SENTINEL_RECHECK_INTERVAL, RespClient
from eventbus.redis.sentinel import SentinelAddress, is_sentinel_url, parse_sentinel_url
from tests.reliability.handlers import Tracked
from tests.reliability.support import Ledger

pytest.register_assert_rewrite("tests.redis_support", "tests.sentinel_support")
from tests.redis_support import HOST, Workers, require_redis_server_binary  # noqa: E402
from tests.sentinel_support import MASTER, SentinelCluster  # noqa: E402

pytest_plugins = ["tests.redis_support"]

MODULES = ("tests.reliability.handlers",)
SCRIPT = Path(sys.executable).with_name("eventbus")
#: Seconds a failover may take here (down-after 1 s, then the election).
FAILOVER_BOUND = 15.0


# -- the URL ---------------------------------------------------------------------------


def test_sentinel_url_names_sentinels_master_db_and_both_passwords() -> None:
    address = parse_sentinel_url(
        "redis+sentinel://app:s3cret@10.0.0.1:26379,10.0.0.2:26380,[::1]/prod-master/3"
        "?sentinel_password=sent%40pw&sentinel_username=watch&socket_timeout=2"
    )
    assert address == SentinelAddress(
        sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26380), ("::1", 26379)),
        master="prod-master",
        db=3,
        username="app",
        password="s3cret",
        sentinel_username="watch",
        sentinel_password="sent@pw",
        options={"socket_timeout": 2.0},
    )
    assert not address.tls


@pytest.mark.parametrize(
    "url",
    [
        "rediss+sentinel://h:26379/m",
        "redis+sentinel://h:26379/m?ssl=true",
        "sentinel://h:26379/m?ssl=yes",
    ],
)
def test_sentinel_url_turns_tls_on_for_sentinels_and_data_nodes(url: str) -> None:
    address = parse_sentinel_url(url)
    assert address.tls and address.master == "m" and address.db == 0


def test_sentinel_url_tls_options_are_typed_as_redis_py_types_them() -> None:
    address = parse_sentinel_url(
        "rediss+sentinel://h/m?ssl_cert_reqs=none&ssl_check_hostname=false&ssl_ca_certs=/ca.pem"
    )
    assert address.options["ssl_check_hostname"] is False
    assert address.options["ssl_ca_certs"] == "/ca.pem"
    client = RespClient.from_url(
        "rediss+sentinel://h/m?ssl_cert_reqs=none&ssl_check_hostname=false"
    )
    assert client.sentinel is not None and client.ssl_context is not None


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://h:26379", "names no master"),
        ("redis+sentinel://h:26379/", "names no master"),
        ("redis+sentinel:///m", "names no sentinel"),
        ("redis+sentinel://h:99999/m", "invalid port"),
        ("redis+sentinel://h/m/x", "not a number"),
        ("redis+sentinel://h/m/0/extra", r"/<master-name>\[/db\]"),
        ("redis+sentinel://h/m?ssl=maybe", "ssl=true or ssl=false"),
    ],
)
def test_bad_sentinel_url_says_what_to_write(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_sentinel_url(url)
    with pytest.raises(ConfigurationError, match="invalid EVENTBUS_REDIS_URL"):
        RedisBackend(url=url)


def test_only_sentinel_schemes_are_sentinel_urls() -> None:
    assert is_sentinel_url("redis+sentinel://h/m") and is_sentinel_url("SENTINEL://h/m")
    assert not is_sentinel_url("redis://h:6379/0") and not is_sentinel_url("rediss://h")


def test_sentinel_url_shown_without_either_password() -> None:
    url = "redis+sentinel://app:s3cret@h1,h2/m?sentinel_password=t0p"
    shown = RedisBackend(url=url).address()
    assert shown == redact_url(url)
    assert "s3cret" not in shown and "t0p" not in shown


# -- against real servers ----------------------------------------------------------------


def dead_letter(record_id: str) -> FailedEvent:
    return FailedEvent(
        id=record_id,
        event=None,
        envelope={"type": "x.Charge", "event": {"topic": "charges"}},
        topic="charges",
        handler="charges:ledger",
        queue="tests.eventbus",
        attempts=1,
        error="ledger unavailable",
        error_type="ConnectionError",
        traceback="Traceback (most recent call last):\nConnectionError: ledger unavailable\n",
    )


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")}
    return subprocess.run(
        [str(SCRIPT), *args], env={**full_env, **env}, capture_output=True, text=True, timeout=30
    )


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    require_redis_server_binary()
    started = SentinelCluster(tmp_path).start()
    try:
        yield started
    finally:
        started.stop()


def role(port: int) -> bytes | None:
    """The server's role (a new connection: Sentinel closes clients as it demotes)."""
    try:
        return bytes(redis.Redis(HOST, port, socket_timeout=1).role()[0])
    except redis.ConnectionError:
        return None


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:g}s waiting for {what}"
        await asyncio.sleep(0.05)


async def test_publisher_and_worker_follow_a_coordinated_failover(
    cluster: SentinelCluster,
    make_redis_bus: Callable[..., EventBus],
    namespace: str,
    tmp_path: Path,
) -> None:
    """``SENTINEL FAILOVER`` demotes the primary while the publisher and the
    worker hold connections to it: the publisher's next call meets ``READONLY``
    (or a closed connection) and must land on the new primary, first time."""
    ledger_dir = tmp_path / "ledger"
    ledger_dir.mkdir()
    ledger = Ledger(ledger_dir)
    workers = Workers(cluster.url, namespace, tmp_path)
    try:
        worker = workers.start(
            MODULES, threads=2, env={"RELIABILITY_LEDGER": str(ledger_dir)}, wait=False
        )
        workers.wait_registered(worker, 1, url=cluster.primary.url)
        bus = make_redis_bus(url=cluster.url)
        await bus.start()
        await bus.publish(Tracked(n=1))
        await wait_for(lambda: not ledger.missing({1}), 10, "the event before the failover")
        old = redis.Redis.from_url(cluster.primary.url)
        assert old.role()[0] == b"master"  # otherwise the test proves nothing
        # A dead letter written through the backend's store (the Sentinel client).
        store = bus.backend.dead_letter_store(EventBusSettings())  # type: ignore[attr-defined]
        store.add(dead_letter("before-failover"))
        # No worker during the switch: an event published to the old primary would
        # stay there and vanish with the demotion instead of being handled there.
        worker.stop()

        # The third sentinel runs the failover: the first, which the clients ask
        # first, learns of it a couple of seconds later (the sentinels' hellos).
        leader = cluster.sentinel(2)
        assert leader.execute_command("SENTINEL", "FAILOVER", MASTER)

        def promoted() -> bool:
            address = leader.sentinel_get_master_addr_by_name(MASTER)
            return bool(address) and int(address[1]) == cluster.replica.port

        await wait_for(promoted, FAILOVER_BOUND, "the promotion")
        # Sentinel demotes the old primary (and closes its clients) when it next
        # polls it, up to 10 s later; until then it still takes writes, which the
        # demotion discards.  The publisher asks every sentinel again at most
        # SENTINEL_RECHECK_INTERVAL after its last check (in the background of a
        # call) and follows the newest configuration: the call that starts the
        # check may still go to the old primary.
        assert old.role()[0] == b"master"  # otherwise the window is not tested
        await bus.publish(Tracked(n=2))
        # The check, started by that call (a loaded machine: give it a second).
        await asyncio.sleep(SENTINEL_RECHECK_INTERVAL + 1.0)
        await bus.publish(Tracked(n=3))  # no PublishError, and on the new primary
        # Sentinel closes the old primary's client connections as it demotes it.
        await wait_for(
            lambda: role(cluster.primary.port) == b"slave", FAILOVER_BOUND, "the demotion"
        )

        new = redis.Redis.from_url(cluster.replica.url)
        worker = workers.start(
            MODULES, threads=2, env={"RELIABILITY_LEDGER": str(ledger_dir)}, wait=False
        )
        workers.wait_registered(worker, 1, url=cluster.replica.url)
        await wait_for(lambda: not ledger.missing({3}), 15, "the event after the failover")
        # The handler writes the ledger before the worker acks: wait for the ack (and
        # for event 2, if its publish reached the new primary), not a first look.
        await bus.backend.drain(timeout=15)  # type: ignore[attr-defined]
        # The worker's heartbeat and the subscriptions are on the new primary.
        assert new.hlen(f"{namespace}:workers") >= 1 and new.hlen(f"{namespace}:subs") >= 1
        assert ledger.refresh().done[3] == 1
        # The dead letter survived, and the CLI finds it through the Sentinel URL.
        assert store.get("before-failover") is not None
        done = run_cli(
            {
                "EVENTBUS_BACKEND": "redis",
                "EVENTBUS_REDIS_URL": cluster.url,
                "EVENTBUS_REDIS_NAMESPACE": namespace,
            },
            "dlq",
            "list",
        )
        assert done.returncode == 0, done.stderr
        assert "before-failover" in done.stdout
    finally:
        workers.stop_all()


async def test_worker_consumes_from_the_new_primary_before_the_old_one_is_demoted(
    cluster: SentinelCluster,
    make_redis_bus: Callable[..., EventBus],
    namespace: str,
    tmp_path: Path,
) -> None:
    """After a manual ``SENTINEL FAILOVER`` the old primary answers until Sentinel
    demotes it, some 10 s later, while publishes already go to the new one.  The
    worker's client asks the sentinels again every RECHECK_INTERVAL: it handles an
    event published to the new primary before the old one is demoted."""
    ledger_dir = tmp_path / "ledger"
    ledger_dir.mkdir()
    ledger = Ledger(ledger_dir)
    workers = Workers(cluster.url, namespace, tmp_path)
    try:
        worker = workers.start(
            MODULES, threads=2, env={"RELIABILITY_LEDGER": str(ledger_dir)}, wait=False
        )
        workers.wait_registered(worker, 1, url=cluster.primary.url)
        bus = make_redis_bus(url=cluster.url)
        await bus.start()
        await bus.publish(Tracked(n=1))
        await wait_for(lambda: not ledger.missing({1}), 10, "the event before the failover")

        assert cluster.sentinel().execute_command("SENTINEL", "FAILOVER", MASTER)
        await asyncio.to_thread(cluster.wait_promoted, FAILOVER_BOUND)
        await bus.publish(Tracked(n=2))  # starts the publisher's check (maybe on the old)
        await asyncio.sleep(SENTINEL_RECHECK_INTERVAL + 1.0)
        await bus.publish(Tracked(n=3))  # on the new primary only
        assert role(cluster.primary.port) == b"master"  # otherwise the test proves nothing
        await wait_for(lambda: not ledger.missing({3}), 15, "the event on the new primary")
        # Handled before the demotion: the worker consumed from the new primary.
        assert role(cluster.primary.port) == b"master", "handled only after the demotion"
        assert ledger.refresh().done[3] == 1
    finally:
        workers.stop_all()


async def test_health_is_degraded_while_the_primary_is_down_and_healthy_after(
    cluster: SentinelCluster, make_redis_bus: Callable[..., EventBus]
) -> None:
    bus = make_redis_bus(url=cluster.url, publish_timeout=0.5)
    await bus.start()
    [ping, *_] = await bus.health.check()
    assert ping.status is HealthStatus.HEALTHY, ping  # otherwise the test proves nothing

    cluster.primary.kill()
    [ping, *_] = await bus.health.check()
    assert ping.status is HealthStatus.DEGRADED, ping
    assert "failover" in ping.detail

    # Healthy again once every client agrees on the new primary: redis-py's (the
    # workers', the dead-letter store's) also wants the sentinels to report it up
    # and not down, a moment after the promotion.
    deadline = time.monotonic() + FAILOVER_BOUND
    while True:
        [ping, *_] = await bus.health.check()
        if ping.status is HealthStatus.HEALTHY or time.monotonic() > deadline:
            break
        assert ping.status is HealthStatus.DEGRADED, ping
        await asyncio.sleep(0.1)
    assert ping.status is HealthStatus.HEALTHY, ping
    assert cluster.promoted() is not None


async def test_health_is_unhealthy_when_no_sentinel_answers(
    make_redis_bus: Callable[..., EventBus],
) -> None:
    from tests.redis_support import free_port

    bus = make_redis_bus(url=f"redis+sentinel://127.0.0.1:{free_port()}/{MASTER}")
    await bus.start()
    [ping, *_] = await bus.health.check()
    assert ping.status is HealthStatus.UNHEALTHY, ping
    assert "no sentinel" in ping.detail


# -- a primary demoted under its clients (READONLY), an empty script cache (NOSCRIPT) ------

#: Seconds a publish may take on top of EVENTBUS_REDIS_PUBLISH_TIMEOUT here (a loaded
#: machine): a hang detector, not a speed measurement.
SLACK = 1.5


@dataclass
class Publishes:
    """What a stream of one-by-one publishes saw: the events returned OK, those
    refused (and whether the message said nothing was published), each call's time."""

    ok: list[int] = field(default_factory=list)
    #: Refused calls: event, PublishError message.
    refused: list[tuple[int, str]] = field(default_factory=list)
    #: (event, seconds the call took, monotonic time it returned).
    calls: list[tuple[int, float, float]] = field(default_factory=list)

    def never_published(self) -> set[int]:
        return {n for n, message in self.refused if "nothing was published" in message}


async def publish_stream(
    bus: EventBus, stop: asyncio.Event, seen: Publishes, interval: float, delay: float = 0.0
) -> None:
    """Publish Tracked(n=1, 2, ...) one by one until ``stop``; never retry."""
    n = 0
    while not stop.is_set():
        n += 1
        started = time.monotonic()
        try:
            await bus.publish(Tracked(n=n, delay=delay))
        except PublishError as exc:
            seen.refused.append((n, str(exc)))
        else:
            seen.ok.append(n)
        ended = time.monotonic()
        seen.calls.append((n, ended - started, ended))
        await asyncio.sleep(interval)


def error_count(client: redis.Redis, prefix: str) -> int:
    """Error replies of one kind the server sent since it started (INFO errorstats)."""
    stats = client.info("errorstats")
    return int(stats.get(f"errorstat_{prefix}", {}).get("count", 0))


@pytest.fixture
def cluster2(tmp_path: Path) -> Iterator[SentinelCluster]:
    """Two replicas: after a failover, the new primary has one to acknowledge writes."""
    require_redis_server_binary()
    started = SentinelCluster(tmp_path, replicas=2).start()
    try:
        yield started
    finally:
        started.stop()


async def test_publisher_and_worker_leave_a_primary_demoted_under_them(
    cluster2: SentinelCluster,
    make_redis_bus: Callable[..., EventBus],
    namespace: str,
    tmp_path: Path,
) -> None:
    """The primary turns replica (``REPLICAOF``) while the publisher and the worker
    hold connections to it: their commands meet ``READONLY`` (and the worker's
    blocking fetch ``UNBLOCKED``).  No publish hangs; a publish refused with
    "nothing was published" is never delivered; every publish that returned is
    handled; both resume on the new primary without a restart.

    The failover is asked of the third sentinel, so the first one the clients ask
    learns of it last (up to a couple of seconds, by the sentinels' hello
    messages).  ``MIN_REPLICAS=1``: the old primary lost its replicas at the
    promotion, so what it takes until its demotion is refused, not lost."""
    cluster = cluster2
    ledger_dir = tmp_path / "ledger"
    ledger_dir.mkdir()
    ledger = Ledger(ledger_dir)
    workers = Workers(cluster.url, namespace, tmp_path)
    publish_timeout = 1.0
    try:
        worker = workers.start(
            MODULES, threads=2, env={"RELIABILITY_LEDGER": str(ledger_dir)}, wait=False
        )
        workers.wait_registered(worker, 1, url=cluster.primary.url)
        bus = make_redis_bus(
            url=cluster.url,
            publish_timeout=publish_timeout,
            min_replicas=1,
            replica_timeout=0.3,
        )
        await bus.start()
        old = redis.Redis.from_url(cluster.primary.url)
        seen = Publishes()
        stop = asyncio.Event()
        # Handlers take 50 ms: some events are in flight at the demotion.
        stream = asyncio.create_task(publish_stream(bus, stop, seen, 0.03, delay=0.05))
        await wait_for(lambda: len(seen.ok) >= 20, 15, "publishes before the failover")

        leader = cluster.sentinel(2)
        assert leader.execute_command("SENTINEL", "FAILOVER", MASTER)

        def promoted() -> bool:
            address = leader.sentinel_get_master_addr_by_name(MASTER)
            return bool(address) and int(address[1]) != cluster.primary.port

        await wait_for(promoted, FAILOVER_BOUND, "the promotion")
        new_port = int(leader.sentinel_get_master_addr_by_name(MASTER)[1])
        new = redis.Redis(HOST, new_port)
        await wait_for(lambda: new.role()[0] == b"master", FAILOVER_BOUND, "the new primary")
        readonly_before = error_count(old, "READONLY")
        # Demote the old primary now (Sentinel would, some seconds later, and close
        # its clients' connections; here they stay open and meet READONLY).
        old.replicaof(HOST, new_port)
        demoted_at = time.monotonic()
        ok_before = len(seen.ok)
        await wait_for(lambda: len(seen.ok) >= ok_before + 20, 15, "publishes after it")
        stop.set()
        await stream

        assert error_count(old, "READONLY") > readonly_before, "no READONLY met: untested"
        # Never hangs: each call ends within the publish timeout (plus scheduling).
        slowest = max(seconds for _, seconds, _ in seen.calls)
        assert slowest < publish_timeout + SLACK, seen.calls
        accepted = set(seen.ok)
        resumed = next(t for n, _, t in seen.calls if t > demoted_at and n in accepted)
        # Calls that reached the new primary: accepted, or written there and refused
        # for want of a replica (the old primary's replicas resynchronise with it).
        reached = {n for n, m in seen.refused if "written on the Redis primary" in m} | accepted
        moved = next(t for n, _, t in seen.calls if t > demoted_at and n in reached)
        print(
            f"\n[demotion] publishes reached the new primary {moved - demoted_at:.2f}s and "
            f"were accepted {resumed - demoted_at:.2f}s after REPLICAOF; "
            f"{len(seen.refused)} publish(es) refused"
        )
        # Every publish that returned is handled, on the new primary's worker.
        await wait_for(lambda: not ledger.missing(seen.ok), 30, "every accepted event")
        assert not ledger.missing(seen.ok)
        # Refused with "nothing was published": never delivered (no silent duplicate).
        await bus.drain(timeout=30)
        ledger.refresh()
        delivered = {n for n in seen.never_published() if ledger.done[n]}
        assert not delivered, f"events refused as not published were handled: {delivered}"
        # In-flight events at the demotion were acked on the new primary or handled
        # again (at least once): counted, and nothing is left unfinished there.
        again = sum(count - 1 for count in ledger.done.values() if count > 1)
        print(f"[demotion] {again} handler run(s) repeated (in flight at the demotion)")
        assert await bus.backend.pending() == 0  # type: ignore[attr-defined]
        assert new.hlen(f"{namespace}:workers") >= 1
        assert all(w.process.poll() is None for w in workers.started)
    finally:
        workers.stop_all()


async def test_publisher_and_worker_reload_scripts_after_script_flush(
    cluster: SentinelCluster,
    make_redis_bus: Callable[..., EventBus],
    namespace: str,
    tmp_path: Path,
) -> None:
    """A promoted replica has no script in its cache: ``SCRIPT FLUSH`` on the
    primary mid-run is the same for the clients.  Every call answered ``NOSCRIPT``
    is sent again with the script: no publish fails, no event is lost or run twice."""
    ledger_dir = tmp_path / "ledger"
    ledger_dir.mkdir()
    ledger = Ledger(ledger_dir)
    workers = Workers(cluster.url, namespace, tmp_path)
    try:
        worker = workers.start(
            MODULES, threads=2, env={"RELIABILITY_LEDGER": str(ledger_dir)}, wait=False
        )
        workers.wait_registered(worker, 1, url=cluster.primary.url)
        bus = make_redis_bus(url=cluster.url, min_replicas=1, replica_timeout=0.5)
        await bus.start()
        primary = redis.Redis.from_url(cluster.primary.url)
        seen = Publishes()
        stop = asyncio.Event()
        stream = asyncio.create_task(publish_stream(bus, stop, seen, 0.01))
        noscript_before = error_count(primary, "NOSCRIPT")
        for _ in range(3):
            count = len(seen.ok)
            await wait_for(lambda: len(seen.ok) >= count + 20, 15, "publishes")  # noqa: B023
            assert primary.script_flush()
        count = len(seen.ok)
        await wait_for(lambda: len(seen.ok) >= count + 20, 15, "publishes after the flushes")
        stop.set()
        await stream

        assert error_count(primary, "NOSCRIPT") > noscript_before, "no NOSCRIPT: untested"
        assert not seen.refused, seen.refused[:3]
        await wait_for(lambda: not ledger.missing(seen.ok), 30, "every event")
        await bus.drain(timeout=30)
        ledger.refresh()
        assert set(ledger.done) == set(seen.ok)
        assert all(count == 1 for count in ledger.done.values()), "an event ran twice"
    finally:
        workers.stop_all()
