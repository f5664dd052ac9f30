"""The AsyncAPI 3.0 document of an application: what it sends and what it receives.

:func:`asyncapi_document` describes one bus (or the FastAPI app that runs it):

* **channels**: one per topic, its address the topic;
* **messages**: one per event class, its payload the envelope as
  :func:`~eventbus.events.encode_envelope` writes it (``type``, ``version`` when
  not 1, and ``event``: the class's JSON Schema from pydantic with the envelope
  fields ``event_id``, ``topic``, ``timestamp`` and ``metadata``); the correlation
  id is located in ``event.metadata.correlation_id``.  A topic whose handlers take
  any event (no event class) gets a message whose ``event`` is any object;
* **operations**: ``receive`` for every handler (``@on_event`` or registered on
  the bus) with its service and queue (``x-eventbus-service``,
  ``x-eventbus-queue``, ``x-eventbus-handler``), ``send`` for each event class
  the application declares it publishes (``EventBus(publishes=[...])``);
* **servers**: from the settings, without secrets: the Redis host, port and
  database (no user, password or query), the Kafka bootstrap brokers; none on the
  embedded ``sync`` backend.

Each message names its event type (``name`` and ``x-eventbus-type``) and topic
(``x-eventbus-topic``), so ``eventbus schema check --against asyncapi.json``
reads another service's document as its contracts.  Nested models of the event
classes are under ``components.schemas`` (pydantic's ``$defs`` moved there,
their ``$ref`` rewritten), one entry per distinct schema.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from eventbus.contracts.schemas import event_schema
from eventbus.events import CORRELATION_ID, BaseEvent

if TYPE_CHECKING:
    from eventbus.bus import EventBus
    from eventbus.config import EventBusSettings
    from eventbus.registry import HandlerSpec

#: The AsyncAPI version of the documents written here.
ASYNCAPI_VERSION = "3.0.0"
#: Content type of every message (the envelope is JSON).
CONTENT_TYPE = "application/json"
#: Key of the message of a topic whose handlers take any event.
ANY_EVENT = "AnyEvent"
#: Where the correlation id travels (an AsyncAPI runtime expression).
CORRELATION_LOCATION = f"$message.payload#/event/metadata/{CORRELATION_ID}"

#: Characters AsyncAPI allows in a component key (``^[\\w\\d\\.\\-_]+$``).
_KEY_UNSAFE = re.compile(r"[^\w.\-]")

#: The envelope fields every event carries, as JSON Schema.
ENVELOPE_PROPERTIES: dict[str, dict[str, Any]] = {
    "event_id": {
        "type": "string",
        "description": "Unique id of the event (the default: a UUID4 hex); "
        "handlers with an inbox deduplicate on it.",
    },
    "topic": {"type": "string", "description": "The topic the event was published to."},
    "timestamp": {
        "type": "string",
        "format": "date-time",
        "description": "When the event was created (ISO 8601, UTC).",
    },
    "metadata": {
        "type": "object",
        "additionalProperties": {"type": "string"},
        "description": (
            f"Headers of the event: '{CORRELATION_ID}' (the request that caused it), "
            "'causation_id', and the trace context ('traceparent', 'tracestate', "
            "'baggage') when tracing is on."
        ),
    },
}


def _key(text: str) -> str:
    """``text`` as an AsyncAPI component key."""
    return _KEY_UNSAFE.sub("_", text) or "_"


def _unique(key: str, taken: Iterable[str]) -> str:
    taken = set(taken)
    if key not in taken:
        return key
    n = 2
    while f"{key}_{n}" in taken:
        n += 1
    return f"{key}_{n}"


def resolve_bus(target: Any) -> EventBus:
    """The bus of ``target``: an :class:`~eventbus.bus.EventBus`, or an app holding one
    on ``app.state.event_bus`` (as :func:`~eventbus.fastapi.create_lifespan` sets it).

    Raises:
      TypeError: ``target`` is neither.
    """
    from eventbus.bus import EventBus

    if isinstance(target, EventBus):
        return target
    state = getattr(target, "state", None)
    bus = getattr(state, "event_bus", None)
    if isinstance(bus, EventBus):
        return bus
    raise TypeError(
        f"asyncapi_document() needs an EventBus or an app whose state holds one "
        f"(app.state.event_bus), got {target!r}"
    )


def load_app(spec: str) -> Any:
    """The bus or app ``spec`` names, for ``eventbus asyncapi APP``.

    ``module:attribute``: that attribute (dots reach into it: ``main:state.bus``);
    a FastAPI app whose bus is not on its state yet (its lifespan has not run)
    stands for the one :class:`~eventbus.bus.EventBus` of its module.  ``module``:
    the one EventBus among the module's globals.  The module is imported, so
    ``@on_event`` handlers it imports are registered.

    Raises:
      ImportError: The module does not import.
      LookupError: No such attribute, or no single EventBus to take.
    """
    from eventbus.bus import EventBus

    module_name, colon, attribute = spec.partition(":")
    if not module_name or (colon and not attribute):
        raise LookupError(f"APP must be module:attribute or module, got {spec!r}")
    module = importlib.import_module(module_name)
    buses = [v for v in vars(module).values() if isinstance(v, EventBus)]
    if not colon:
        if len(buses) == 1:
            return buses[0]
        found = "no EventBus" if not buses else f"{len(buses)} EventBus objects"
        raise LookupError(
            f"module {module_name!r} has {found} among its globals: name one, "
            f"e.g. {module_name}:bus"
        )
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise LookupError(f"{spec!r}: {target!r} has no attribute {part!r}")
        target = getattr(target, part)
    if isinstance(target, EventBus):
        return target
    if isinstance(getattr(getattr(target, "state", None), "event_bus", None), EventBus):
        return target
    if hasattr(target, "state") and len(buses) == 1:
        return _AppWithBus(target, buses[0])
    raise LookupError(
        f"{spec!r} is {type(target).__name__}, not an EventBus or an app whose module "
        f"holds exactly one ({len(buses)} found): name the bus, e.g. {module_name}:bus"
    )


class _AppWithBus:
    """An app and the bus of its module: its title and version, that bus."""

    def __init__(self, app: Any, bus: EventBus) -> None:
        self.title = getattr(app, "title", None)
        self.version = getattr(app, "version", None)
        self.state = type("State", (), {"event_bus": bus})()


class _Builder:
    """Collects the channels, messages and schemas of one document."""

    def __init__(self) -> None:
        self.channels: dict[str, dict[str, Any]] = {}
        self.channel_keys: dict[str, str] = {}  # topic -> channel key
        self.messages: dict[str, dict[str, Any]] = {}
        self.message_keys: dict[type[BaseEvent] | tuple[str, str], str] = {}
        self.schemas: dict[str, dict[str, Any]] = {}

    def channel(self, topic: str) -> str:
        key = self.channel_keys.get(topic)
        if key is None:
            key = _unique(_key(topic), self.channels)
            self.channel_keys[topic] = key
            self.channels[key] = {
                "address": topic,
                "title": topic,
                "messages": {},
            }
        return key

    def _schema(self, name: str, schema: dict[str, Any]) -> str:
        """Put ``schema`` under ``components.schemas`` (reusing an equal one); its key."""
        base = _key(name)
        for key in [base] + [k for k in self.schemas if k.startswith(f"{base}_")]:
            if self.schemas.get(key) == schema:
                return key
        key = _unique(base, self.schemas)
        self.schemas[key] = schema
        return key

    def _event_object(self, event_class: type[BaseEvent]) -> dict[str, Any]:
        """The ``event`` of the envelope: the class's own fields and the envelope's,
        its ``$defs`` moved to ``components.schemas``."""
        schema = event_schema(event_class)
        defs: dict[str, Any] = schema.pop("$defs", {})
        as_named = {name: _key(name) for name in defs}
        renamed: dict[str, str] = {}
        for name, sub in defs.items():
            base = as_named[name]
            candidate = _rewrite(sub, as_named)
            same = [k for k in self.schemas if k == base or k.startswith(f"{base}_")]
            found = next((k for k in same if self.schemas[k] == candidate), None)
            renamed[name] = found or _unique(base, [*self.schemas, *renamed.values()])
        for name, sub in defs.items():
            self.schemas[renamed[name]] = _rewrite(sub, renamed)
        schema = dict(_rewrite(schema, renamed))
        properties = {**schema.get("properties", {})}
        topic = event_class.default_topic()
        for field, spec in ENVELOPE_PROPERTIES.items():
            spec = dict(spec)
            if field == "topic" and topic is not None:
                spec["default"] = topic
            properties[field] = spec
        schema["properties"] = properties
        schema["required"] = sorted({*schema.get("required", []), *ENVELOPE_PROPERTIES})
        result: dict[str, Any] = schema
        return result

    def message(self, topic: str, event_class: type[BaseEvent] | None) -> tuple[str, str]:
        """The channel key and message key of ``event_class`` on ``topic`` (None: any
        event), added when new."""
        channel = self.channel(topic)
        ident: type[BaseEvent] | tuple[str, str] = (
            event_class if event_class is not None else (ANY_EVENT, topic)
        )
        key = self.message_keys.get(ident)
        if key is None:
            key = self._new_message(topic, event_class)
            self.message_keys[ident] = key
        messages = self.channels[channel]["messages"]
        messages[key] = {"$ref": f"#/components/messages/{key}"}
        return channel, key

    def _new_message(self, topic: str, event_class: type[BaseEvent] | None) -> str:
        if event_class is None:
            key = _unique(_key(f"{ANY_EVENT}.{topic}"), self.messages)
            event: dict[str, Any] = {
                "type": "object",
                "description": "Any event published to the topic (its handlers take every "
                "class): the envelope fields and the event's own.",
                "properties": dict(ENVELOPE_PROPERTIES),
                "required": sorted(ENVELOPE_PROPERTIES),
                "additionalProperties": True,
            }
            envelope = _envelope({"type": "string", "description": "The event type name."}, event)
            self.messages[key] = {
                "name": f"{topic} (any event)",
                "title": "Any event",
                "summary": f"Any event on topic {topic}.",
                "contentType": CONTENT_TYPE,
                "correlationId": {"location": CORRELATION_LOCATION},
                "payload": envelope,
                "x-eventbus-topic": topic,
            }
            return key
        type_name = event_class.__event_type__
        key = _unique(_key(type_name), self.messages)
        schema_key = self._schema(f"{type_name}.event", self._event_object(event_class))
        version = event_class.__event_version__
        type_schema: dict[str, Any] = {
            "const": type_name,
            "description": "The event type name: <topic>:<ClassName> unless the class "
            "sets __event_type__.",
        }
        envelope = _envelope(type_schema, {"$ref": f"#/components/schemas/{schema_key}"}, version)
        message: dict[str, Any] = {
            "name": type_name,
            "title": event_class.__name__,
            "contentType": CONTENT_TYPE,
            "correlationId": {"location": CORRELATION_LOCATION},
            "payload": envelope,
            "x-eventbus-type": type_name,
            "x-eventbus-topic": topic,
            "x-eventbus-version": version,
        }
        doc = _first_paragraph(event_class.__doc__)
        if doc:
            message["summary"] = doc
        self.messages[key] = message
        return key


def _envelope(
    type_schema: dict[str, Any], event: dict[str, Any], version: int = 1
) -> dict[str, Any]:
    """The message payload: the envelope around ``event``."""
    properties: dict[str, Any] = {"type": type_schema}
    required = ["type", "event"]
    if version != 1:
        properties["version"] = {
            "const": version,
            "description": "The version of the event's shape (written when not 1).",
        }
        required.insert(1, "version")
    properties["event"] = event
    return {
        "type": "object",
        "description": "The envelope every backend carries: the event type name, its "
        "version when not 1, and the event.",
        "properties": properties,
        "required": required,
    }


def _rewrite(node: Any, renamed: dict[str, str]) -> Any:
    """``node`` with ``#/$defs/X`` references pointing to ``#/components/schemas/<key>``."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str) and v.startswith("#/$defs/"):
                name = v[len("#/$defs/") :]
                out[k] = f"#/components/schemas/{renamed.get(name, _key(name))}"
            else:
                out[k] = _rewrite(v, renamed)
        return out
    if isinstance(node, list):
        return [_rewrite(v, renamed) for v in node]
    return node


