"""A small asyncio Redis client for the publish path: pipelined, multiplexed, bounded.

Why not ``redis.asyncio``?  Kept by a same-run measurement (``bench/resp_bench.py``,
three runs on a loaded 2-core VM, N = 20,000, against ``redis.asyncio`` with
hiredis): ``bus.publish`` one by one 1.07x-2.06x the events/s (1.40x in the
quietest run, 4,634 vs 3,314/s) at about half the web process's CPU per publish
(1.83x-2.06x: 104 vs 204 µs); the fan-out call alone 1.43x-3.19x.  With 64
concurrent callers the backend's group commit hides most of the client's cost
(0.90x-1.50x) and the worker's commands gain too little over the synchronous
``redis.Redis`` (0.84x-2.06x) to leave redis-py there, so workers, the
dead-letter store, the console and the CLI use redis-py.  Publishing only needs
a handful of commands, so this client speaks RESP2 directly over an
:class:`asyncio.Protocol`, and it tells "sent, reply lost" from "never sent"
(redis-py retries a lost reply by default, which would publish twice):

* every call writes all of its commands with one ``transport.write`` and awaits
  their replies, so a ``MULTI ... EXEC`` block is never interleaved with another
  caller's commands even though callers share a connection;
* callers are multiplexed: concurrent coroutines pipeline on the same
  connection, and a new connection (up to ``max_connections``) is only opened
  when every open one is busy;
* every call is bounded by ``timeout`` seconds (connect included); on a timeout
  the connection is dropped, so a late reply can never be taken for another's.
  A call that fails after it was written raises :class:`RespReplyLost` (its
  commands may have run), one that never left raises :class:`RespConnectionError`.

Example::

    client = RespClient.from_url("redis://127.0.0.1:6379/0", timeout=2.0)
    [pushed] = await client.execute([(b"RPUSH", b"q", b"payload")])
    await client.close()

With a ``redis+sentinel://`` URL (:mod:`eventbus.redis.sentinel`) the client
finds the primary itself: before opening a connection it asks the sentinels
(``SENTINEL get-master-addr-by-name``, the first that answers wins) and checks
the server with ``ROLE`` in the connection's setup.  A lost connection is
replaced by a new one, which asks again; a ``READONLY`` reply (a demoted
primary; also inside a script's own error) retires every connection and runs the
call once more on the primary the sentinels name now (a replica refuses every
write, so nothing of the call ran); a sentinel that still names the demoted
server is passed over for the next.  While in use, it asks every sentinel again
in the background at most every ``SENTINEL_RECHECK_INTERVAL`` seconds, follows
the one with the newest configuration (``config-epoch``: the sentinel that ran a
failover knows first) and retires the connections to a server it no longer
names (after a manual ``SENTINEL FAILOVER`` the old primary takes writes until
Sentinel demotes it, some 10 s later, and those writes vanish then).  While no
primary can be found, calls fail with :class:`RespConnectionError` (they never
left).

It is an implementation detail of :mod:`eventbus.redis.backend`, not a
general-purpose Redis client (no pub/sub, no RESP3, no cluster).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

from eventbus.redis.sentinel import SentinelAddress, is_sentinel_url, parse_sentinel_url

#: Default bound, in seconds, on one call (connecting included).
DEFAULT_TIMEOUT = 2.0
#: Default number of connections a client may open.
DEFAULT_MAX_CONNECTIONS = 10
#: Seconds between two checks, in Sentinel mode, that the sentinels still name the
#: server this client's connections go to (after a manual ``SENTINEL FAILOVER`` the
#: old primary keeps taking writes until Sentinel demotes it, up to 10 s later: they
#: vanish then).  One pipelined round trip to each sentinel per check, in the
#: background of calls; ``bench/redis_failover_window_bench.py`` measures the window.
SENTINEL_RECHECK_INTERVAL = 0.25

Command = Sequence[bytes | str | int | float]


#: The TLS query options of a ``rediss://`` URL this client reads (as redis-py does).
_TLS_OPTIONS = frozenset(
    {
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_ca_path",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_password",
        "ssl_check_hostname",
        "ssl_min_version",
        "ssl_ciphers",
    }
)
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def _ssl_context(options: dict[str, Any]) -> ssl.SSLContext:
    """The TLS context redis-py's SSLConnection would build from these URL options."""
    reqs = options.get("ssl_cert_reqs", "required")
    if isinstance(reqs, str):
        if reqs.lower() not in _CERT_REQS:
            raise ValueError(f"ssl_cert_reqs={reqs!r}: use none, optional or required")
        reqs = _CERT_REQS[reqs.lower()]
    context = ssl.create_default_context(
        cafile=options.get("ssl_ca_certs"), capath=options.get("ssl_ca_path")
    )
    check = options.get("ssl_check_hostname", True)
    context.check_hostname = bool(check) and reqs != ssl.CERT_NONE
    context.verify_mode = reqs
    if options.get("ssl_certfile"):
        context.load_cert_chain(
            options["ssl_certfile"], options.get("ssl_keyfile"), options.get("ssl_password")
        )
    if options.get("ssl_min_version") is not None:
        context.minimum_version = options["ssl_min_version"]
    if options.get("ssl_ciphers"):
        context.set_ciphers(options["ssl_ciphers"])
    return context


