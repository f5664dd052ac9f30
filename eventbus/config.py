"""Settings, read from ``EVENTBUS_*`` environment variables or given in code.

Example::

    settings = EventBusSettings(backend="redis", redis_url="redis://my-redis:6379/1")
    bus = EventBus(settings=settings)

An invalid value fails at construction with :class:`ConfigurationError`, whose
message names the environment variable (``EVENTBUS_MAX_RETRIES: ...``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from .exceptions import ConfigurationError

#: Prefix of every environment variable.
ENV_PREFIX = "EVENTBUS_"

BackendName = Literal["sync", "redis", "kafka"]

DEFAULT_BACKEND: BackendName = "sync"
DEFAULT_MAX_RETRIES = 3
#: Seconds before the first retry.
DEFAULT_RETRY_DELAY = 1.0
DEFAULT_RETRY_BACKOFF_FACTOR = 2.0
#: Upper bound of any retry delay, in seconds.
DEFAULT_RETRY_MAX_DELAY = 60.0
DEFAULT_DLQ_ENABLED = True
DEFAULT_DLQ_TOPIC_SUFFIX = ".dlq"
#: Dead letters kept by the in-memory store; the oldest are evicted (and counted).
DEFAULT_DLQ_MAX_SIZE = 10_000
DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_REDIS_MAX_CONNECTIONS = 10
#: Prefix of every Redis key the redis backend writes.
DEFAULT_REDIS_NAMESPACE = "eventbus"
#: Seconds within which a dead worker's in-flight events are handed to another worker.
DEFAULT_REDIS_REDELIVERY_TIMEOUT = 10.0
#: Seconds ``publish`` may take on the redis backend before it raises PublishError.
DEFAULT_REDIS_PUBLISH_TIMEOUT = 2.0
DEFAULT_KAFKA_BOOTSTRAP_SERVERS = "localhost:9092"
#: Where a consumer group without committed offsets starts: the oldest record.
DEFAULT_KAFKA_AUTO_OFFSET_RESET: Literal["earliest", "latest"] = "earliest"
#: Milliseconds without a heartbeat before the group evicts a consumer.
DEFAULT_KAFKA_SESSION_TIMEOUT_MS = 10_000
#: Milliseconds between consumer heartbeats (well under the session timeout).
DEFAULT_KAFKA_HEARTBEAT_INTERVAL_MS = 3_000
#: Seconds a publish may wait for the broker's acknowledgement before PublishError.
DEFAULT_KAFKA_PUBLISH_TIMEOUT = 5.0
#: Records a worker holds (fetched, not yet committed) before it pauses fetching.
DEFAULT_KAFKA_MAX_IN_FLIGHT = 1_000
#: Seconds a revoked partition's in-flight handlers get to finish before it is released.
DEFAULT_KAFKA_REVOKE_TIMEOUT = 5.0
#: Idempotent producer: a retried send is written once (needs acks=all and brokers
#: that give out producer ids: Apache Kafka does; Tansu, used by the tests, does not).
DEFAULT_KAFKA_IDEMPOTENCE = True
#: Default dramatiq queue of handlers that name none.
DEFAULT_QUEUE = "eventbus"
#: Async handlers the embedded backend runs at once on the application's loop.
DEFAULT_MAX_CONCURRENCY = 256
#: Threads running sync handlers in the embedded backend.
DEFAULT_WORKER_THREADS = 8
#: Seconds ``stop()`` waits for in-flight handlers.
DEFAULT_SHUTDOWN_TIMEOUT = 10.0

#: Valid service names (they prefix Redis queue names: ``<service>.<queue>``).
SERVICE_NAME = r"^[a-zA-Z_][a-zA-Z0-9_-]{0,99}$"
#: Service name when none is set and the handlers do not name one package.
DEFAULT_SERVICE = "default"
UnroutedMode = Literal["ignore", "warn", "error"]
#: What a publish to a topic without any subscription does.
DEFAULT_UNROUTED: UnroutedMode = "warn"

#: Largest event ``publish`` accepts, in bytes of JSON (1 MiB: Kafka's default).
DEFAULT_MAX_EVENT_BYTES = 1024 * 1024


class EventBusSettings(BaseSettings):
    """Every setting of the bus; each reads ``EVENTBUS_<NAME>`` from the environment."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    backend: BackendName = Field(DEFAULT_BACKEND, description="sync | redis | kafka")
    #: The service this process belongs to.  It scopes subscriptions and queues on
    #: Redis and is the Kafka consumer group unless ``kafka_group_id`` is set.
    #: Default: the top-level package of the handlers' modules (``myapp`` for
    #: ``myapp.handlers``), else ``default``.
    service: str | None = Field(None, pattern=SERVICE_NAME)
    #: Run handlers in this process on the redis and kafka backends (a
    #: single-process deployment).  Workers (``dramatiq eventbus.actors``) always
    #: do; the embedded ``sync`` backend always does.
    consume: bool = False
    #: ``ignore`` | ``warn`` | ``error``: a publish to a topic that has no
    #: subscription anywhere is counted, and logged at WARNING at most once per
    #: topic per minute (``warn``) or refused with UnroutedError (``error``).
    unrouted: UnroutedMode = DEFAULT_UNROUTED

    max_retries: int = Field(DEFAULT_MAX_RETRIES, ge=0)
    retry_delay: float = Field(DEFAULT_RETRY_DELAY, ge=0)
    retry_backoff_factor: float = Field(DEFAULT_RETRY_BACKOFF_FACTOR, ge=1)
    retry_max_delay: float = Field(DEFAULT_RETRY_MAX_DELAY, ge=0)

    dlq_enabled: bool = DEFAULT_DLQ_ENABLED
    dlq_topic_suffix: str = Field(DEFAULT_DLQ_TOPIC_SUFFIX, min_length=1)
    dlq_max_size: int = Field(DEFAULT_DLQ_MAX_SIZE, ge=1)

    redis_url: str = DEFAULT_REDIS_URL
    redis_max_connections: int = Field(DEFAULT_REDIS_MAX_CONNECTIONS, ge=1)
    redis_namespace: str = Field(DEFAULT_REDIS_NAMESPACE, pattern=r"^[^:\s]+$")
    redis_redelivery_timeout: float = Field(DEFAULT_REDIS_REDELIVERY_TIMEOUT, gt=0)
    redis_publish_timeout: float = Field(DEFAULT_REDIS_PUBLISH_TIMEOUT, gt=0)

    kafka_bootstrap_servers: str = DEFAULT_KAFKA_BOOTSTRAP_SERVERS
    #: Consumer group of this service's workers (default: the service name).
    kafka_group_id: str | None = Field(None, min_length=1)
    kafka_client_id: str = Field("eventbus", min_length=1)
    kafka_auto_offset_reset: Literal["earliest", "latest"] = DEFAULT_KAFKA_AUTO_OFFSET_RESET
    kafka_session_timeout_ms: int = Field(DEFAULT_KAFKA_SESSION_TIMEOUT_MS, ge=1)
    kafka_heartbeat_interval_ms: int = Field(DEFAULT_KAFKA_HEARTBEAT_INTERVAL_MS, ge=1)
    kafka_acks: Literal["all", "1", "0"] = "all"
    #: Idempotent producer (on: a send retried after a lost acknowledgement is
    #: written once, and records of a partition keep their order across retries).
    #: Needs ``kafka_acks=all``; turn it off for brokers without idempotence
    #: support (Tansu; start then fails naming this setting).
    kafka_idempotence: bool = DEFAULT_KAFKA_IDEMPOTENCE
    kafka_publish_timeout: float = Field(DEFAULT_KAFKA_PUBLISH_TIMEOUT, gt=0)
    kafka_max_in_flight: int = Field(DEFAULT_KAFKA_MAX_IN_FLIGHT, ge=1)
    kafka_revoke_timeout: float = Field(DEFAULT_KAFKA_REVOKE_TIMEOUT, ge=0)
    kafka_accept_unknown_types: bool = False
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: str | None = None
    kafka_ssl_certfile: str | None = None
    kafka_ssl_keyfile: str | None = None
    kafka_ssl_password: SecretStr | None = None

    default_queue: str = Field(DEFAULT_QUEUE, pattern=r"^[a-zA-Z_][a-zA-Z0-9._-]*$")
    max_concurrency: int = Field(DEFAULT_MAX_CONCURRENCY, ge=1)
    worker_threads: int = Field(DEFAULT_WORKER_THREADS, ge=1)
    shutdown_timeout: float = Field(DEFAULT_SHUTDOWN_TIMEOUT, ge=0)
    #: Largest event accepted by ``publish``, as JSON bytes.
    max_event_bytes: int = Field(DEFAULT_MAX_EVENT_BYTES, ge=1024)
    #: ``none`` | ``memory`` | ``prometheus``: the collector of a bus built without one.
    metrics: Literal["none", "memory", "prometheus"] = "none"
    #: ``none`` | ``logging`` | ``otel``: the tracer of a bus built without one.
    tracing: Literal["none", "logging", "otel"] = "none"
    #: Port on which worker processes serve Prometheus metrics (unset: not served).
    metrics_port: int | None = Field(None, ge=1, le=65535)
    #: Modules a worker (``dramatiq eventbus.actors``) imports to find handlers,
    #: comma-separated (``EVENTBUS_HANDLERS=myapp.handlers,myapp.audit``).
    handlers: str = ""

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigurationError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else "?"
        value = error.get("input")
        lines.append(f"{ENV_PREFIX}{name.upper()}={value!r}: {error['msg']}")
    return "invalid eventbus settings: " + "; ".join(lines)