def _first_paragraph(doc: str | None) -> str:
    if not doc:
        return ""
    return " ".join(inspect.cleandoc(doc).split("\n\n", 1)[0].split())


def servers(settings: EventBusSettings) -> dict[str, dict[str, Any]]:
    """The AsyncAPI servers of ``settings``' backend, without secrets.

    Redis: host, port and database of ``EVENTBUS_REDIS_URL`` (no user, password or
    query parameters); Sentinel URLs give the sentinels' addresses and the master
    name.  Kafka: one server per bootstrap broker.  Embedded (``sync``): none.
    """
    if settings.backend == "redis":
        return {"redis": _redis_server(settings.redis_url)}
    if settings.backend == "kafka":
        secure = settings.kafka_security_protocol in ("SSL", "SASL_SSL")
        description = (
            f"Kafka bootstrap broker (security protocol {settings.kafka_security_protocol}"
        )
        if settings.kafka_sasl_mechanism:
            description += f", SASL {settings.kafka_sasl_mechanism}"
        description += ")."
        hosts = [h.strip() for h in settings.kafka_bootstrap_servers.split(",") if h.strip()]
        return {
            (f"kafka-{i}" if len(hosts) > 1 else "kafka"): {
                "host": host.rpartition("@")[2],
                "protocol": "kafka-secure" if secure else "kafka",
                "description": description,
            }
            for i, host in enumerate(hosts, 1)
        }
    return {}


