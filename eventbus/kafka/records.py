"""From an event to its Kafka record's headers (:class:`RecordHeaders`), and from a
Kafka record to what the bridge dispatches: its envelope, its message options, or,
for a record that can never become an event, its dead letter."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import eventbus.keys as keys
from eventbus.dlq.records import FailedEvent
from eventbus.events import (
    CORRELATION_ID,
    EVENT_KEY,
    TYPE_KEY,
    UnknownEvent,
    decode_event,
    too_deep,
)
from eventbus.exceptions import EventDecodeError
from eventbus.kafka.config import (
    HEADER_CORRELATION_ID,
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_REPLAY_OF,
    HEADER_TRACEPARENT,
    TRACE_CONTEXT_HEADERS,
    format_traceparent,
    parse_traceparent,
)

if TYPE_CHECKING:
    from aiokafka import ConsumerRecord

    from eventbus.backends.base import OutgoingEvent

#: Error type of dead letters written for poison records.
POISON_ERROR_TYPE = "EventDecodeError"
#: Handler name on dead letters of poison records (no handler ever saw them).
POISON_HANDLER = "eventbus.kafka-bridge"
#: Error type of the dead letter a worker writes back when a replay names a
#: handler its service does not have (the dead letter is kept, not lost).
REPLAY_REFUSED_ERROR_TYPE = "ReplayRefused"

#: ``<topic>:<partition>:<offset>:<service>:<handler>``: a service name has no
#: colon (``EVENTBUS_SERVICE``'s pattern), a Kafka topic neither, a handler may.
_DEAD_LETTER_ID = re.compile(
    r"(?P<topic>[^:]+):(?P<partition>\d+):(?P<offset>\d+):(?P<service>[^:]+):(?P<handler>.+)",
    re.DOTALL,
)


def dead_letter_id(topic: str, partition: int, offset: int, service: str, handler: str) -> str:
    """The id of a Kafka dead letter: the record, the service and the handler that
    failed on it, so two services' (or two handlers') failures of one record are two
    dead letters, and a replay knows where to go."""
    return f"{topic}:{partition}:{offset}:{service}:{handler}"


def dead_letter_address(record: FailedEvent) -> tuple[str, str] | None:
    """``(service, handler)`` named by ``record``'s id, or None for ids written
    before dead letters named their service (``<topic>:<partition>:<offset>`` of a
    poison record, or a message id)."""
    match = _DEAD_LETTER_ID.fullmatch(record.id)
    if match is None or match["topic"] != record.topic or match["handler"] != record.handler:
        return None
    return match["service"], match["handler"]


#: A record header: its name and its value.
Header = tuple[str, bytes]


class RecordHeaders:
    """The headers of one publish's records: event type, event id, correlation id and
    the trace context (the tracer's propagation fields, else a ``traceparent`` built
    from the publish span's ids when they are W3C ids).

    What the events of a batch share is encoded once: the type header of each class
    and the correlation id header (usually one per batch).  Use one instance per
    publish call; the header tuples it returns are shared between records.
    """

    def __init__(self) -> None:
        self._types: dict[str, Header] = {}
        self._cid = ""
        self._cid_header: Header = (HEADER_CORRELATION_ID, b"")

    def of(self, outgoing: OutgoingEvent) -> list[Header]:
        """The headers of ``outgoing``'s record."""
        event = outgoing.event
        type_name = event.event_type
        type_header = self._types.get(type_name)
        if type_header is None:
            type_header = self._types[type_name] = (HEADER_EVENT_TYPE, type_name.encode())
        cid = outgoing.correlation_id
        if cid != self._cid or not cid:
            self._cid = cid
            self._cid_header = (HEADER_CORRELATION_ID, cid.encode())
        headers = [type_header, (HEADER_EVENT_ID, event.event_id.encode()), self._cid_header]
        context = outgoing.trace_context
        if context:
            headers.extend(
                (name, context[name].encode()) for name in TRACE_CONTEXT_HEADERS if name in context
            )
        elif outgoing.trace_id:
            traceparent = format_traceparent(outgoing.trace_id, outgoing.span_id)
            if traceparent is not None:
                headers.append((HEADER_TRACEPARENT, traceparent.encode()))
        return headers


class Poison(Exception):
    """A record that can never become an event; the message says why.

    ``field_errors``: when its fields failed validation, each failing field (see
    :attr:`eventbus.exceptions.EventDecodeError.field_errors`).
    """

    def __init__(self, message: str, field_errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.field_errors: list[dict[str, str]] = field_errors or []


def decode_record(
    record: ConsumerRecord, accept_unknown_types: bool, typed: bool = False
) -> dict[str, Any]:
    """The event envelope a record holds.

    ``typed``: every handler of the record's topic declared its own event class.
    Each then validates the fields into its class whatever type name the envelope
    carries (the rule of every backend; see "Event identity" in docs/guide.md), so
    only the fields every event has are checked here, and a type name this
    process does not define is no reason to set the record aside.

    Raises:
      Poison: No value, not UTF-8 JSON, nested too deeply, not an envelope,
        invalid fields, or (unless ``accept_unknown_types`` or ``typed``) a type
        this process does not define.
    """
    if record.value is None:
        raise Poison("record has no value")
    try:
        envelope = json.loads(bytes(record.value).decode("utf-8"))
    except RecursionError:  # deeper than the parser's stack: ~1,000 levels
        raise Poison("record value is too deeply nested to decode as JSON") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise Poison(f"record value is not UTF-8 JSON: {exc}") from None
    try:
        event = decode_event(envelope, UnknownEvent if typed else None)
    except EventDecodeError as exc:
        raise Poison(str(exc), exc.field_errors) from None
    if isinstance(event, UnknownEvent) and not (accept_unknown_types or typed):
        raise Poison(
            f"unknown event type {event.event_type!r}: no class of that name is "
            "defined in this process (set EVENTBUS_KAFKA_ACCEPT_UNKNOWN_TYPES=true "
            "to deliver it as UnknownEvent, or type the topic's handlers with "
            "their own event class)"
        )
    assert isinstance(envelope, dict)
    return envelope


def record_options(
    record: ConsumerRecord, envelope: dict[str, Any], headers: dict[str, bytes]
) -> dict[str, Any]:
    """The dramatiq message options of a record's handler messages: topic,
    correlation id, trace context and, on a replay, the dead letter it replays."""
    cid = headers.get(HEADER_CORRELATION_ID, b"").decode("utf-8", "replace")
    if not cid:
        cid = str(envelope[EVENT_KEY].get("metadata", {}).get(CORRELATION_ID, ""))
    options: dict[str, Any] = {keys.TOPIC: record.topic, keys.CORRELATION_ID: cid}
    context = {
        name: headers[name].decode("utf-8", "replace")
        for name in TRACE_CONTEXT_HEADERS
        if name in headers
    }
    if context:
        options[keys.TRACE_CONTEXT] = context
        parsed = parse_traceparent(context.get(HEADER_TRACEPARENT, ""))
        if parsed is not None:
            options[keys.TRACE_ID], options[keys.PARENT_SPAN_ID] = parsed
    replay_of = headers.get(HEADER_REPLAY_OF)
    if replay_of is not None:
        options[keys.REPLAY_OF] = replay_of.decode("utf-8", "replace")
    return options


def poison_dead_letter(
    record: ConsumerRecord,
    headers: dict[str, bytes],
    reason: str,
    service: str,
    field_errors: list[dict[str, str]] | None = None,
) -> FailedEvent:
    """The dead letter of a poison record, id
    ``<topic>:<partition>:<offset>:<service>:eventbus.kafka-bridge`` (replayed, it
    goes to every handler of the topic in ``service``).

    Its envelope is the record's value as JSON, or as text when it is not JSON or
    nests more than :data:`~eventbus.events.MAX_DEPTH` levels (writing such a
    value as JSON would fail again, and the write would be retried forever).
    """
    value: Any = None
    if record.value is not None:
        raw = bytes(record.value)
        try:
            value = json.loads(raw)
        except Exception:  # not JSON, or too deep for the parser (RecursionError)
            value = raw
        if value is raw or too_deep(value):
            value = raw.decode("utf-8", "backslashreplace")
    event_type = ""
    if isinstance(value, dict) and isinstance(value.get(TYPE_KEY), str):
        event_type = value[TYPE_KEY]
    return FailedEvent(
        id=dead_letter_id(record.topic, record.partition, record.offset, service, POISON_HANDLER),
        event=None,
        envelope=value,
        topic=record.topic,
        handler=POISON_HANDLER,
        queue="",
        attempts=0,
        error=reason + (f" (type {event_type})" if event_type else ""),
        error_type=POISON_ERROR_TYPE,
        correlation_id=headers.get(HEADER_CORRELATION_ID, b"").decode("utf-8", "replace"),
        partition=record.partition,
        offset=record.offset,
        field_errors=field_errors or [],
    )


def refused_replay(
    record: ConsumerRecord,
    headers: dict[str, bytes],
    envelope: dict[str, Any],
    original_id: str,
    service: str,
    handler: str,
) -> FailedEvent:
    """The dead letter ``original_id`` written back by a worker of ``service`` that
    got its replay but has no handler ``handler`` (renamed or removed): kept, with
    the reason, rather than lost."""
    try:
        event = decode_event(envelope)
    except EventDecodeError:
        event = None
    what = f"handler {handler!r}" if handler != POISON_HANDLER else "handler of this topic"
    return FailedEvent(
        id=original_id,
        event=event,
        envelope=envelope,
        topic=record.topic,
        handler=handler,
        queue="",
        attempts=0,
        error=(
            f"replay refused: the workers of service {service!r} have no {what} (renamed "
            "or removed?); the dead letter is kept: deploy the handler and replay it "
            "again, or purge it"
        ),
        error_type=REPLAY_REFUSED_ERROR_TYPE,
        correlation_id=headers.get(HEADER_CORRELATION_ID, b"").decode("utf-8", "replace"),
        partition=record.partition,
        offset=record.offset,
    )
