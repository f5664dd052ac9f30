"""Redis Sentinel addresses: one URL form, parsed in one place.

``EVENTBUS_REDIS_URL`` names a Sentinel-managed primary with the form of the
``redis-sentinel-url`` package (used by Sentry and Flask-Redis users), read the
way redis-py reads a ``redis://`` URL::

    redis+sentinel://[[user]:password@]host1:26379,host2:26379,host3:26379/mymaster[/db]
        [?sentinel_password=...&sentinel_username=...&ssl=true&ssl_ca_certs=...]

* ``mymaster`` is the master name of the ``sentinel monitor`` line; ``db`` the
  database index (default 0);
* the user and password of the userinfo are the data nodes' (``AUTH`` on the
  primary); ``sentinel_username`` / ``sentinel_password`` authenticate to the
  sentinels (their ``requirepass``), when they have one;
* ``rediss+sentinel://`` or ``?ssl=true`` turns TLS on for the sentinels and the
  data nodes alike, with redis-py's ``ssl_*`` options (``ssl_ca_certs``,
  ``ssl_cert_reqs``, ...);
* ``sentinel://`` is accepted as a synonym of ``redis+sentinel://``; a port left
  out is 26379.

Workers, the dead-letter store and the CLI use redis-py's
:class:`redis.sentinel.Sentinel` (:func:`sentinel_client`): its connections ask
the sentinels for the primary when they connect and reconnect when the server
answers ``READONLY`` (a demoted primary); the pool also asks again every
:data:`RECHECK_INTERVAL` seconds while in use (:class:`RecheckingPool`).  The publishing client
(:class:`eventbus.redis.resp.RespClient`) asks the sentinels itself (``SENTINEL
get-master-addr-by-name``), checks the answer with ``ROLE``, asks again after
a lost connection or a ``READONLY`` reply, and asks every sentinel a few times a
second while it publishes (a manual ``SENTINEL FAILOVER`` leaves the old primary
writable for seconds).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode

import redis
from redis.sentinel import Sentinel, SentinelConnectionPool

#: The URL schemes of a Sentinel address (the ``rediss`` one turns TLS on).
SCHEMES = ("redis+sentinel", "rediss+sentinel", "sentinel")
#: The sentinels' port when a host of the URL names none.
DEFAULT_SENTINEL_PORT = 26379
#: Seconds between two checks, by a :func:`sentinel_client` (workers, the dead-letter
#: store), that the sentinels still name the server its connections go to: after a
#: manual ``SENTINEL FAILOVER`` the old primary answers until Sentinel demotes it,
#: some 10 s later, while the publishers already write to the new one.
RECHECK_INTERVAL = 1.0
#: Query options that configure the sentinels rather than the data nodes.
_SENTINEL_OPTIONS = frozenset({"sentinel_password", "sentinel_username"})
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def is_sentinel_url(url: str) -> bool:
    """Whether ``url`` names a Sentinel-managed primary (``redis+sentinel://...``)."""
    scheme, sep, _ = url.partition("://")
    return bool(sep) and scheme.lower() in SCHEMES


@dataclass(frozen=True)
class SentinelAddress:
    """What a ``redis+sentinel://`` URL says."""

    #: The sentinels, ``(host, port)``, in the URL's order.
    sentinels: tuple[tuple[str, int], ...]
    #: The master name (``sentinel monitor <name> ...``).
    master: str
    #: The database index on the data nodes.
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    #: redis-py connection options read from the query (TLS included, typed as
    #: ``redis.connection.parse_url`` types them): they apply to both the
    #: sentinels and the data nodes.
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def tls(self) -> bool:
        return bool(self.options.get("ssl"))


def parse_sentinel_url(url: str) -> SentinelAddress:
    """Read a ``redis+sentinel://`` URL (see the module docstring).

    Raises:
      ValueError: The URL is not a Sentinel URL or lacks a sentinel or a master name.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise ValueError(f"a Sentinel URL starts with {' or '.join(s + '://' for s in SCHEMES)}")
    rest, _, query = rest.partition("?")
    rest = rest.partition("#")[0]
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        userinfo = ""
    username = password = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels = tuple(_host_port(part, url) for part in hosts.split(",") if part.strip())
    if not sentinels:
        raise ValueError(
            "the Sentinel URL names no sentinel: write redis+sentinel://host1:26379,"
            "host2:26379/<master-name>"
        )
    segments = [unquote(s) for s in path.split("/") if s]
    if not segments:
        raise ValueError(
            "the Sentinel URL names no master: add the name of its `sentinel monitor` line, "
            "as in redis+sentinel://host:26379/mymaster"
        )
    if len(segments) > 2:
        raise ValueError(
            f"the Sentinel URL's path is /<master-name>[/db], not /{'/'.join(segments)}"
        )
    master = segments[0]
    db = 0
    if len(segments) == 2:
        if not segments[1].isdigit():
            raise ValueError(f"the database index {segments[1]!r} is not a number")
        db = int(segments[1])
    pairs = parse_qsl(query, keep_blank_values=True)
    sentinel_opts = {k: v for k, v in pairs if k in _SENTINEL_OPTIONS}
    node_query = [(k, v) for k, v in pairs if k not in _SENTINEL_OPTIONS | {"ssl"}]
    tls = scheme.lower() == "rediss+sentinel"
    for key, value in pairs:
        if key == "ssl":
            if value.lower() not in _BOOLS:
                raise ValueError(f"ssl={value!r}: use ssl=true or ssl=false")
            tls = tls or _BOOLS[value.lower()]
    # redis-py's own parser types the query options (bools, numbers, TLS versions).
    probe = f"{'rediss' if tls else 'redis'}://127.0.0.1/{db}"
    if node_query:
        probe += "?" + urlencode(node_query)
    options: dict[str, Any] = redis.connection.parse_url(probe)  # type: ignore[no-untyped-call]
    for key in ("host", "port", "path", "username", "password"):
        options.pop(key, None)
    db = int(options.pop("db", db) or 0)
    connection_class = options.pop("connection_class", None)
    if connection_class is redis.connection.SSLConnection:
        options["ssl"] = True
    return SentinelAddress(
        sentinels=sentinels,
        master=master,
        db=db,
        username=username,
        password=password,
        sentinel_username=sentinel_opts.get("sentinel_username") or None,
        sentinel_password=sentinel_opts.get("sentinel_password") or None,
        options=options,
    )


def _host_port(part: str, url: str) -> tuple[str, int]:
    part = part.strip()
    if part.startswith("["):  # [::1]:26379
        host, _, tail = part[1:].partition("]")
        port_text = tail.removeprefix(":")
    else:
        host, _, port_text = part.partition(":")
    if not host:
        raise ValueError(f"a sentinel address {part!r} has no host")
    if not port_text:
        return host, DEFAULT_SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"the sentinel address {part!r} has an invalid port")
    return host, int(port_text)


class RecheckingPool(SentinelConnectionPool):
    """redis-py's Sentinel pool that also asks the sentinels, at most every
    :data:`RECHECK_INTERVAL` seconds as connections are taken, whether the primary
    moved; when it did, connections to the old one are closed as they come back
    (redis-py's own pool asks only when it opens a connection, so a worker would
    keep consuming from an old primary that still answers)."""

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        self._checked_at = time.monotonic()
        self._checking = threading.Lock()

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        if now - self._checked_at >= RECHECK_INTERVAL and self._checking.acquire(blocking=False):
            try:
                self._checked_at = now
                # Moves the pool to the primary the sentinels name now (idle
                # connections closed, busy ones when released).  No answer: keep
                # the connections; a command that fails on them finds out.
                self.get_master_address()  # type: ignore[no-untyped-call]
            except redis.RedisError:
                pass
            finally:
                self._checking.release()
        return super().get_connection(*args, **kwargs)


def sentinel_client(address: SentinelAddress, **connection_kwargs: Any) -> redis.Redis:
    """A redis-py client of the current primary: it asks the sentinels on every new
    connection and every :data:`RECHECK_INTERVAL` seconds (:class:`RecheckingPool`),
    and reconnects after a failover (``READONLY`` from a demoted primary closes the
    connection; the next command finds the new one).

    ``connection_kwargs`` (socket timeouts, keepalive, ...) apply to the data nodes
    and, for the ``socket_*`` ones, to the sentinels.
    """
    options = {**address.options, **connection_kwargs}
    sentinel_kwargs: dict[str, Any] = {k: v for k, v in options.items() if k.startswith("socket_")}
    sentinel_kwargs.update({k: v for k, v in options.items() if k.startswith("ssl")})
    if address.sentinel_password is not None:
        sentinel_kwargs["password"] = address.sentinel_password
    if address.sentinel_username is not None:
        sentinel_kwargs["username"] = address.sentinel_username
    manager = Sentinel(list(address.sentinels), sentinel_kwargs=sentinel_kwargs)
    client: redis.Redis = manager.master_for(
        address.master,
        connection_pool_class=RecheckingPool,
        db=address.db,
        username=address.username,
        password=address.password,
        **options,
    )
    return client