def _redis_server(url: str) -> dict[str, Any]:
    """The server of a Redis URL: its host(s), port(s) and path, nothing else (the
    user, password and query parameters may be secrets)."""
    scheme, _, rest = url.partition("://")
    rest = re.split(r"[?#]", rest, maxsplit=1)[0]
    hostport, slash, path = rest.partition("/")
    hostport = hostport.rpartition("@")[2]
    server: dict[str, Any] = {"host": hostport or "localhost", "protocol": "redis"}
    if slash and path:
        server["pathname"] = "/" + path
    if scheme == "rediss":
        server["description"] = "Redis over TLS."
    elif scheme.startswith("redis+sentinel") or scheme.startswith("rediss+sentinel"):
        server["description"] = "Redis Sentinel: the sentinels; the path is /<master name>[/<db>]."
    elif scheme == "unix":
        server = {
            "host": "localhost",
            "protocol": "redis",
            "description": "Redis over a Unix socket.",
        }
    return server


def _receive(spec: HandlerSpec, service: str, queue: str) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "action": "receive",
        "title": spec.name,
        "x-eventbus-handler": spec.name,
        "x-eventbus-service": service,
        "x-eventbus-queue": queue,
    }
    doc = _first_paragraph(getattr(spec.fn, "__doc__", None))
    summary = f"Handler {spec.name} of service {service}, queue {queue}."
    operation["summary"] = summary
    if doc:
        operation["description"] = doc
    return operation