class RespError(Exception):
    """Redis answered with an error reply (``-ERR ...``)."""


class RespConnectionError(ConnectionError):
    """The connection failed, was lost, or a call timed out."""


class PrimaryNotFound(RespConnectionError):
    """No sentinel named a primary: none answered, or none knows the master name
    (a configuration or network problem, not a failover in progress)."""


class _NotPrimary(RespConnectionError):
    """The server a sentinel named is not a primary (it was demoted)."""

    def __init__(self, address: str, message: str) -> None:
        super().__init__(message)
        self.address = address


class RespReplyLost(RespConnectionError):
    """A call was sent but its reply did not arrive (timed out, or the connection
    was lost): Redis may have run its commands.  Any other
    :class:`RespConnectionError` means the call never left this process."""


def encode_command(args: Command) -> bytes:
    """One command in RESP2 wire format."""
    out = [b"*%d\r\n" % len(args)]
    append = out.append
    for arg in args:
        if type(arg) is not bytes:
            arg = arg.encode() if isinstance(arg, str) else str(arg).encode()
        append(b"$%d\r\n" % len(arg))
        append(arg)
        append(b"\r\n")
    return b"".join(out)


class _Incomplete(Exception):
    pass


class _Parser:
    """Incremental RESP2 reply parser."""

    __slots__ = ("buf", "pos")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0

    def feed(self, data: bytes) -> None:
        if self.pos:
            del self.buf[: self.pos]
            self.pos = 0
        self.buf += data

    def next_reply(self) -> Any:
        """The next complete reply; raises _Incomplete (position unchanged) if none."""
        start = self.pos
        try:
            return self._parse()
        except _Incomplete:
            self.pos = start
            raise

    def _line(self) -> bytes:
        end = self.buf.find(b"\r\n", self.pos)
        if end < 0:
            raise _Incomplete
        line = bytes(self.buf[self.pos : end])
        self.pos = end + 2
        return line

    def _parse(self) -> Any:
        line = self._line()
        if not line:
            raise RespConnectionError("protocol error: empty reply line")
        kind, rest = line[:1], line[1:]
        if kind == b":":
            return int(rest)
        if kind == b"+":
            return rest
        if kind == b"-":
            return RespError(rest.decode(errors="replace"))
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            end = self.pos + size
            if len(self.buf) < end + 2:
                raise _Incomplete
            data = bytes(self.buf[self.pos : end])
            self.pos = end + 2
            return data
        if kind == b"*":
            count = int(rest)
            if count < 0:
                return None
            return [self._parse() for _ in range(count)]
        raise RespConnectionError(f"protocol error: unexpected reply {line[:40]!r}")


