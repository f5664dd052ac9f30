"""Settings that cannot work are refused when they are read, naming the variable, the
value and what is allowed: infinite, NaN and absurdly large durations, timeouts,
delays, sizes and counts.  Before, ``EVENTBUS_REDIS_REDELIVERY_TIMEOUT=inf`` started
a worker that never consumed, ``EVENTBUS_REDIS_PUBLISH_TIMEOUT=inf`` a publish that
could block for ever, and ``EVENTBUS_RETRY_DELAY=inf`` or ``EVENTBUS_MAX_RETRIES``
>= 1024 (``2.0 ** attempt`` overflows) made a failing handler's retry raise."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from typing import get_args

import pytest

from eventbus import ConfigurationError, EventBusSettings

pytest.register_assert_rewrite("tests.redis_support")
from tests.redis_support import ROOT  # noqa: E402

pytest_plugins = ["tests.redis_support"]
pytestmark = pytest.mark.timeout(60)

#: A whole number far beyond any sane count or size (and beyond a C ``ssize_t``).
HUGE = "1" + "0" * 30

#: (variable, value) pairs that must be refused, each with what it broke or would break.
REFUSED = [
    ("EVENTBUS_MAX_RETRIES", "1024"),  # 2.0 ** 1024 overflows in the backoff
    ("EVENTBUS_MAX_RETRIES", "1001"),
    ("EVENTBUS_MAX_RETRIES", HUGE),
    ("EVENTBUS_MAX_RETRIES", "-1"),
    ("EVENTBUS_RETRY_DELAY", "inf"),  # the retry middleware raised: pending 0, no dead letter
    ("EVENTBUS_RETRY_DELAY", "nan"),
    ("EVENTBUS_RETRY_DELAY", "-inf"),
    ("EVENTBUS_RETRY_DELAY", "1e12"),
    ("EVENTBUS_RETRY_BACKOFF_FACTOR", "inf"),
    ("EVENTBUS_RETRY_BACKOFF_FACTOR", "nan"),
    ("EVENTBUS_RETRY_BACKOFF_FACTOR", "1e6"),
    ("EVENTBUS_RETRY_MAX_DELAY", "inf"),
    ("EVENTBUS_RETRY_MAX_DELAY", "nan"),
    ("EVENTBUS_RETRY_MAX_DELAY", "1e300"),
    ("EVENTBUS_DLQ_MAX_SIZE", HUGE),
    ("EVENTBUS_DLQ_MAX_BYTES", HUGE),
    ("EVENTBUS_REDIS_MAX_CONNECTIONS", HUGE),
    ("EVENTBUS_REDIS_REDELIVERY_TIMEOUT", "inf"),  # the worker stopped consuming
    ("EVENTBUS_REDIS_REDELIVERY_TIMEOUT", "nan"),
    ("EVENTBUS_REDIS_REDELIVERY_TIMEOUT", "1e12"),
    ("EVENTBUS_REDIS_REDELIVERY_TIMEOUT", "0.001"),  # heartbeats every 0.13 ms
    ("EVENTBUS_REDIS_PUBLISH_TIMEOUT", "inf"),  # publish blocked while Redis was down
    ("EVENTBUS_REDIS_PUBLISH_TIMEOUT", "nan"),
    ("EVENTBUS_REDIS_PUBLISH_TIMEOUT", "1e12"),
    ("EVENTBUS_REDIS_PUBLISH_TIMEOUT", "0"),
    ("EVENTBUS_KAFKA_SESSION_TIMEOUT_MS", HUGE),
    ("EVENTBUS_KAFKA_HEARTBEAT_INTERVAL_MS", HUGE),
    ("EVENTBUS_KAFKA_PUBLISH_TIMEOUT", "inf"),
    ("EVENTBUS_KAFKA_PUBLISH_TIMEOUT", "nan"),
    ("EVENTBUS_KAFKA_MAX_IN_FLIGHT", HUGE),
    ("EVENTBUS_KAFKA_REVOKE_TIMEOUT", "inf"),
    ("EVENTBUS_KAFKA_REVOKE_TIMEOUT", "nan"),
    ("EVENTBUS_MAX_CONCURRENCY", HUGE),
    ("EVENTBUS_WORKER_THREADS", HUGE),
    ("EVENTBUS_SHUTDOWN_TIMEOUT", "inf"),
    ("EVENTBUS_SHUTDOWN_TIMEOUT", "nan"),
    ("EVENTBUS_MAX_EVENT_BYTES", HUGE),
    ("EVENTBUS_METRICS_PORT", "65536"),
]

#: The largest (or smallest) value of a bound, accepted as is.
ACCEPTED = [
    ("EVENTBUS_MAX_RETRIES", "1000"),
    ("EVENTBUS_MAX_RETRIES", "0"),
    ("EVENTBUS_RETRY_DELAY", "604800"),
    ("EVENTBUS_RETRY_MAX_DELAY", "604800"),
    ("EVENTBUS_RETRY_BACKOFF_FACTOR", "100"),
    ("EVENTBUS_REDIS_REDELIVERY_TIMEOUT", "1"),
    ("EVENTBUS_REDIS_REDELIVERY_TIMEOUT", "86400"),
    ("EVENTBUS_REDIS_PUBLISH_TIMEOUT", "3600"),
    ("EVENTBUS_SHUTDOWN_TIMEOUT", "0"),
    ("EVENTBUS_KAFKA_SESSION_TIMEOUT_MS", "3600000"),
]


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("EVENTBUS_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize(("variable", "value"), REFUSED)
def test_a_setting_that_cannot_work_is_refused_naming_variable_value_and_range(
    clean_environment: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    clean_environment.setenv(variable, value)

    with pytest.raises(ConfigurationError) as refused:
        EventBusSettings()

    message = str(refused.value)
    assert f"{variable}={value!r}" in message, message
    assert "allowed: " in message and "≤" in message, message  # what to set instead


@pytest.mark.parametrize(("variable", "value"), ACCEPTED)
def test_the_bounds_themselves_are_accepted(
    clean_environment: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    clean_environment.setenv(variable, value)

    settings = EventBusSettings()

    assert getattr(settings, variable.removeprefix("EVENTBUS_").lower()) == float(value)


def test_every_numeric_setting_refuses_infinity_and_a_huge_value(
    clean_environment: pytest.MonkeyPatch,
) -> None:
    """Every int and float setting, those added later included, has bounds."""
    for name, field in EventBusSettings.model_fields.items():
        kinds = {field.annotation, *get_args(field.annotation)}
        if not {int, float} & kinds:
            continue
        for value in ("inf", "nan", HUGE) if float in kinds else (HUGE,):
            with pytest.raises(ConfigurationError, match=f"EVENTBUS_{name.upper()}="):
                EventBusSettings(**{name: value})


def test_a_heartbeat_at_or_over_the_session_timeout_is_refused_naming_both(
    clean_environment: pytest.MonkeyPatch,
) -> None:
    clean_environment.setenv("EVENTBUS_KAFKA_SESSION_TIMEOUT_MS", "3000")
    clean_environment.setenv("EVENTBUS_KAFKA_HEARTBEAT_INTERVAL_MS", "3000")

    with pytest.raises(ConfigurationError) as refused:
        EventBusSettings()

    message = str(refused.value)
    assert "EVENTBUS_KAFKA_HEARTBEAT_INTERVAL_MS=3000" in message
    assert "EVENTBUS_KAFKA_SESSION_TIMEOUT_MS=3000" in message


def test_values_given_in_code_are_checked_too() -> None:
    with pytest.raises(ConfigurationError, match="EVENTBUS_REDIS_PUBLISH_TIMEOUT=inf"):
        EventBusSettings(redis_publish_timeout=float("inf"))


# -- a worker process refuses to start -----------------------------------------------------

#: Seconds a worker may take to start and refuse (a worker that starts never exits).
REFUSE_WITHIN = 30.0


@pytest.mark.parametrize(
    ("backend", "variable", "value"),
    [
        ("redis", "EVENTBUS_REDIS_REDELIVERY_TIMEOUT", "inf"),
        ("redis", "EVENTBUS_REDIS_PUBLISH_TIMEOUT", "inf"),
        ("redis", "EVENTBUS_RETRY_DELAY", "inf"),
        ("redis", "EVENTBUS_MAX_RETRIES", "1024"),
        ("kafka", "EVENTBUS_KAFKA_REVOKE_TIMEOUT", "inf"),
    ],
)
def test_a_worker_with_a_setting_that_cannot_work_exits_non_zero_naming_it(
    redis_url: str, backend: str, variable: str, value: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")}
    env.update(
        {
            "EVENTBUS_BACKEND": backend,
            "EVENTBUS_REDIS_URL": redis_url,
            "EVENTBUS_REDIS_NAMESPACE": f"refuse{uuid.uuid4().hex[:8]}",
            "EVENTBUS_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9",
            "EVENTBUS_KAFKA_IDEMPOTENCE": "false",
            variable: value,
        }
    )
    command = [sys.executable, "-m", "dramatiq", "eventbus.actors", "tests.redis_handlers"]
    worker = subprocess.Popen(
        [*command, "--processes", "1", "--threads", "1"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = worker.communicate(timeout=REFUSE_WITHIN)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        output, _ = worker.communicate()
        pytest.fail(f"the worker started with {variable}={value}:\n{output[-2000:]}")

    assert worker.returncode != 0, output
    assert f"{variable}={value!r}" in output, output
    assert "allowed: " in output, output
