"""Kafka connection settings shared by every client the Kafka backend opens.

One :class:`KafkaConfig` builds the producer, the bridge's consumer, the
dead-letter reader and any admin client, so TLS and SASL options reach all of
them alike.  This module also names the record headers eventbus writes.

Example::

    config = KafkaConfig(
        "broker-1:9093,broker-2:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="orders",
        sasl_password="...",
        ssl_cafile="/etc/ssl/kafka-ca.pem",
    )
"""

from __future__ import annotations

from eventbus.extras import requires_extra

with requires_extra("kafka", __name__):
    import aiokafka  # noqa: F401  (imported lazily below; checked here)

import re
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from eventbus.config import EventBusSettings
from eventbus.exceptions import ConfigurationError

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient

#: Header holding the event type name (``module.QualName``).
HEADER_EVENT_TYPE = "eventbus-type"
#: Header holding the event id.
HEADER_EVENT_ID = "eventbus-event-id"
#: Header holding the correlation id of the publishing request.
HEADER_CORRELATION_ID = "eventbus-correlation-id"
#: W3C trace context of the publish span (``00-<trace id>-<span id>-01``).
HEADER_TRACEPARENT = "traceparent"
#: Every propagation field that travels as a header of the same name.
TRACE_CONTEXT_HEADERS = ("traceparent", "tracestate", "baggage")
#: On a replayed record: the only handler (actor name) that should receive it.
HEADER_REPLAY_HANDLER = "eventbus-replay-handler"
#: On a replayed record: the service (consumer group's service name) whose
#: handler failed; the workers of other services ignore the record.
HEADER_REPLAY_SERVICE = "eventbus-replay-service"
#: On a replayed record: the id of the dead letter it comes from.
HEADER_REPLAY_OF = "eventbus-replay-of"

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")

_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX16 = re.compile(r"[0-9a-f]{16}")


def format_traceparent(trace_id: str, span_id: str) -> str | None:
    """The W3C ``traceparent`` of a span, or None when its ids are not W3C ids."""
    if _HEX32.fullmatch(trace_id) and _HEX16.fullmatch(span_id):
        return f"00-{trace_id}-{span_id}-01"
    return None


def parse_traceparent(value: str) -> tuple[str, str] | None:
    """``(trace_id, span_id)`` of a W3C ``traceparent``, or None when it is not one."""
    match = _TRACEPARENT.fullmatch(value.strip())
    return (match[1], match[2]) if match else None


@dataclass(frozen=True)
class KafkaConfig:
    """Where the brokers are and how to authenticate to them.

    Parameters:
      bootstrap_servers: ``host:port[,host:port...]``.
      client_id: Sent to the brokers with every request (shows in their logs).
      security_protocol: ``PLAINTEXT``, ``SSL``, ``SASL_PLAINTEXT`` or ``SASL_SSL``.
      sasl_mechanism: ``PLAIN``, ``SCRAM-SHA-256`` or ``SCRAM-SHA-512``; required
        with the SASL protocols, together with ``sasl_username`` and ``sasl_password``.
      ssl_cafile: CA bundle that signed the brokers' certificates (default: the
        system's).
      ssl_certfile, ssl_keyfile, ssl_password: The client certificate, its key and
        the key's password, for brokers that require mutual TLS.
      ssl_context: A ready :class:`ssl.SSLContext`; wins over the ``ssl_*`` files.
    """

    bootstrap_servers: str
    client_id: str = "eventbus"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: str | None = field(default=None, repr=False)
    ssl_context: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        if not self.bootstrap_servers.strip():
            raise ConfigurationError("EVENTBUS_KAFKA_BOOTSTRAP_SERVERS is empty")
        if self.security_protocol not in SECURITY_PROTOCOLS:
            raise ConfigurationError(
                f"EVENTBUS_KAFKA_SECURITY_PROTOCOL={self.security_protocol!r}: use one of "
                + ", ".join(SECURITY_PROTOCOLS)
            )
        if self.security_protocol.startswith("SASL"):
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise ConfigurationError(
                    f"EVENTBUS_KAFKA_SASL_MECHANISM={self.sasl_mechanism!r}: "
                    f"{self.security_protocol} needs one of " + ", ".join(SASL_MECHANISMS)
                )
            if not self.sasl_username or self.sasl_password is None:
                raise ConfigurationError(
                    f"{self.security_protocol} needs EVENTBUS_KAFKA_SASL_USERNAME and "
                    "EVENTBUS_KAFKA_SASL_PASSWORD"
                )
        elif self.sasl_mechanism is not None:
            raise ConfigurationError(
                "EVENTBUS_KAFKA_SASL_MECHANISM is set but EVENTBUS_KAFKA_SECURITY_PROTOCOL="
                f"{self.security_protocol}: use SASL_PLAINTEXT or SASL_SSL"
            )

    @classmethod
    def from_settings(cls, settings: EventBusSettings) -> KafkaConfig:
        """The configuration the ``EVENTBUS_KAFKA_*`` settings describe."""
        return cls(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            client_id=settings.kafka_client_id,
            security_protocol=settings.kafka_security_protocol,
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_username=settings.kafka_sasl_username,
            sasl_password=(
                settings.kafka_sasl_password.get_secret_value()
                if settings.kafka_sasl_password is not None
                else None
            ),
            ssl_cafile=settings.kafka_ssl_cafile,
            ssl_certfile=settings.kafka_ssl_certfile,
            ssl_keyfile=settings.kafka_ssl_keyfile,
            ssl_password=(
                settings.kafka_ssl_password.get_secret_value()
                if settings.kafka_ssl_password is not None
                else None
            ),
        )

    def _ssl(self) -> ssl.SSLContext | None:
        if self.ssl_context is not None:
            return self.ssl_context
        if self.security_protocol not in ("SSL", "SASL_SSL"):
            return None
        context = ssl.create_default_context(cafile=self.ssl_cafile)
        if self.ssl_certfile:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile, self.ssl_password)
        return context

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments every aiokafka client gets: servers, identity, TLS, SASL."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        context = self._ssl()
        if context is not None:
            options["ssl_context"] = context
        if self.sasl_mechanism is not None:
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = self.sasl_password
        return options

    def producer(self, **options: Any) -> AIOKafkaProducer:
        """A (not started) producer with these settings and ``options``."""
        from aiokafka import AIOKafkaProducer

        return AIOKafkaProducer(**self.client_options(), **options)

    def consumer(self, *topics: str, **options: Any) -> AIOKafkaConsumer:
        """A (not started) consumer with these settings and ``options``."""
        from aiokafka import AIOKafkaConsumer

        return AIOKafkaConsumer(*topics, **self.client_options(), **options)

    def admin(self, **options: Any) -> AIOKafkaAdminClient:
        """A (not started) admin client with these settings and ``options``."""
        from aiokafka.admin import AIOKafkaAdminClient

        return AIOKafkaAdminClient(**self.client_options(), **options)
