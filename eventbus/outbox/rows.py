"""Outbox rows read back as events: checked before anything of them reaches a message.

The relay sends what the table holds, and the table is only as trustworthy as
everything that can write to it.  The Redis fan-out splices the envelope's bytes
into each handler's message as they are, so bytes that are not exactly one JSON
object could close the message early and name another actor.  Before a row
becomes an :class:`~eventbus.backends.base.OutgoingEvent`, :func:`outgoing_of_row`
checks that:

- the envelope is at most ``EVENTBUS_MAX_EVENT_BYTES``, nests no deeper than a
  consumer decodes, and is one JSON object (strict JSON: no ``NaN``, nothing
  after it) with an ``event`` object whose ``event_id`` and ``topic`` are the
  row's and a ``type`` that is the row's ``event_type``;
- the options are a JSON object holding only eventbus's own keys
  (``eventbus_...``, never dramatiq's ``eta``, ``retries``, ...), with the row's
  topic and string values where eventbus writes strings.

A row failing a check raises :class:`InvalidRow` with what is wrong; the relay
sets it aside with that reason (:mod:`eventbus.outbox.dead`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from pydantic import PrivateAttr
from pydantic_core import from_json

import eventbus.keys as keys
from eventbus.backends.base import OutgoingEvent
from eventbus.events import EVENT_KEY, MAX_DEPTH, TYPE_KEY, BaseEvent, text_too_deep

__all__ = ["InvalidRow", "RelayedEvent", "outgoing_of_row"]

#: The prefix of every message option eventbus writes (:mod:`eventbus.keys`).
OPTION_PREFIX = "eventbus_"
#: The ``timestamp`` of a :class:`RelayedEvent`: never sent (the event's own is in
#: its envelope); a constant spares the clock read of the field's default.
_NOT_SENT = datetime(1970, 1, 1, tzinfo=UTC)
#: Options eventbus writes as strings at publish.
_STRING_OPTIONS = (keys.CORRELATION_ID, keys.TRACE_ID, keys.PARENT_SPAN_ID)
_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number"}


class InvalidRow(ValueError):
    """An outbox row the relay cannot send as it is; the message says what is wrong."""


class RelayedEvent(BaseEvent):
    """An event read back from the outbox, as a backend needs it.

    Its id, topic, type name and partition key are those stored with the row; the
    fields stay in the stored envelope, which is what the backend sends.  No event
    class is needed to relay an event.
    """

    _eventbus_unregistered: ClassVar[bool] = True
    _type_name: str = PrivateAttr(default="")
    _key: str = PrivateAttr(default="")

    @property
    def event_type(self) -> str:
        return self._type_name

    def partition_key(self) -> str:
        return self._key

    @classmethod
    def of_row(cls, event_id: str, topic: str, event_type: str, key: str) -> RelayedEvent:
        """The event of one outbox row (its envelope checked by :func:`outgoing_of_row`)."""
        event = cls.model_construct(
            event_id=event_id, topic=topic, metadata={}, timestamp=_NOT_SENT
        )
        event._type_name = event_type
        event._key = key
        return event


def outgoing_of_row(row: Any, max_bytes: int | None = None) -> OutgoingEvent:
    """The :class:`OutgoingEvent` of an outbox row: the envelope and options as written
    at publish, so the correlation id and trace context reach the handlers.

    Parameters:
      row: A row with the outbox table's columns.
      max_bytes: The largest envelope accepted (``EVENTBUS_MAX_EVENT_BYTES``).

    Raises:
      InvalidRow: The envelope or the options are not what eventbus writes (see the
        module docstring).
    """
    envelope = bytes(row.envelope)
    if max_bytes is not None and len(envelope) > max_bytes:
        raise InvalidRow(
            f"its envelope is {len(envelope)} bytes, over EVENTBUS_MAX_EVENT_BYTES={max_bytes}"
        )
    check_envelope(envelope, row.event_id, row.topic, row.event_type)
    options = checked_options(row.options, row.topic)
    context = options.get(keys.TRACE_CONTEXT)
    return OutgoingEvent(
        event=RelayedEvent.of_row(row.event_id, row.topic, row.event_type, row.partition_key),
        envelope=envelope,
        options=options,
        correlation_id=options.get(keys.CORRELATION_ID, ""),
        trace_id=options.get(keys.TRACE_ID, ""),
        span_id=options.get(keys.PARENT_SPAN_ID, ""),
        trace_context=dict(context) if context else {},
    )


def check_envelope(envelope: bytes, event_id: str, topic: str, event_type: str) -> None:
    """Raise :class:`InvalidRow` unless ``envelope`` is the envelope of that event."""
    if text_too_deep(envelope):
        raise InvalidRow(f"its envelope nests more than {MAX_DEPTH} levels deep")
    try:
        value = from_json(envelope, allow_inf_nan=False)
    except ValueError as exc:
        raise InvalidRow(f"its envelope is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise InvalidRow(f"its envelope is not a JSON object but {_kind(value)}")
    data = value.get(EVENT_KEY)
    if not isinstance(data, dict):
        raise InvalidRow(f"its envelope has no {EVENT_KEY!r} object")
    if value.get(TYPE_KEY) != event_type:
        raise InvalidRow(
            f"its envelope's {TYPE_KEY!r} is {_short(value.get(TYPE_KEY))}, the row's "
            f"event_type {event_type!r}"
        )
    if data.get("event_id") != event_id:
        raise InvalidRow(
            f"its envelope's event_id is {_short(data.get('event_id'))}, the row's {event_id!r}"
        )
    if data.get("topic") != topic:
        raise InvalidRow(
            f"its envelope's topic is {_short(data.get('topic'))}, the row's {topic!r}"
        )


def checked_options(text: str, topic: str) -> dict[str, Any]:
    """The options of a row, or :class:`InvalidRow` when they are not what eventbus writes."""
    try:
        options = from_json(text, allow_inf_nan=False)
    except ValueError as exc:
        raise InvalidRow(f"its options are not JSON ({exc})") from None
    if not isinstance(options, dict):
        raise InvalidRow(f"its options are not a JSON object but {_kind(options)}")
    foreign = sorted(key for key in options if not key.startswith(OPTION_PREFIX))
    if foreign:
        raise InvalidRow(
            f"its options hold keys eventbus never writes: {', '.join(map(repr, foreign[:5]))}"
        )
    if options.get(keys.TOPIC) != topic:
        raise InvalidRow(
            f"its options name topic {_short(options.get(keys.TOPIC))}, the row {topic!r}"
        )
    for key in _STRING_OPTIONS:
        if not isinstance(options.get(key, ""), str):
            raise InvalidRow(f"its option {key!r} is {_kind(options[key])}, not a string")
    context = options.get(keys.TRACE_CONTEXT)
    if context is not None and not (
        isinstance(context, dict) and all(isinstance(v, str) for v in context.values())
    ):
        raise InvalidRow(f"its option {keys.TRACE_CONTEXT!r} is not an object of strings")
    due = options.get(keys.DELIVER_AT)
    if due is not None and (not isinstance(due, int) or isinstance(due, bool) or due < 0):
        raise InvalidRow(f"its option {keys.DELIVER_AT!r} is not a time in epoch milliseconds")
    return options


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "an object"
    return _JSON_KINDS.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (values here come from the row)."""
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"