class _Connection(asyncio.Protocol):
    """One connection; callers' replies arrive in the order they wrote (FIFO).

    Timeouts cost one timer per connection, not one per call: the watchdog fires
    at the oldest pending call's deadline and, if that call is still waiting,
    aborts the connection (failing every pending call on it).
    """

    def __init__(self, timeout: float, address: str) -> None:
        self.timeout = timeout
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        # (future, replies so far, replies expected, deadline)
        self.waiters: deque[tuple[asyncio.Future[list[Any]], list[Any], int, float]] = deque()
        self.parser = _Parser()
        self.closed = False
        #: Closing once its pending calls are answered (the server was demoted).
        self.retiring = False
        self.watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but quack alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        parser.feed(data)
        waiters = self.waiters
        while waiters:
            future, replies, expected, _ = waiters[0]
            try:
                while len(replies) < expected:
                    replies.append(parser.next_reply())
            except _Incomplete:
                return
            except RespConnectionError as exc:
                self.abort(exc)
                return
            waiters.popleft()
            if not future.done():
                future.set_result(replies)
        if self.retiring and self.transport is not None:
            self.transport.close()

    def retire(self) -> None:
        """Take no new call; close once the pending ones are answered."""
        self.retiring = self.closed = True
        if not self.waiters and self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(RespConnectionError(f"connection to Redis lost: {exc or 'closed'}"))

    def _fail(self, exc: Exception) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        waiters, self.waiters = self.waiters, deque()
        for future, _, _, _ in waiters:
            if not future.done():
                # Every waiter's call was written: Redis may have run it.
                future.set_exception(RespReplyLost(str(exc)))

    def abort(self, exc: Exception) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        self._fail(exc)

    def _check_deadline(self) -> None:
        self.watchdog = None
        if not self.waiters:
            return
        deadline = self.waiters[0][3]
        if self.loop.time() >= deadline:
            self.abort(
                RespConnectionError(
                    f"no answer from Redis at {self.address} within {self.timeout:g}s"
                )
            )
        else:
            self.watchdog = self.loop.call_at(deadline, self._check_deadline)

    def send(self, payload: bytes, expected: int) -> asyncio.Future[list[Any]]:
        if self.closed or self.transport is None:
            raise RespConnectionError(f"connection to Redis at {self.address} lost")
        future: asyncio.Future[list[Any]] = self.loop.create_future()
        deadline = self.loop.time() + self.timeout
        self.waiters.append((future, [], expected, deadline))
        if self.watchdog is None:
            self.watchdog = self.loop.call_at(deadline, self._check_deadline)
        self.transport.write(payload)
        return future


