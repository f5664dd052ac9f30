"""No secret leaves eventbus in what it prints: every URL form redis-py's
``from_url`` reads a password from, Kafka's SASL and TLS key passwords, PostgreSQL
DSNs.  The CLI runs as an operator runs it (the installed console script, in a
subprocess) against a real Redis that requires a password, an unreachable Kafka
address and a real PostgreSQL; the oracle for "the password" is the client
libraries' own URL parsers (redis-py, SQLAlchemy), never eventbus's redaction."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from redis.connection import parse_url
from sqlalchemy.engine import make_url

from eventbus import EventBusSettings
from eventbus.health import HealthChecker, HealthStatus
from eventbus.redact import redact, redact_url

pytest.register_assert_rewrite("tests.redis_support")
from tests.redis_support import (  # noqa: E402
    HOST,
    ROOT,
    RedisServer,
    free_port,
    require_redis_server_binary,
)

pytest_plugins = ["tests.redis_support"]
pytestmark = pytest.mark.timeout(60)

#: The console script installed with the package, next to this interpreter.
SCRIPT = Path(sys.executable).with_name("eventbus")
#: The password the test Redis requires; no URL below carries it.
SERVER_PASSWORD = "the-right-one-" + uuid.uuid4().hex[:8]
#: The secret each URL carries (unique per run, so it cannot appear by chance).
SECRET = "hunter2-" + uuid.uuid4().hex[:12]
#: A secret with a raw ``@`` (redis-py splits the userinfo at the last ``@``).
SECRET_AT = f"p@ss-{uuid.uuid4().hex[:6]}@{uuid.uuid4().hex[:6]}"
#: A secret with every character a URL needs percent-encoded.
SECRET_SPECIAL = f"a/b?c#d@e:f%g&h={uuid.uuid4().hex[:6]}"


def pieces(secret: str) -> list[str]:
    """The secret and its parts around ``@`` / ``&`` / ``=``: a redaction that stops
    at the first ``@`` shows the part after it."""
    parts = {secret, quote(secret, safe=""), *secret.replace("&", "@").replace("=", "@").split("@")}
    return sorted(p for p in parts if len(p) >= 4)


#: (id, URL template with {host}, {secret}, the parse_url key that holds the secret,
#: the secret).  Each is a form redis-py's from_url reads that secret from.
REDIS_FORMS = [
    ("userinfo", "redis://admin:{secret}@{host}/0", "password", SECRET),
    ("userinfo-no-user", "redis://:{secret}@{host}/0", "password", SECRET),
    ("userinfo-raw-at", "redis://admin:{secret}@{host}/0", "password", SECRET_AT),
    ("userinfo-encoded", "redis://admin:{encoded}@{host}/0", "password", SECRET_SPECIAL),
    ("query-password", "redis://{host}/0?password={secret}", "password", SECRET),
    ("query-with-user", "redis://admin@{host}/0?db=0&password={secret}", "password", SECRET),
    ("query-raw-at", "redis://{host}/0?password={secret}", "password", SECRET_AT),
    ("query-encoded", "redis://{host}/0?password={encoded}", "password", SECRET_SPECIAL),
    ("query-upper-case", "redis://{host}/0?PASSWORD={secret}", "PASSWORD", SECRET),
    ("query-encoded-name", "redis://{host}/0?pass%77ord={secret}", "password", SECRET),
    (
        "ssl-password",
        "rediss://{host}/0?ssl_cert_reqs=none&ssl_password={secret}",
        "ssl_password",
        SECRET,
    ),
    (
        "rediss-userinfo",
        "rediss://default:{secret}@{host}/0?ssl_cert_reqs=none",
        "password",
        SECRET,
    ),
    (
        "sentinel-password",
        "redis://{host}/0?sentinel_password={secret}",
        "sentinel_password",
        SECRET,
    ),
    ("unix-query", "unix:///tmp/eventbus-no-{tag}.sock?db=0&password={secret}", "password", SECRET),
    ("unix-userinfo", "unix://:{secret}@/tmp/eventbus-no-{tag}.sock", "password", SECRET),
]


def redis_form(template: str, secret: str, host: str) -> str:
    return template.format(
        host=host, secret=secret, encoded=quote(secret, safe=""), tag=uuid.uuid4().hex[:8]
    )


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")}
    full_env.update(env)
    return subprocess.run(
        [str(SCRIPT), *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=40
    )


def assert_no_secret(done: subprocess.CompletedProcess[str], secret: str) -> None:
    output = done.stdout + done.stderr
    for piece in pieces(secret):
        assert piece not in output, (piece, output)


@pytest.fixture(scope="module")
def protected_redis() -> Iterator[RedisServer]:
    """A Redis of our own that refuses every password but :data:`SERVER_PASSWORD`."""
    require_redis_server_binary()
    server = RedisServer().start()
    redis.Redis(host=HOST, port=server.port).config_set("requirepass", SERVER_PASSWORD)
    yield server
    server.stop()


# -- the premise: each form carries its secret the way redis-py reads it -------------------


@pytest.mark.parametrize(
    ("form", "template", "key", "secret"), REDIS_FORMS, ids=[f[0] for f in REDIS_FORMS]
)
def test_each_form_is_one_redis_py_reads_the_secret_from(
    form: str, template: str, key: str, secret: str
) -> None:
    url = redis_form(template, secret, f"{HOST}:6379")

    assert parse_url(url)[key] == secret  # otherwise the rows below prove nothing


# -- the CLI, as run by an operator ---------------------------------------------------------


@pytest.mark.parametrize(
    ("form", "template", "key", "secret"), REDIS_FORMS, ids=[f[0] for f in REDIS_FORMS]
)
def test_the_cli_never_prints_a_redis_secret(
    protected_redis: RedisServer, form: str, template: str, key: str, secret: str
) -> None:
    address = f"{HOST}:{protected_redis.port}"
    url = redis_form(template, secret, address)
    env = {
        "EVENTBUS_BACKEND": "redis",
        "EVENTBUS_REDIS_URL": url,
        "EVENTBUS_REDIS_NAMESPACE": f"redact{uuid.uuid4().hex[:8]}",
        "EVENTBUS_REDIS_PUBLISH_TIMEOUT": "0.5",  # the connect timeout (TLS to a plain port)
    }

    done = run_cli(env, "-v", "dlq", "list")  # -v: the traceback and the libraries' logs too

    assert done.returncode != 0, done.stdout  # the server refused the wrong password
    assert_no_secret(done, secret)
    last = done.stderr.splitlines()[-1]
    assert last.startswith("eventbus: "), done.stderr
    if done.returncode == 3:  # "cannot reach redis at <url>": the address is still shown
        shown = "/tmp/eventbus-no-" if form.startswith("unix") else address  # no such socket
        assert "cannot reach redis at " in last and shown in last, last


def test_the_cli_never_prints_a_secret_of_an_unreachable_redis() -> None:
    address = f"{HOST}:{free_port()}"
    url = f"rediss://admin:{SECRET_AT}@{address}/0?ssl_cert_reqs=none&ssl_password={SECRET}"

    for args in (["dlq", "list"], ["-v", "subscriptions", "list"]):
        done = run_cli({"EVENTBUS_BACKEND": "redis", "EVENTBUS_REDIS_URL": url}, *args)

        assert done.returncode == 3, done.stderr
        assert_no_secret(done, SECRET_AT)
        assert_no_secret(done, SECRET)
        assert f"rediss://admin:***@{address}/0?ssl_cert_reqs=none&ssl_password=***" in done.stderr


@pytest.mark.parametrize(
    "variable", ["EVENTBUS_KAFKA_SASL_PASSWORD", "EVENTBUS_KAFKA_SSL_PASSWORD"]
)
def test_the_cli_never_prints_a_kafka_password(variable: str) -> None:
    env = {
        "EVENTBUS_BACKEND": "kafka",
        "EVENTBUS_KAFKA_BOOTSTRAP_SERVERS": f"{HOST}:{free_port()}",
        "EVENTBUS_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "EVENTBUS_KAFKA_SASL_MECHANISM": "PLAIN",
        "EVENTBUS_KAFKA_SASL_USERNAME": "app",
        "EVENTBUS_KAFKA_SASL_PASSWORD": "unused-" + uuid.uuid4().hex,
        variable: SECRET_AT,
    }

    done = run_cli(env, "-v", "dlq", "list")

    assert done.returncode == 3, done.stderr
    assert_no_secret(done, SECRET_AT)


#: PostgreSQL DSN forms: (id, template, database reachable, given as option or environment).
PG_FORMS = [
    ("userinfo", "postgresql+asyncpg://app:{secret}@{host}/{db}", False, "option"),
    ("userinfo", "postgresql+asyncpg://app:{secret}@{host}/{db}", True, "environment"),
    ("userinfo-raw-at", "postgresql+asyncpg://app:{secret}@{host}/{db}", True, "option"),
    (
        "query-password",
        "postgresql+asyncpg://app@{host}/{db}?password={secret}",
        False,
        "environment",
    ),
    ("query-password", "postgresql+asyncpg://app@{host}/{db}?password={secret}", True, "option"),
]


@pytest.mark.parametrize(
    ("form", "template", "reachable", "where"),
    PG_FORMS,
    ids=[f"{f[0]}-{'no-such-database' if f[2] else 'unreachable'}-{f[3]}" for f in PG_FORMS],
)
def test_the_cli_never_prints_a_database_password(
    redis_url: str, form: str, template: str, reachable: bool, where: str
) -> None:
    secret = SECRET_AT if "raw-at" in form else SECRET
    host = f"{HOST}:5432" if reachable else f"{HOST}:{free_port()}"
    dsn = template.format(secret=secret, host=host, db=f"no_such_db_{uuid.uuid4().hex[:8]}")
    assert secret.startswith(make_url(dsn).password or make_url(dsn).query["password"])  # type: ignore[arg-type]
    env = {
        "EVENTBUS_BACKEND": "redis",
        "EVENTBUS_REDIS_URL": redis_url,
        "EVENTBUS_REDIS_NAMESPACE": f"redact{uuid.uuid4().hex[:8]}",
    }
    args = ["-v", "outbox", "relay"]
    if where == "option":
        args += ["--database-url", dsn]
    else:
        env["EVENTBUS_OUTBOX_DATABASE_URL"] = dsn

    done = run_cli(env, *args)

    assert done.returncode != 0, done.stdout
    assert_no_secret(done, secret)
    last = done.stderr.splitlines()[-1]
    assert "database" in last, last  # the error is about the database, not the backend


def test_the_settings_reference_shows_no_configured_secret() -> None:
    env = {
        "EVENTBUS_REDIS_URL": f"redis://:{SECRET}@{HOST}/0",
        "EVENTBUS_KAFKA_SASL_PASSWORD": SECRET,
    }

    done = run_cli(env, "settings")

    assert done.returncode == 0, done.stderr
    assert_no_secret(done, SECRET)


# -- the library: settings, health details, free text ------------------------------------


def test_settings_repr_hides_the_redis_url_password_and_secret_settings() -> None:
    settings = EventBusSettings(
        redis_url=f"redis://admin:{SECRET_AT}@{HOST}/0?ssl_password={SECRET}",
        kafka_sasl_password=SECRET,
    )

    shown = repr(settings) + str(settings)

    assert_no_secret_text(shown, SECRET_AT)
    assert_no_secret_text(shown, SECRET)
    assert f"admin:***@{HOST}/0" in shown


def assert_no_secret_text(text: str, secret: str) -> None:
    for piece in pieces(secret):
        assert piece not in text, (piece, text)


class _FailingBackend:
    name = "redis"

    def __init__(self, message: str) -> None:
        self.message = message

    async def health(self) -> list[object]:
        raise ConnectionError(self.message)


async def test_health_details_hide_passwords_in_urls() -> None:
    url = f"redis://admin:{SECRET_AT}@{HOST}:1/0?password={SECRET}"
    checker = HealthChecker(_FailingBackend(f"cannot connect to {url}"))  # type: ignore[arg-type]

    [result] = await checker.check()

    assert result.status is HealthStatus.UNHEALTHY
    assert_no_secret_text(result.detail, SECRET_AT)
    assert_no_secret_text(result.detail, SECRET)
    assert f"{HOST}:1/0" in result.detail


@pytest.mark.parametrize(
    ("form", "template", "key", "secret"), REDIS_FORMS, ids=[f[0] for f in REDIS_FORMS]
)
def test_redact_url_hides_what_redis_py_reads_and_keeps_the_address(
    form: str, template: str, key: str, secret: str
) -> None:
    url = redis_form(template, secret, f"{HOST}:6379")
    parsed = parse_url(url)

    for shown in (redact_url(url), redact(f"cannot reach {url} (refused)")):
        assert_no_secret_text(shown, str(parsed[key]))
        assert_no_secret_text(shown, secret)
        assert (parsed.get("host") or parsed.get("path")) in shown


@pytest.mark.parametrize(
    "dsn",
    [
        f"postgresql://app:{SECRET}@db.internal:5432/app",
        f"postgresql+asyncpg://app:{SECRET_AT}@db.internal/app",
        f"postgresql+psycopg://app@db.internal/app?password={SECRET}&sslmode=require",
        f"postgresql://app@db.internal/app?sslpassword={SECRET}",
    ],
)
def test_redact_url_hides_what_sqlalchemy_reads_from_a_dsn(dsn: str) -> None:
    url = make_url(dsn)
    secrets = [
        s for s in (url.password, url.query.get("password"), url.query.get("sslpassword")) if s
    ]
    assert secrets  # otherwise the test proves nothing

    shown = redact_url(dsn)

    for secret in secrets:
        assert_no_secret_text(shown, str(secret))
    assert "db.internal" in shown and shown.startswith(dsn.split("://")[0])


def test_redact_hides_a_libpq_keyword_dsn_and_a_dict_repr() -> None:
    text = f"host=db password={SECRET} user=app; {{'sasl_plain_password': '{SECRET_AT}'}}"

    shown = redact(text)

    assert_no_secret_text(shown, SECRET)
    assert_no_secret_text(shown, SECRET_AT)
    assert "host=db" in shown and "user=app" in shown