def asyncapi_document(
    bus_or_app: Any,
    *,
    title: str | None = None,
    version: str | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of an application (a JSON-compatible dict).

    Parameters:
      bus_or_app: The application's :class:`~eventbus.bus.EventBus`, or its FastAPI
        app once the bus is on ``app.state.event_bus``.
      title: ``info.title``; default: the app's title when it is not FastAPI's
        default, else the bus's service name.
      version: ``info.version``; default: the app's version, else ``"1.0.0"``.
      description: ``info.description``; default: one line naming the service and
        the backend.

    The channels, messages, operations and servers are described in
    :mod:`eventbus.contracts.asyncapi`.  The same bus gives the same document
    (keys sorted by topic and handler name).

    Raises:
      TypeError: ``bus_or_app`` is neither a bus nor an app holding one.
    """
    bus = resolve_bus(bus_or_app)
    app = None if bus_or_app is bus else bus_or_app
    service = bus.service
    builder = _Builder()
    operations: dict[str, dict[str, Any]] = {}
    handlers = sorted(bus.registry.all_handlers(), key=lambda s: (s.topic, s.name))
    published = sorted(bus.publishes, key=lambda c: c.__event_type__)
    # Typed messages first, so a topic's untyped handlers can list them.
    for cls in published:
        topic = cls.default_topic()
        if topic is not None:
            builder.message(topic, cls)
    for spec in handlers:
        if spec.event_type is not None:
            builder.message(spec.topic, spec.event_type)
    for spec in handlers:
        queue = spec.queue or bus.subscriptions.default_queue
        operation = _receive(spec, service, queue)
        if spec.event_type is not None:
            channel, message = builder.message(spec.topic, spec.event_type)
            refs = [message]
        else:
            channel = builder.channel(spec.topic)
            refs = sorted(builder.channels[channel]["messages"])
            if not refs:
                refs = [builder.message(spec.topic, None)[1]]
        operation["channel"] = {"$ref": f"#/channels/{channel}"}
        operation["messages"] = [{"$ref": f"#/channels/{channel}/messages/{m}"} for m in refs]
        operations[_unique(_key(f"receive.{spec.name}"), operations)] = operation
    for cls in published:
        topic = cls.default_topic()
        if topic is None:  # EventBus(publishes=...) refuses these; kept safe
            continue
        channel, message = builder.message(topic, cls)
        operations[_unique(_key(f"send.{cls.__event_type__}"), operations)] = {
            "action": "send",
            "title": f"send {cls.__event_type__}",
            "summary": f"Service {service} publishes {cls.__name__} to {topic}.",
            "channel": {"$ref": f"#/channels/{channel}"},
            "messages": [{"$ref": f"#/channels/{channel}/messages/{message}"}],
            "x-eventbus-service": service,
        }

    app_title = getattr(app, "title", None)
    app_version = getattr(app, "version", None)
    info: dict[str, Any] = {
        "title": title
        or (
            app_title
            if isinstance(app_title, str) and app_title not in ("", "FastAPI")
            else service
        ),
        "version": version
        or (app_version if isinstance(app_version, str) and app_version else "1.0.0"),
        "description": description
        or f"Events service {service} sends and receives on the {bus.settings.backend} backend "
        "of fastapi-eventbus.",
    }
    document: dict[str, Any] = {
        "asyncapi": ASYNCAPI_VERSION,
        "info": info,
        "defaultContentType": CONTENT_TYPE,
    }
    found_servers = servers(bus.settings)
    if found_servers:
        document["servers"] = found_servers
    document["channels"] = dict(sorted(builder.channels.items()))
    document["operations"] = operations
    components: dict[str, Any] = {"messages": dict(sorted(builder.messages.items()))}
    if builder.schemas:
        components["schemas"] = dict(sorted(builder.schemas.items()))
    document["components"] = components
    document["x-eventbus-service"] = service
    document["x-eventbus-backend"] = bus.settings.backend
    result: dict[str, Any] = copy.deepcopy(document)
    return result
