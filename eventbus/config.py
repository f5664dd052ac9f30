"""Settings, read from ``EVENTBUS_*`` environment variables or given in code.

Example::

    settings = EventBusSettings(backend="redis", redis_url="redis://my-redis:6379/1")
    bus = EventBus(settings=settings)

An invalid value fails at construction with :class:`ConfigurationError`, whose
message names the environment variable (``EVENTBUS_MAX_RETRIES: ...``).  A
setting that needs an extra that is not installed (``EVENTBUS_BACKEND=redis``
without ``fastapi-eventbus[redis]``) fails with
:class:`~eventbus.extras.MissingExtraError` naming it.  An ``EVENTBUS_*``
variable that is no setting (a typo) is logged at WARNING, once per process,
with the closest setting's name.

Every setting's meaning is its field's ``description``: ``eventbus settings``
prints the reference (docs/settings.md) from them.

One concept past ~500 lines: the settings; most of the module is the
declaration of each field with its description, from which the settings
reference is generated.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import annotated_types
from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from eventbus.exceptions import ConfigurationError
from eventbus.extras import require_extra
from eventbus.redact import MASK, is_secret_name, redact

logger = logging.getLogger(__name__)

#: Prefix of every environment variable.
ENV_PREFIX = "EVENTBUS_"

#: ``EVENTBUS_*`` variables that are not settings and are never warned about: the
#: project's reliability suite (tests/reliability) reads them.
NOT_SETTINGS = frozenset({"EVENTBUS_RELIABILITY_PROFILE", "EVENTBUS_RELIABILITY_RESULTS"})
#: Prefix of variables reserved for test suites: never settings, never warned about.
TEST_PREFIX = "EVENTBUS_TEST_"
#: Settings of optional parts, read under a prefix of their own: prefix -> (module,
#: class, extra).  Their variables are checked against that class once its module
#: is imported (importing it here would need its extra).
SETTINGS_GROUPS: dict[str, tuple[str, str, str]] = {
    "EVENTBUS_OUTBOX_": ("eventbus.outbox.outbox", "OutboxSettings", "outbox"),
}

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
#: Bytes of dead letters (their JSON) the Redis store keeps; the oldest are evicted.
DEFAULT_DLQ_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_REDIS_MAX_CONNECTIONS = 10
#: Prefix of every Redis key the redis backend writes.
DEFAULT_REDIS_NAMESPACE = "eventbus"
#: Seconds within which a dead worker's in-flight events are handed to another worker.
DEFAULT_REDIS_REDELIVERY_TIMEOUT = 5.0
#: Seconds ``publish`` may take on the redis backend before it raises PublishError.
DEFAULT_REDIS_PUBLISH_TIMEOUT = 2.0
#: Seconds an event published to a topic without a subscription is kept for the
#: subscription written next (a worker that starts after the web process).
DEFAULT_REDIS_UNROUTED_RETENTION = 3600.0
#: Events kept per topic without a subscription (the oldest are dropped first).
DEFAULT_REDIS_UNROUTED_MAX_EVENTS = 10_000
#: Bytes kept per topic without a subscription (64 MiB; the oldest are dropped first).
DEFAULT_REDIS_UNROUTED_MAX_BYTES = 64 * 1024 * 1024
#: Seconds after a topic's first subscription during which all of its events are kept,
#: for the other services' subscriptions written moments later (a Redis restart).
DEFAULT_REDIS_UNROUTED_WARMUP = 60.0
#: Replicas that must acknowledge each publish before it returns (0: none, the
#: primary's answer is enough; Redis replicates asynchronously).
DEFAULT_REDIS_MIN_REPLICAS = 0
#: Seconds a publish waits for ``redis_min_replicas`` replicas (Redis ``WAIT``) before
#: PublishError; under ``DEFAULT_REDIS_PUBLISH_TIMEOUT``, which bounds the whole call.
DEFAULT_REDIS_REPLICA_TIMEOUT = 1.0
#: Wait for the replicas' fsync of their append-only file (``WAITAOF``, Redis 7.2+)
#: instead of their receipt of the write (``WAIT``).
DEFAULT_REDIS_REPLICA_FSYNC = False
#: How ``dramatiq eventbus.actors`` runs Redis handlers (see ``eventbus.redis.worker``).
DEFAULT_REDIS_WORKER: Literal["loop", "threads"] = "loop"
#: Most replicas a publish may be asked to wait for.
MAX_REDIS_MIN_REPLICAS = 100
#: Longest unrouted retention or warm-up, in seconds (a week).
MAX_REDIS_UNROUTED_SECONDS = 7 * 24 * 3600.0
#: Most events and bytes per topic the unrouted window may be asked to keep.
MAX_REDIS_UNROUTED_EVENTS = 10_000_000
MAX_REDIS_UNROUTED_BYTES = 64 * 1024**3
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
#: Workers leave the cyclic garbage collector alone unless asked (see ``worker_gc_freeze``).
DEFAULT_WORKER_GC_FREEZE = False

#: Valid service names (they prefix Redis queue names: ``<service>.<queue>``).
SERVICE_NAME = r"^[a-zA-Z_][a-zA-Z0-9_-]{0,99}$"
#: Service name when none is set and the handlers do not name one package.
DEFAULT_SERVICE = "default"
UnroutedMode = Literal["ignore", "warn", "error"]
#: What a publish to a topic without any subscription does.
DEFAULT_UNROUTED: UnroutedMode = "warn"
SchemaCheckMode = Literal["off", "warn", "error"]
#: What a publisher does when a live subscriber's stored schema would reject an
#: event class it publishes (checked once per class and topic, not per event).
DEFAULT_SCHEMA_CHECK: SchemaCheckMode = "warn"

#: Largest event ``publish`` accepts, in bytes of JSON (1 MiB: Kafka's default).
DEFAULT_MAX_EVENT_BYTES = 1024 * 1024

# Bounds of the numeric settings: a value outside them (infinite, NaN, absurdly
# large) is refused when the settings are built, naming the variable, instead of
# stopping a worker or a publish later.
#: Most retries of a handler: the backoff ``factor ** attempt`` stays finite (2.0 **
#: 1024 overflows) and a poison event dies within days, not months.
MAX_RETRIES_LIMIT = 1_000
#: Longest retry delay, in seconds (a week: dramatiq's own cap on a backoff).
MAX_RETRY_DELAY_LIMIT = 7 * 24 * 3600.0
#: Largest retry backoff factor.
MAX_BACKOFF_FACTOR_LIMIT = 100.0
#: Longest timeout or wait, in seconds (an hour: a call stuck longer is not slow, it hangs).
MAX_TIMEOUT_LIMIT = 3600.0
#: Shortest redelivery timeout, in seconds (workers beat 7.5 times per timeout: 0.13 s).
MIN_REDELIVERY_TIMEOUT = 1.0
#: Longest redelivery timeout, in seconds (a day).
MAX_REDELIVERY_TIMEOUT = 24 * 3600.0
#: Longest Kafka session timeout, in milliseconds (an hour; brokers cap it at 30 min
#: by default, ``group.max.session.timeout.ms``).
MAX_KAFKA_SESSION_TIMEOUT_MS = 3_600_000
#: Most dead letters the in-memory and Redis stores may be asked to keep.
MAX_DLQ_SIZE_LIMIT = 10_000_000
#: Most bytes of dead letters the Redis store may be asked to keep (64 GiB).
MAX_DLQ_BYTES_LIMIT = 64 * 1024**3
#: Most connections of the publishing Redis client, per event loop.
MAX_REDIS_CONNECTIONS_LIMIT = 10_000
#: Most records a Kafka worker may hold in flight.
MAX_IN_FLIGHT_LIMIT = 1_000_000
#: Most async handlers running at once.
MAX_CONCURRENCY_LIMIT = 100_000
#: Most threads for sync handlers.
MAX_WORKER_THREADS_LIMIT = 1_024
#: Largest event size limit, in bytes (512 MiB: Redis' largest string).
MAX_EVENT_BYTES_LIMIT = 512 * 1024 * 1024

#: The extra each setting value needs: (setting, value) -> extra.
_EXTRA_OF_VALUE: dict[tuple[str, str], str] = {
    ("backend", "redis"): "redis",
    ("backend", "kafka"): "kafka",
    ("metrics", "prometheus"): "prometheus",
    ("tracing", "otel"): "otel",
}


class EventBusSettings(BaseSettings):
    """Every setting of the bus; each reads ``EVENTBUS_<NAME>`` from the environment."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    backend: BackendName = Field(
        DEFAULT_BACKEND,
        description="Where events go: `sync` runs handlers in this process (nothing "
        "survives a restart); `redis` and `kafka` deliver them durably to worker "
        "processes (extras `redis`, `kafka`).",
    )
    service: str | None = Field(
        None,
        pattern=SERVICE_NAME,
        description="The service this process belongs to. It scopes subscriptions and "
        "queues on Redis and is the Kafka consumer group unless `kafka_group_id` is set. "
        "Unset: the top-level package of the handlers' modules (`myapp` for "
        "`myapp.handlers`), else `default`.",
    )
    consume: bool = Field(
        False,
        description="Run handlers in this process on the redis and kafka backends (a "
        "single-process deployment). Workers (`dramatiq eventbus.actors`) always do; the "
        "`sync` backend always does.",
    )
    unrouted: UnroutedMode = Field(
        DEFAULT_UNROUTED,
        description="A publish to a topic that has no subscription anywhere is counted, "
        "and then ignored (`ignore`), logged at WARNING at most once per topic per minute "
        "(`warn`) or refused with UnroutedError (`error`).",
    )
    schema_check: SchemaCheckMode = Field(
        DEFAULT_SCHEMA_CHECK,
        description="What a publisher does when the stored schema of a live subscriber "
        "of the topic would reject the event class it publishes (workers store each "
        "typed handler's schema: with its subscription on Redis, in the compacted topic "
        "`eventbus.schemas` on Kafka; checked once per class and "
        "topic, refreshed every 30 s): nothing (`off`), a WARNING once per class and "
        "subscriber naming the field, plus the `eventbus_schema_mismatch_total` metric "
        "per event (`warn`), or SchemaMismatchError, nothing published (`error`).",
    )

    max_retries: int = Field(
        DEFAULT_MAX_RETRIES,
        ge=0,
        le=MAX_RETRIES_LIMIT,
        description="Retries of a failed handler before its event is dead-lettered "
        "(0: dead-lettered at the first failure).",
    )
    retry_delay: float = Field(
        DEFAULT_RETRY_DELAY,
        ge=0,
        le=MAX_RETRY_DELAY_LIMIT,
        allow_inf_nan=False,
        description="Seconds before the first retry.",
    )
    retry_backoff_factor: float = Field(
        DEFAULT_RETRY_BACKOFF_FACTOR,
        ge=1,
        le=MAX_BACKOFF_FACTOR_LIMIT,
        allow_inf_nan=False,
        description="Each retry waits this many times longer than the previous one.",
    )
    retry_max_delay: float = Field(
        DEFAULT_RETRY_MAX_DELAY,
        ge=0,
        le=MAX_RETRY_DELAY_LIMIT,
        allow_inf_nan=False,
        description="Upper bound of any retry delay, in seconds.",
    )

    dlq_enabled: bool = Field(
        DEFAULT_DLQ_ENABLED,
        description="Keep the events whose handler failed every attempt as dead letters "
        "(list, replay, purge them). Off: they are logged at ERROR and dropped.",
    )
    dlq_topic_suffix: str = Field(
        DEFAULT_DLQ_TOPIC_SUFFIX,
        min_length=1,
        description="Kafka: dead letters of topic `T` go to topic `T` + this suffix.",
    )
    dlq_max_size: int = Field(
        DEFAULT_DLQ_MAX_SIZE,
        ge=1,
        le=MAX_DLQ_SIZE_LIMIT,
        description="Dead letters kept by the in-memory store (`sync` backend) and the "
        "Redis store; the oldest are evicted, and counted.",
    )
    dlq_max_bytes: int = Field(
        DEFAULT_DLQ_MAX_BYTES,
        ge=64 * 1024,
        le=MAX_DLQ_BYTES_LIMIT,
        description="Bytes of dead letters (their JSON) the Redis store keeps; the oldest are "
        "evicted, and counted. A record over a tenth of it is cut to fit (error and "
        "traceback first, then the payload).",
    )

    redis_url: str = Field(
        DEFAULT_REDIS_URL,
        description="Redis server of the redis backend (`redis://`, `rediss://` for TLS, "
        "`unix://`; user, password and database in the URL), or its Sentinels "
        "(`redis+sentinel://host1:26379,host2:26379/<master-name>[/db]`, "
        "`?sentinel_password=`; see docs/redis.md, Sentinel). Errors, logs, health details "
        "and the CLI show it with its password (userinfo or `?password=`, "
        "`ssl_password=`...) as `***`.",
    )
    redis_max_connections: int = Field(
        DEFAULT_REDIS_MAX_CONNECTIONS,
        ge=1,
        le=MAX_REDIS_CONNECTIONS_LIMIT,
        description="Connections the publishing Redis client may open, per event loop.",
    )
    redis_namespace: str = Field(
        DEFAULT_REDIS_NAMESPACE,
        pattern=r"^[^:\s]+$",
        description="Prefix of every Redis key the redis backend writes (several "
        "deployments can share one Redis database).",
    )
    redis_redelivery_timeout: float = Field(
        DEFAULT_REDIS_REDELIVERY_TIMEOUT,
        ge=MIN_REDELIVERY_TIMEOUT,
        le=MAX_REDELIVERY_TIMEOUT,
        allow_inf_nan=False,
        description="Seconds within which the events a dead worker held are handed to "
        "another worker.",
    )
    redis_publish_timeout: float = Field(
        DEFAULT_REDIS_PUBLISH_TIMEOUT,
        gt=0,
        le=MAX_TIMEOUT_LIMIT,
        allow_inf_nan=False,
        description="Seconds `publish` may take on the redis backend before it raises "
        "PublishError.",
    )
    redis_min_replicas: int = Field(
        DEFAULT_REDIS_MIN_REPLICAS,
        ge=0,
        le=MAX_REDIS_MIN_REPLICAS,
        description="Replicas that must acknowledge a publish before it returns (Redis "
        "`WAIT`, sent with the fan-out in one round trip); fewer within "
        "`redis_replica_timeout`: PublishError (the event is on the primary and may still "
        "be delivered). 0: the primary's answer is enough (a primary that dies before "
        "replicating loses the last events). Covers `publish`, `publish_many` and the "
        "outbox relay, not the workers' acks and retries.",
    )
    redis_replica_timeout: float = Field(
        DEFAULT_REDIS_REPLICA_TIMEOUT,
        gt=0,
        le=MAX_TIMEOUT_LIMIT,
        allow_inf_nan=False,
        description="Seconds a publish waits for `redis_min_replicas` replicas to "
        "acknowledge it (rounded up to the millisecond). Must be under "
        "`redis_publish_timeout`, which bounds the whole call.",
    )
    redis_replica_fsync: bool = Field(
        DEFAULT_REDIS_REPLICA_FSYNC,
        description="With `redis_min_replicas`: wait until that many replicas wrote the "
        "event to their append-only file on disk (Redis `WAITAOF`, Redis 7.2 and later; "
        "an older server fails the publish, naming this setting) instead of until they "
        "received it (`WAIT`).",
    )
    redis_worker: Literal["loop", "threads"] = Field(
        DEFAULT_REDIS_WORKER,
        description="How a Redis worker (`dramatiq eventbus.actors`) runs handlers: "
        "`loop` (the default) takes events from Redis on one event loop and runs async "
        "handlers there, sync ones in `--threads` threads: no thread hop, a lower latency "
        "and less worker CPU per event (about half of `threads`' with one process); `threads` on "
        "dramatiq's worker threads (async handlers through its AsyncIO middleware: two "
        "thread hops per event; batches once it falls behind). docs/redis.md compares them.",
    )
    redis_unrouted_retention: float = Field(
        DEFAULT_REDIS_UNROUTED_RETENTION,
        ge=0,
        le=MAX_REDIS_UNROUTED_SECONDS,
        allow_inf_nan=False,
        description="Seconds an event published to a topic without a subscription is "
        "kept in Redis and handed to the subscription written within them (a worker "
        "started after the web process); older ones are dropped and counted. 0: dropped "
        "at once.",
    )
    redis_unrouted_max_events: int = Field(
        DEFAULT_REDIS_UNROUTED_MAX_EVENTS,
        ge=0,
        le=MAX_REDIS_UNROUTED_EVENTS,
        description="Events kept per topic without a subscription (see "
        "`redis_unrouted_retention`); the oldest are dropped first.",
    )
    redis_unrouted_max_bytes: int = Field(
        DEFAULT_REDIS_UNROUTED_MAX_BYTES,
        ge=0,
        le=MAX_REDIS_UNROUTED_BYTES,
        description="Bytes kept per topic without a subscription (see "
        "`redis_unrouted_retention`); the oldest are dropped first.",
    )
    redis_unrouted_warmup: float = Field(
        DEFAULT_REDIS_UNROUTED_WARMUP,
        ge=0,
        le=MAX_REDIS_UNROUTED_SECONDS,
        allow_inf_nan=False,
        description="Seconds after a topic's first subscription during which all of "
        "its events are kept, so that other services' subscriptions written moments "
        "later (workers coming back one by one after a Redis restart) get them too.",
    )

    kafka_bootstrap_servers: str = Field(
        DEFAULT_KAFKA_BOOTSTRAP_SERVERS,
        description="Kafka brokers to connect to, comma-separated `host:port`.",
    )
    kafka_group_id: str | None = Field(
        None,
        min_length=1,
        description="Consumer group of this service's workers. Unset: the service name.",
    )
    kafka_client_id: str = Field(
        "eventbus",
        min_length=1,
        description="Client id the Kafka clients send (shown in broker logs and quotas).",
    )
    kafka_auto_offset_reset: Literal["earliest", "latest"] = Field(
        DEFAULT_KAFKA_AUTO_OFFSET_RESET,
        description="Where a consumer group without committed offsets starts: the oldest "
        "record (`earliest`) or only new ones (`latest`).",
    )
    kafka_session_timeout_ms: int = Field(
        DEFAULT_KAFKA_SESSION_TIMEOUT_MS,
        ge=1,
        le=MAX_KAFKA_SESSION_TIMEOUT_MS,
        description="Milliseconds without a heartbeat before the group evicts a worker "
        "and hands its partitions to the others.",
    )
    kafka_heartbeat_interval_ms: int = Field(
        DEFAULT_KAFKA_HEARTBEAT_INTERVAL_MS,
        ge=1,
        le=MAX_KAFKA_SESSION_TIMEOUT_MS,
        description="Milliseconds between consumer heartbeats (under the session timeout; "
        "a third of it or less is usual).",
    )
    kafka_acks: Literal["all", "1", "0"] = Field(
        "all",
        description="Acknowledgement a publish waits for: every in-sync replica (`all`), "
        "the leader (`1`) or none (`0`: events can be lost).",
    )
    kafka_idempotence: bool = Field(
        DEFAULT_KAFKA_IDEMPOTENCE,
        description="Idempotent producer: a send retried after a lost acknowledgement is "
        "written once, and records of a partition keep their order across retries. Needs "
        "`kafka_acks=all`; turn it off for brokers without idempotence support (Tansu: "
        "start then fails naming this setting).",
    )
    kafka_publish_timeout: float = Field(
        DEFAULT_KAFKA_PUBLISH_TIMEOUT,
        gt=0,
        le=MAX_TIMEOUT_LIMIT,
        allow_inf_nan=False,
        description="Seconds a publish may wait for the broker's acknowledgement before "
        "PublishError.",
    )
    kafka_max_in_flight: int = Field(
        DEFAULT_KAFKA_MAX_IN_FLIGHT,
        ge=1,
        le=MAX_IN_FLIGHT_LIMIT,
        description="Records a worker holds (fetched, not yet committed) before it pauses "
        "fetching; shared equally by its partitions.",
    )
    kafka_revoke_timeout: float = Field(
        DEFAULT_KAFKA_REVOKE_TIMEOUT,
        ge=0,
        le=MAX_TIMEOUT_LIMIT,
        allow_inf_nan=False,
        description="Seconds a revoked partition's in-flight handlers get to finish before "
        "it is released to another worker.",
    )
    kafka_accept_unknown_types: bool = Field(
        False,
        description="Hand records whose event type is not registered in this process to "
        "the handlers as UnknownEvent (fields kept) instead of dead-lettering them.",
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="How the Kafka clients connect: TLS, SASL, both or neither."
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism (with `SASL_PLAINTEXT` or `SASL_SSL`)."
    )
    kafka_sasl_username: str | None = Field(None, description="SASL user name.")
    kafka_sasl_password: SecretStr | None = Field(
        None, description="SASL password (never logged or shown)."
    )
    kafka_ssl_cafile: str | None = Field(
        None,
        description="CA certificates (PEM file) that verify the brokers; unset: the system's.",
    )
    kafka_ssl_certfile: str | None = Field(
        None, description="Client certificate (PEM file), for brokers that require one."
    )
    kafka_ssl_keyfile: str | None = Field(
        None, description="Private key (PEM file) of the client certificate."
    )
    kafka_ssl_password: SecretStr | None = Field(
        None, description="Password of the private key (never logged or shown)."
    )

    default_queue: str = Field(
        DEFAULT_QUEUE,
        pattern=r"^[a-zA-Z_][a-zA-Z0-9._-]*$",
        description="Dramatiq queue of handlers that name none (`@on_event(..., queue=...)`).",
    )
    max_concurrency: int = Field(
        DEFAULT_MAX_CONCURRENCY,
        ge=1,
        le=MAX_CONCURRENCY_LIMIT,
        description="Async handlers run at once on the application's event loop (`sync` "
        "backend), a Kafka worker's loop or a Redis worker's loop (there also bounded by "
        "`--threads`).",
    )
    worker_threads: int = Field(
        DEFAULT_WORKER_THREADS,
        ge=1,
        le=MAX_WORKER_THREADS_LIMIT,
        description="Threads running sync (`def`) handlers on the `sync` backend and in "
        "Kafka workers (Redis workers: dramatiq's `--threads`).",
    )
    worker_gc_freeze: bool = Field(
        DEFAULT_WORKER_GC_FREEZE,
        description="Workers (`dramatiq eventbus.actors`): after boot, move every object "
        "alive then out of the cyclic garbage collector's sight (`gc.freeze()`), so its "
        "full passes stop scanning the imported code and stall handler threads less often. "
        "Off by default: it changes the interpreter's collector for the whole process.",
    )
    shutdown_timeout: float = Field(
        DEFAULT_SHUTDOWN_TIMEOUT,
        ge=0,
        le=MAX_TIMEOUT_LIMIT,
        allow_inf_nan=False,
        description="Seconds `stop()` waits for in-flight handlers to finish.",
    )
    max_event_bytes: int = Field(
        DEFAULT_MAX_EVENT_BYTES,
        ge=1024,
        le=MAX_EVENT_BYTES_LIMIT,
        description="Largest event `publish` accepts, in bytes of JSON (larger: "
        "EventTooLargeError).",
    )
    metrics: Literal["none", "memory", "prometheus"] = Field(
        "none",
        description="Metrics collector of a bus built without one: none, in memory, or "
        "Prometheus (extra `prometheus`).",
    )
    tracing: Literal["none", "logging", "otel"] = Field(
        "none",
        description="Tracer of a bus built without one: none, log lines, or OpenTelemetry "
        "spans (extra `otel`).",
    )
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Port on which worker processes serve Prometheus metrics. Unset: not served.",
    )
    handlers: str = Field(
        "",
        description="Modules a worker (`dramatiq eventbus.actors`) imports to find "
        "handlers, comma-separated (`myapp.handlers,myapp.audit`).",
    )

    def __init__(self, **values: Any) -> None:
        warn_unknown_variables(os.environ)
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigurationError(_describe(exc)) from None

    @model_validator(mode="after")
    def _heartbeat_within_session(self) -> EventBusSettings:
        """A Kafka heartbeat interval at or over the session timeout gets every worker
        evicted from its group over and over: refuse it."""
        if self.kafka_heartbeat_interval_ms >= self.kafka_session_timeout_ms:
            raise ValueError(
                f"{ENV_PREFIX}KAFKA_HEARTBEAT_INTERVAL_MS={self.kafka_heartbeat_interval_ms} "
                f"must be under {ENV_PREFIX}KAFKA_SESSION_TIMEOUT_MS="
                f"{self.kafka_session_timeout_ms} (a third of it is usual), or the group "
                "evicts its workers between two heartbeats"
            )
        return self

    @model_validator(mode="after")
    def _replica_wait_within_publish(self) -> EventBusSettings:
        """The replicas' wait runs inside the publish call: a wait as long as the call's
        bound would end every publish with "no answer" instead of the replica count."""
        if self.redis_min_replicas and self.redis_replica_timeout >= self.redis_publish_timeout:
            raise ValueError(
                f"{ENV_PREFIX}REDIS_REPLICA_TIMEOUT={self.redis_replica_timeout:g} must be "
                f"under {ENV_PREFIX}REDIS_PUBLISH_TIMEOUT={self.redis_publish_timeout:g} "
                f"when {ENV_PREFIX}REDIS_MIN_REPLICAS is set (half of it is usual): the "
                "replicas' wait is part of the publish call"
            )
        return self

    @model_validator(mode="after")
    def _extras_installed(self) -> EventBusSettings:
        """Fail now, naming the extra, when a chosen backend or integration lacks it."""
        for (name, value), extra in _EXTRA_OF_VALUE.items():
            if getattr(self, name) == value:
                require_extra(extra, f"{ENV_PREFIX}{name.upper()}={value}")
        return self

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """Fields for ``repr()`` and ``str()``: URLs with their passwords as ``***``
        (secret strings are masked by pydantic)."""
        for name, value in super().__repr_args__():
            yield name, redact(value) if isinstance(value, str) else value