class RespClient:
    """A pool of multiplexed RESP2 connections to one Redis server.

    Parameters:
      host, port: The server (``unix_path`` instead for a Unix socket).
      db: The database index (``SELECT``-ed on connect).
      username, password: ``AUTH`` credentials, when set.
      ssl_context: TLS context for ``rediss://``.
      timeout: Seconds one call may take, connecting included.
      max_connections: Connections the pool may open.
      sentinel: Find the primary through these sentinels (``host`` and ``port``
        are then the primary last found).

    A client belongs to the event loop it is first used on.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6379,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        unix_path: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        sentinel: SentinelAddress | None = None,
    ) -> None:
        self.sentinel = sentinel
        self.host = host
        self.port = port
        self.db = db
        self.username = username
        self.password = password
        self.unix_path = unix_path
        self.ssl_context = ssl_context
        self.timeout = timeout
        self.max_connections = max(1, max_connections)
        self._connections: list[_Connection] = []
        self._connecting = 0
        #: One client per sentinel, in the order to ask them (the last that answered first).
        self._sentinels: list[RespClient] = []
        #: When (event loop time) to ask the sentinels again, and the pending check.
        self._recheck_at = 0.0
        self._recheck: asyncio.Task[None] | None = None

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> RespClient:
        """A client for ``redis://[[user]:password@]host[:port][/db]``, ``rediss://``
        (TLS), ``unix:///path?db=N`` or ``redis+sentinel://`` (see
        :mod:`eventbus.redis.sentinel`).

        The URL is read by redis-py's own parser, so the publishing client and the
        workers' redis-py clients agree on every option: the database, credentials
        and the TLS query options (``ssl_cert_reqs``, ``ssl_ca_certs``,
        ``ssl_ca_path``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_password``,
        ``ssl_check_hostname``, ``ssl_min_version``, ``ssl_ciphers``).  Socket
        tuning options (``socket_timeout``, ``health_check_interval``, ...) apply
        to the workers only: ``timeout`` bounds every call here.

        Raises:
          ValueError: The URL is invalid or sets a TLS option this client cannot honour.
        """
        from redis.connection import SSLConnection, UnixDomainSocketConnection, parse_url

        if is_sentinel_url(url):
            address = parse_sentinel_url(url)
            _check_tls_options(address.options)
            return cls(
                host="",
                port=0,
                db=address.db,
                username=address.username,
                password=address.password,
                ssl_context=_ssl_context(address.options) if address.tls else None,
                timeout=timeout,
                max_connections=max_connections,
                sentinel=address,
            )
        options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        connection_class = options.pop("connection_class", None)
        _check_tls_options(options)
        context = None
        if connection_class is SSLConnection:
            context = _ssl_context(options)
        return cls(
            host=str(options.get("host") or "127.0.0.1"),
            port=int(options.get("port") or 6379),
            db=int(options.get("db") or 0),
            username=options.get("username") or None,
            password=options.get("password"),
            unix_path=(
                str(options["path"]) if connection_class is UnixDomainSocketConnection else None
            ),
            ssl_context=context,
            timeout=timeout,
            max_connections=max_connections,
        )

    async def _discover(
        self, sentinel: SentinelAddress, avoid: str | None = None
    ) -> tuple[str, int]:
        """The primary's address, as the first sentinel that answers names it.

        ``avoid``: a server found to be a replica; a sentinel that still names it
        (it has not learnt of the failover yet: sentinels tell each other every
        couple of seconds) is passed over for the next one.
        """
        if not self._sentinels:
            self._sentinels = [
                RespClient(
                    host,
                    port,
                    username=sentinel.sentinel_username,
                    password=sentinel.sentinel_password,
                    ssl_context=self.ssl_context,
                    timeout=self.timeout,
                    max_connections=1,
                )
                for host, port in sentinel.sentinels
            ]
        failures = []
        stale = False
        for client in list(self._sentinels):
            try:
                reply = await client.call("SENTINEL", "get-master-addr-by-name", sentinel.master)
            except (RespConnectionError, RespError) as exc:
                failures.append(f"{client._address}: {exc}")
                continue
            if not reply:
                failures.append(f"{client._address}: no master named {sentinel.master!r}")
                continue
            host, port = reply[0].decode(), int(reply[1])
            if f"{host}:{port}" == avoid:
                stale = True
                continue
            self._sentinels.remove(client)
            self._sentinels.insert(0, client)
            return host, port
        if stale:
            raise RespConnectionError(
                f"the sentinels name {avoid} as the primary of {sentinel.master!r}, but it "
                "is a replica (a failover in progress?)"
            )
        raise PrimaryNotFound(
            f"no sentinel named a primary for {sentinel.master!r} ({'; '.join(failures)}): "
            "check the sentinels' addresses and the master name of EVENTBUS_REDIS_URL"
        )

    def _maybe_recheck(self, sentinel: SentinelAddress) -> None:
        """Ask the sentinels, in the background and at most every
        SENTINEL_RECHECK_INTERVAL seconds, whether the primary moved."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now < self._recheck_at or (self._recheck is not None and not self._recheck.done()):
            return
        self._recheck_at = now + SENTINEL_RECHECK_INTERVAL
        self._recheck = loop.create_task(self._check_primary(sentinel))

    async def _check_primary(self, sentinel: SentinelAddress) -> None:
        """Ask every sentinel at once and follow the one with the newest
        configuration (the highest ``config-epoch``): the sentinel that ran a
        failover names the new primary at once, the others a couple of seconds
        later (their hello messages)."""
        if not self._sentinels:
            return  # none asked yet: the next connection to open asks
        answers = await asyncio.gather(
            *(self._ask_with_epoch(client, sentinel.master) for client in self._sentinels)
        )
        known = [(epoch, i, address) for i, (epoch, address) in enumerate(answers) if address]
        if not known:
            return  # the next connection to open asks again (and fails loudly)
        _, index, current = max(known, key=lambda answer: (answer[0], -answer[1]))
        client = self._sentinels[index]
        if index:  # ask it first from now on (connections opened next)
            self._sentinels.remove(client)
            self._sentinels.insert(0, client)
        for conn in self._connections:
            if conn.address != current:  # the old primary: it takes no new call
                conn.retire()
        self._connections = [c for c in self._connections if not c.closed]

    @staticmethod
    async def _ask_with_epoch(client: RespClient, master: str) -> tuple[int, str | None]:
        """``(config-epoch, "host:port")`` of the primary as one sentinel names it, or
        ``(-1, None)`` when it does not answer."""
        try:
            address, state = await client.execute(
                [("SENTINEL", "get-master-addr-by-name", master), ("SENTINEL", "MASTER", master)]
            )
        except RespConnectionError:
            return -1, None
        if not address or isinstance(address, RespError) or isinstance(state, RespError):
            return -1, None
        fields = dict(zip(state[::2], state[1::2], strict=False))
        epoch = fields.get(b"config-epoch", b"0")
        return int(epoch) if epoch.isdigit() else 0, f"{address[0].decode()}:{int(address[1])}"

    async def _open(self) -> _Connection:
        sentinel = self.sentinel
        if sentinel is None:
            return await self._connect()
        self.host, self.port = await self._discover(sentinel)
        try:
            return await self._connect()
        except _NotPrimary as exc:
            # A sentinel that has not learnt of a failover yet names the demoted
            # primary: ask the others at once rather than fail until it learns.
            self.host, self.port = await self._discover(sentinel, avoid=exc.address)
            return await self._connect()

    async def _connect(self) -> _Connection:
        """A connection to ``host``:``port`` (or the Unix socket), set up; in Sentinel
        mode, raises :class:`_NotPrimary` unless the server is a primary."""
        loop = asyncio.get_running_loop()
        transport: asyncio.BaseTransport
        sentinel = self.sentinel
        if self.unix_path:
            transport, conn = await loop.create_unix_connection(
                self._protocol, self.unix_path, ssl=self.ssl_context
            )
        else:
            transport, conn = await loop.create_connection(
                self._protocol, self.host, self.port, ssl=self.ssl_context
            )
        setup: list[Command] = []
        if self.password is not None:
            auth: list[bytes | str | int | float] = ["AUTH"]
            if self.username:
                auth.append(self.username)
            auth.append(self.password)
            setup.append(auth)
        if self.db:
            setup.append(("SELECT", self.db))
        if sentinel is not None:
            setup.append(("ROLE",))
        if setup:
            replies = await conn.send(b"".join(encode_command(c) for c in setup), len(setup))
            for reply in replies:
                if isinstance(reply, RespError):
                    transport.close()
                    raise RespConnectionError(f"Redis refused the connection setup: {reply}")
            if sentinel is not None and replies[-1][0] != b"master":
                transport.close()
                role = replies[-1][0].decode(errors="replace")
                raise _NotPrimary(
                    self._address,
                    f"the sentinels name {self._address} as the primary of {sentinel.master!r}, "
                    f"but it is a {role} (a failover in progress?)",
                )
        return conn

    def _protocol(self) -> _Connection:
        return _Connection(self.timeout, self._address)

    def _pick(self) -> _Connection | None:
        """An open connection to use now, or None when a new one should be opened."""
        connections = self._connections
        best: _Connection | None = None
        for conn in connections:
            if conn.closed:
                continue
            if not conn.waiters:
                return conn
            if best is None or len(conn.waiters) < len(best.waiters):
                best = conn
        if best is not None and len(connections) + self._connecting >= self.max_connections:
            return best
        return None

    async def _acquire(self) -> _Connection:
        self._connections = [c for c in self._connections if not c.closed]
        conn = self._pick()
        if conn is not None:
            return conn
        self._connecting += 1
        try:
            conn = await self._open()
        finally:
            self._connecting -= 1
        self._connections.append(conn)
        return conn

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        """Send ``commands`` in one write and return their replies, in order.

        Error replies are returned as :class:`RespError` instances (not raised),
        so a caller can tell which command of a pipeline failed.

        Raises:
          RespReplyLost: The commands were sent, but the connection was lost or no
            complete answer came within ``timeout`` seconds: they may have run.
          RespConnectionError: Connecting failed or the connection was lost before
            the commands were sent: they did not run.
        """
        payload = b"".join([encode_command(c) for c in commands])
        if self.sentinel is not None and self._connections:
            self._maybe_recheck(self.sentinel)
        replies = await self._send(payload, len(commands))
        if self.sentinel is not None and any(_readonly(r) for r in replies):
            # A demoted primary: it refused every write of the call.  Leave it
            # and run the call once on the primary the sentinels name now.
            for conn in self._connections:
                conn.retire()
            self._connections = []
            replies = await self._send(payload, len(commands))
        return replies

    async def _send(self, payload: bytes, expected: int) -> list[Any]:
        conn = self._pick()
        if conn is None:
            try:
                async with asyncio.timeout(self.timeout):
                    conn = await self._acquire()
            except TimeoutError:
                raise RespConnectionError(
                    f"no answer from Redis at {self._address} within {self.timeout:g}s"
                ) from None
            except RespReplyLost as exc:  # the connection's setup, not this call, was sent
                raise RespConnectionError(f"cannot reach Redis at {self._address}: {exc}") from exc
            except RespConnectionError:
                raise
            except OSError as exc:
                raise RespConnectionError(f"cannot reach Redis at {self._address}: {exc}") from exc
        return await conn.send(payload, expected)

    async def call(self, *args: bytes | str | int | float) -> Any:
        """Run one command and return its reply; an error reply is raised as RespError."""
        [reply] = await self.execute([args])
        if isinstance(reply, RespError):
            raise reply
        return reply

    @property
    def _address(self) -> str:
        if self.sentinel is not None and not self.host:
            return f"the primary of {self.sentinel.master!r} (not found yet)"
        return self.unix_path or f"{self.host}:{self.port}"

    async def close(self) -> None:
        """Close every connection (pending calls fail with RespConnectionError)."""
        connections, self._connections = self._connections, []
        for conn in connections:
            if conn.transport is not None:
                conn.transport.close()
        recheck, self._recheck = self._recheck, None
        if recheck is not None:
            recheck.cancel()
            await asyncio.wait([recheck])
        sentinels, self._sentinels = self._sentinels, []
        for client in sentinels:
            await client.close()
        await asyncio.sleep(0)


#: What a replica answers a write (its ``READONLY`` error), also when a script
#: that caught the error wraps it in its own (the publish script does).
_READONLY_REPLY = "READONLY You can't write against a read only replica"


def _readonly(reply: Any) -> bool:
    """Whether ``reply`` is a replica's refusal of a write (nothing was written)."""
    if not isinstance(reply, RespError):
        return False
    text = str(reply)
    return text.startswith("READONLY") or _READONLY_REPLY in text


def _check_tls_options(options: dict[str, Any]) -> None:
    unsupported = sorted(k for k in options if k.startswith("ssl_") and k not in _TLS_OPTIONS)
    if unsupported:
        raise ValueError(f"TLS option(s) {', '.join(unsupported)} are not supported")
