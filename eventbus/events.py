"""Events, their JSON wire envelope and the registry of event classes.

An event travels as an *envelope*, a JSON object::

    {"type": "user.created:UserCreated", "event": {"event_id": "...", "topic": "user.created", ...}}

plus ``"version": N`` for a class whose ``__event_version__`` is not 1 (see
:mod:`eventbus.upcasting`: old payloads are upcast before validation).

``type`` is a name, never a module to import: decoding looks it up among the
:class:`BaseEvent` subclasses defined in the running process.  A process that does
not know the name gets an :class:`UnknownEvent` (a ``BaseEvent`` carrying every
field), or, when a handler asked for a specific class, the fields validated into
that class.  Anything else raises :class:`~eventbus.exceptions.EventDecodeError`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
from datetime import UTC, datetime
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError
from pydantic_core import to_json

from eventbus.exceptions import EventDecodeError
from eventbus.redact import MASK, is_secret_name, redact
from eventbus.upcasting import VERSION_KEY, check_version, upcast, version_of

logger = logging.getLogger(__name__)

#: Envelope key holding the event type name.
TYPE_KEY = "type"
#: Envelope key holding the event's fields.
EVENT_KEY = "event"
#: Metadata key under which the correlation id travels.
CORRELATION_ID = "correlation_id"
#: Metadata key naming the event that caused this one (set when a handler publishes).
CAUSATION_ID = "causation_id"
#: Deepest nesting of objects and arrays in an envelope, the envelope itself being
#: level 1 and its ``event`` object level 2.  Events are shallow; a bound far below
#: the interpreter's recursion limit keeps hostile payloads from exhausting it.
MAX_DEPTH = 64

#: Event classes by type name, oldest first (one process may define two classes
#: under one name: two modules copying a class, a test redefining one).
_registry: dict[str, list[type[BaseEvent]]] = {}
#: Event classes by ``module.QualName``, the default type name before names were
#: stable across codebases: envelopes written then still decode.
_module_names: dict[str, type[BaseEvent]] = {}

#: A JSON string, or an unterminated one up to the end (never backtracks).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_CONTAINERS = (dict, list, tuple)
#: Every byte but the four brackets (deleted when measuring nesting).
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_TOO_DEEP = f"event envelope is too deeply nested (more than {MAX_DEPTH} levels of objects/arrays)"


def _new_event_id() -> str:
    return os.urandom(16).hex()


def _utcnow() -> datetime:
    return datetime.now(UTC)


def default_type_name(cls: type[BaseEvent]) -> str:
    """The type name of ``cls`` when it does not set ``__event_type__``:
    ``<topic>:<ClassName>`` when it has a default topic, else ``module.QualName``."""
    topic = cls.default_topic()
    if topic is None:
        return f"{cls.__module__}.{cls.__qualname__}"
    return f"{topic}:{cls.__name__}"


class BaseEvent(BaseModel):
    """Base class of every event.

    Subclass it and give ``topic`` a default::

        class UserCreated(BaseEvent):
            topic: str = "user.created"
            user_id: int
            username: str

    Events are immutable.  Each subclass is registered under its *type name*:
    ``__event_type__`` when the class sets it, else ``<topic>:<ClassName>`` (its
    default topic and class name, the same in every codebase holding a copy of
    the class), else, for a class without a default topic, ``module.QualName``.
    Envelopes naming a class by ``module.QualName`` (the default of earlier
    versions) still decode into it.

    On a partitioned backend (Kafka) the record key is :meth:`partition_key`:
    events with the same key land on the same partition, in publish order.  Name
    the field that holds it with ``__partition_key__`` (or override the method)::

        class OrderPaid(BaseEvent):
            __partition_key__ = "order_id"
            topic: str = "order.paid"
            order_id: int
    """

    model_config = ConfigDict(frozen=True)

    __event_type__: ClassVar[str] = "eventbus.BaseEvent"
    #: The version of the class's shape, written into the envelope when not 1.
    #: Raise it when the fields change, and register an upcaster for each step
    #: (:func:`eventbus.upcasting.upcaster`) so old payloads still reach handlers.
    __event_version__: ClassVar[int] = 1
    #: Name of the field whose value is the partition key; None: the event id.
    __partition_key__: ClassVar[str | None] = None

    event_id: str = Field(default_factory=_new_event_id)
    #: The topic; ``""`` (the default of ``BaseEvent``) means none: such an event
    #: cannot be published until its class or the instance sets one.
    topic: str = ""
    timestamp: datetime = Field(default_factory=_utcnow)
    metadata: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        module_name = f"{cls.__module__}.{cls.__qualname__}"
        check_version(cls, cls.__event_version__)
        if "__event_type__" not in cls.__dict__:
            cls.__event_type__ = default_type_name(cls)
        if cls.__dict__.get("_eventbus_unregistered"):
            return
        _module_names[module_name] = cls
        same = _registry.setdefault(cls.__event_type__, [])
        # A class redefined in its module (a reload, a class in a function) replaces
        # itself; another class under the same name joins it (the newest first).
        same[:] = [c for c in same if f"{c.__module__}.{c.__qualname__}" != module_name]
        if same:
            logger.debug(
                "Event type %s is defined by %d classes in this process; decoding by "
                "name tries the newest first.",
                cls.__event_type__,
                len(same) + 1,
            )
        same.append(cls)

    @property
    def event_type(self) -> str:
        """The name this event travels under."""
        return type(self).__event_type__

    @property
    def event_version(self) -> int:
        """The version this event travels under (its class's ``__event_version__``)."""
        return type(self).__event_version__

    def partition_key(self) -> str:
        """The key that keeps related events in order on a partitioned backend.

        The value of the field named by ``__partition_key__`` (as text), else the
        event id (no ordering between events).
        """
        name = type(self).__partition_key__
        if name is None:
            return self.event_id
        return str(getattr(self, name))

    @classmethod
    def default_topic(cls) -> str | None:
        """The class's default ``topic``, or None when it has none."""
        field = cls.model_fields["topic"]
        default = field.get_default(call_default_factory=True)
        return default if isinstance(default, str) and default else None

    def to_dict(self) -> dict[str, Any]:
        """The envelope of this event (a JSON-compatible dict)."""
        return encode_event(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaseEvent:
        """Decode an envelope made by :meth:`to_dict`; see :func:`decode_event`."""
        return decode_event(data, None if cls is BaseEvent else cls)


class UnknownEvent(BaseEvent):
    """An event whose type this process does not know.

    Every field of the payload is kept (``event.model_extra`` holds those that
    ``BaseEvent`` does not define) and ``event_type`` reports the original type
    name, so the event can be logged, dead-lettered and replayed unchanged.
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    _eventbus_unregistered: ClassVar[bool] = True
    _type_name: str = PrivateAttr(default="eventbus.UnknownEvent")
    _version: int = PrivateAttr(default=1)

    @property
    def event_type(self) -> str:
        return self._type_name

    @property
    def event_version(self) -> int:
        return self._version


def event_class(type_name: str) -> type[BaseEvent] | None:
    """The registered event class for ``type_name`` (the newest, when several
    classes of this process share it), or None.  A ``module.QualName`` of a class
    that has another type name now also finds it."""
    if type_name == BaseEvent.__event_type__:
        return BaseEvent
    classes = _registry.get(type_name)
    if classes:
        return classes[-1]
    return _module_names.get(type_name)


def _namesakes(type_name: str, tried: type[BaseEvent]) -> list[type[BaseEvent]]:
    """The other classes registered under ``type_name``, newest first."""
    return [c for c in reversed(_registry.get(type_name, ())) if c is not tried]


def encode_event(event: BaseEvent, metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Build the JSON-compatible envelope of ``event``.

    Parameters:
      event: The event.
      metadata: Entries merged into the event's metadata on the wire (entries the
        event already carries win), e.g. the correlation id.
    """
    data = event.model_dump(mode="json")
    if metadata:
        data["metadata"] = {**metadata, **data["metadata"]}
    version = event.event_version
    if version != 1:
        return {TYPE_KEY: event.event_type, VERSION_KEY: version, EVENT_KEY: data}
    return {TYPE_KEY: event.event_type, EVENT_KEY: data}


def encode_envelope(event: BaseEvent, metadata: dict[str, str] | None = None) -> bytes:
    """The envelope of ``event`` as JSON bytes, serialized once.

    Same document as :func:`encode_event`, built without an intermediate dict.

    Parameters:
      event: The event.
      metadata: Entries merged into the event's metadata on the wire (entries the
        event already carries win), e.g. the correlation id.

    A float that is NaN or infinite is refused rather than written: JSON has no
    such values (``NaN`` is not JSON to other consumers, and ``null`` would
    silently change the data).  So is an event nesting deeper than a consumer's
    decoder accepts (:data:`MAX_DEPTH`).

    Raises:
      pydantic_core.PydanticSerializationError: A field cannot be written as JSON
        (a lone surrogate in a string, an object pydantic cannot serialize).
      ValueError: A float field is NaN or infinite (the message names the field),
        or the event nests too deeply.
    """
    if metadata:
        # Serialized with the merged metadata in place of its own, put back at once:
        # a model_copy per publish cost ~40 % of the encoding.  Under the lock, so
        # that threads encoding the same instance each read its own metadata.
        state = event.__dict__
        with _METADATA_SWAP:
            own = state["metadata"]
            state["metadata"] = {**metadata, **own}
            try:
                body = event.__pydantic_serializer__.to_json(event)
            finally:
                state["metadata"] = own
    else:
        body = event.__pydantic_serializer__.to_json(event)
    # pydantic writes NaN and infinities as null (or NaN / "NaN", per the model's
    # ser_json_inf_nan): look for them only when one of those can be in the text.
    if b"null" in body or b"NaN" in body or b"Infinity" in body:
        _refuse_non_finite(event)
    envelope = _head(event.event_type, event.event_version) + b',"event":' + body + b"}"
    if text_too_deep(envelope):
        raise ValueError(f"{_TOO_DEEP}: a consumer could not decode it")
    return envelope


#: Held while :func:`encode_envelope` serializes an event with merged metadata.
_METADATA_SWAP = threading.Lock()

#: Envelope openings (``{"type":...`` and the version when not 1) by type name and
#: version, each encoded once; emptied when it reaches :data:`_HEADS_MAX` entries.
_HEADS: dict[tuple[str, int], bytes] = {}
_HEADS_MAX = 1024


def _head(type_name: str, version: int) -> bytes:
    """The envelope's opening up to the ``"event"`` key, for a type name and version."""
    head = _HEADS.get((type_name, version))
    if head is None:
        head = b'{"type":' + to_json(type_name)
        if version != 1:
            head += b',"version":' + str(version).encode()
        if len(_HEADS) >= _HEADS_MAX:
            _HEADS.clear()
        _HEADS[type_name, version] = head
    return head


def _refuse_non_finite(event: BaseEvent) -> None:
    """Raise ValueError naming a float field of ``event`` that is NaN or infinite."""
    fields = event.model_dump()
    text = to_json(fields, inf_nan_mode="constants")  # ~1 us: most events pass here
    if b"NaN" not in text and b"Infinity" not in text:
        return
    pending: list[tuple[str, Any]] = list(fields.items())
    while pending:
        path, value = pending.pop()
        if isinstance(value, float) and not math.isfinite(value):
            constant = "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
            raise ValueError(
                f"field {path!r} is {constant}, which JSON cannot carry: "
                "send None, or the value as a string"
            )
        if isinstance(value, dict):
            pending += [(f"{path}.{key}", child) for key, child in value.items()]
        elif isinstance(value, list | tuple | set | frozenset):
            pending += [(f"{path}[{i}]", child) for i, child in enumerate(value)]


def decode_event(envelope: Any, expected: type[BaseEvent] | None = None) -> BaseEvent:
    """Turn an envelope back into an event.

    Parameters:
      envelope: The envelope: a dict, or its JSON text as ``str`` or ``bytes``.
      expected: The class the caller wants (a handler declared with
        ``@on_event(UserCreated)``).  The fields are validated into it whatever the
        envelope's type name says.

    Returns:
      An instance of ``expected``, else of the registered class named by the
      envelope (when several classes of this process share the name, the newest
      whose fields validate), else an :class:`UnknownEvent` holding every field.

    An envelope older than the class (its ``version``, 1 when absent, is lower
    than ``__event_version__``) is upcast first (:mod:`eventbus.upcasting`).

    Raises:
      EventDecodeError: The envelope is not JSON, nests deeper than
        :data:`MAX_DEPTH`, lacks ``type`` or ``event``, has an invalid
        ``version``, cannot be upcast, or its fields do not validate (then
        ``field_errors`` lists each failing field).
    """
    if isinstance(envelope, bytes | bytearray | str):
        if text_too_deep(envelope):
            raise EventDecodeError(_TOO_DEEP)
        try:
            envelope = json.loads(envelope)
        except (ValueError, UnicodeDecodeError) as exc:
            raise EventDecodeError(f"event envelope is not valid JSON: {exc}") from None
    elif isinstance(envelope, dict) and too_deep(envelope):
        raise EventDecodeError(_TOO_DEEP)
    if not isinstance(envelope, dict):
        raise EventDecodeError(
            f"event envelope must be a JSON object, got {type(envelope).__name__}"
        )
    type_name = envelope.get(TYPE_KEY)
    data = envelope.get(EVENT_KEY)
    if not isinstance(type_name, str) or not type_name:
        raise EventDecodeError(f"event envelope has no {TYPE_KEY!r} string")
    if not isinstance(data, dict):
        raise EventDecodeError(f"event envelope of type {type_name!r} has no {EVENT_KEY!r} object")
    version = version_of(envelope)

    cls = expected or event_class(type_name)
    try:
        if cls is not None:
            try:
                return cls.model_validate(upcast(cls, data, version))
            except ValidationError:
                if expected is not None:
                    raise
                for other in _namesakes(type_name, cls):
                    try:
                        return other.model_validate(upcast(other, data, version))
                    except (ValidationError, EventDecodeError):
                        continue
                raise
        unknown = UnknownEvent.model_validate(data)
    except ValidationError as exc:
        target = cls.__event_type__ if cls is not None else type_name
        newer = ""
        if cls is not None and version > cls.__event_version__:
            newer = (
                f" (the payload is version {version}, newer than {cls.__qualname__}, "
                f"version {cls.__event_version__}: deploy the newer class here)"
            )
        raise EventDecodeError(
            f"invalid fields for event type {target!r}{newer}: {_summarize(exc)}",
            field_errors=field_errors(exc),
        ) from None
    unknown._type_name = type_name
    unknown._version = version
    return unknown


#: Characters of a failing field's input value kept in a dead letter.
MAX_GOT = 200
#: Failing fields kept in a dead letter (the error message counts them all).
MAX_FIELD_ERRORS = 50


def field_errors(exc: ValidationError) -> list[dict[str, str]]:
    """Each failing field of ``exc``: ``{"path", "expected", "got"}`` (JSON text).

    ``path`` is the field's location (``items[0].qty``; ``""`` for the whole
    event), ``expected`` pydantic's message (``Input should be a valid
    integer...``), ``got`` the input as JSON, cut to :data:`MAX_GOT` characters,
    with URLs' passwords hidden, and ``***`` for a field whose name looks secret
    (``password``, ``token``... see :func:`eventbus.redact.is_secret_name`).
    """
    out = []
    for error in exc.errors(include_url=False)[:MAX_FIELD_ERRORS]:
        path = ""
        secret = False
        for part in error["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            else:
                secret = secret or is_secret_name(str(part))
                path += f".{part}" if path else str(part)
        if secret:
            got = MASK
        elif error["type"] == "missing":
            got = "(missing)"
        else:
            got = to_json(error.get("input"), fallback=repr).decode()
            if len(got) > MAX_GOT:
                got = got[:MAX_GOT] + "…"
            got = redact(got)
        out.append({"path": path, "expected": str(error["msg"]), "got": got})
    return out


def _summarize(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        location = ".".join(str(part) for part in error["loc"]) or "<root>"
        parts.append(f"{location}: {error['msg']}")
    more = exc.error_count() - len(parts)
    if more > 0:
        parts.append(f"... and {more} more")
    return "; ".join(parts)


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether ``value`` nests dicts, lists and tuples more than ``limit`` levels.

    ``value`` itself is level 1.  Iterative: safe on any depth, and on cycles
    (reported as too deep).
    """
    level = [value] if isinstance(value, _CONTAINERS) else []
    for _ in range(limit):
        below = [
            child
            for node in level
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, _CONTAINERS)
        ]
        if not below:
            return False
        level = below
    return bool(level)


def text_too_deep(text: str | bytes | bytearray, limit: int = MAX_DEPTH) -> bool:
    """Whether JSON ``text`` nests objects and arrays more than ``limit`` levels.

    Brackets inside strings do not count.  Text with at most ``limit`` opening
    brackets is answered at C speed; otherwise one linear scan, without parsing.
    """
    if isinstance(text, str):
        if text.count("[") + text.count("{") <= limit:
            return False
        data = text.encode("utf-8", "surrogatepass")
    else:
        if text.count(b"[") + text.count(b"{") <= limit:
            return False
        data = bytes(text)
    depth = 0
    for byte in _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS):
        if byte == 0x5B or byte == 0x7B:  # [ {
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False