def allowed_text(field: FieldInfo) -> str:
    """What a field accepts, from its constraints: ``≥ 0, ≤ 1000``, ``not empty``,
    ``matches ...`` (empty when unconstrained)."""
    parts: list[str] = []
    low = high = None
    for item in field.metadata:
        if isinstance(item, annotated_types.Ge):
            low = f"≥ {_number(item.ge)}"
        elif isinstance(item, annotated_types.Gt):
            low = f"> {_number(item.gt)}"
        elif isinstance(item, annotated_types.Le):
            high = f"≤ {_number(item.le)}"
        elif isinstance(item, annotated_types.Lt):
            high = f"< {_number(item.lt)}"
        elif isinstance(item, annotated_types.MinLen) and item.min_length == 1:
            parts.append("not empty")
        elif getattr(item, "pattern", None):
            parts.append(f"matches `{item.pattern}`")
    parts[:0] = [b for b in (low, high) if b is not None]
    return ", ".join(parts)


def _number(value: Any) -> str:
    """A bound as written in the environment (``3600``, not ``3600.0``)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _describe(exc: ValidationError) -> str:
    """One clause per invalid setting: the variable, the value given (secrets masked),
    what is wrong and what the setting allows."""
    lines = []
    for error in exc.errors():
        if not error["loc"]:  # a rule across settings: its message names them
            lines.append(str(error["msg"]).removeprefix("Value error, "))
            continue
        name = str(error["loc"][0])
        value = error.get("input")
        shown = MASK if is_secret_name(name) else redact(value) if isinstance(value, str) else value
        line = f"{ENV_PREFIX}{name.upper()}={shown!r}: {error['msg']}"
        field = EventBusSettings.model_fields.get(name)
        allowed = allowed_text(field) if field is not None else ""
        if allowed:
            line += f" (allowed: {allowed}; see `eventbus settings`)"
        lines.append(line)
    return "invalid eventbus settings: " + "; ".join(lines)


#: Variables already warned about by :func:`warn_unknown_variables` in this process.
_warned: set[str] = set()
_warned_lock = threading.Lock()


def setting_names() -> list[str]:
    """The environment variable of every setting, in definition order."""
    return [ENV_PREFIX + name.upper() for name in EventBusSettings.model_fields]


def warn_unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """Log a WARNING for each ``EVENTBUS_*`` variable that is no setting, naming the
    closest one; once per variable per process.

    Returns:
      The variables warned about by this call.
    """
    fresh = []
    for variable in environ:
        upper = variable.upper()
        if not upper.startswith(ENV_PREFIX) or upper.startswith(TEST_PREFIX):
            continue
        if upper in NOT_SETTINGS:
            continue
        prefix, known = _settings_of(upper)
        if known is None or upper in known:
            continue
        with _warned_lock:
            if variable in _warned:
                continue
            _warned.add(variable)
        fresh.append(variable)
        suffixes = [name.removeprefix(prefix) for name in known]
        close = difflib.get_close_matches(upper.removeprefix(prefix), suffixes, n=1)
        hint = f"did you mean {prefix}{close[0]}?" if close else "no setting is close"
        logger.warning(
            "%s is not an eventbus setting and is ignored (%s); `eventbus settings` lists "
            "them all.",
            variable,
            hint,
        )
    return fresh


def _settings_of(variable: str) -> tuple[str, list[str] | None]:
    """The prefix and the variable names of the settings ``variable`` belongs with;
    None when they cannot be known yet (a group whose module is not imported)."""
    for prefix, (module, name, _) in SETTINGS_GROUPS.items():
        if variable.startswith(prefix):
            loaded = sys.modules.get(module)
            group: type[BaseSettings] | None = getattr(loaded, name, None)
            if group is None:
                return prefix, None
            return prefix, [prefix + field.upper() for field in group.model_fields]
    return ENV_PREFIX, setting_names()
