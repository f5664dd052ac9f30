"""The dramatiq middleware that turns failed handler messages into dead letters."""

from __future__ import annotations

import logging
import traceback
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from dramatiq import Middleware
from dramatiq.middleware.time_limit import TimeLimitExceeded

import eventbus.keys as keys
from eventbus.dlq.records import FailedEvent
from eventbus.dlq.store import DeadLetterStore
from eventbus.events import EVENT_KEY, decode_event
from eventbus.exceptions import EventDecodeError, HandlerTimeout
from eventbus.metrics import MetricsCollector
from eventbus.middleware.retries import (
    Outcome,
    attempt_log,
    error_text,
    failed_attempts,
    set_outcome,
)

if TYPE_CHECKING:
    from dramatiq import Broker, Message
    from dramatiq.broker import MessageProxy

logger = logging.getLogger(__name__)

#: Message option naming the dead letter's id, for backends whose records have an
#: address of their own (Kafka: ``<topic>:<partition>:<offset>:<service>:<handler>``);
#: without it the id is the message id.
DEAD_LETTER_ID = "eventbus_dead_letter_id"

#: Epoch milliseconds of the end of year 9999 (the largest datetime).
_MAX_EPOCH_MS = 253_402_300_799_000


class DeadLetters(Middleware):
    """Records a :class:`~eventbus.dlq.records.FailedEvent` for each message marked failed.

    It must come *before* :class:`~eventbus.middleware.retries.Retries` in the
    middleware list: dramatiq runs ``after_*`` hooks in reverse order, and the
    record is written once Retries has decided to give up.

    The message's :class:`~eventbus.middleware.retries.Outcome` says whether the
    record was written: when the store raises (Redis down, say), the outcome stays
    ``UNRECORDED`` and the message's consumer hands the event over again later
    instead of acknowledging it; the error is logged, never swallowed.

    Parameters:
      store: Where records go; None when dead-lettering is disabled (failures are
        then only logged).
      metrics: Receives ``inc_dlq`` once per record.
    """

    def __init__(self, store: DeadLetterStore | None, metrics: MetricsCollector) -> None:
        self.store = store
        self.metrics = metrics

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None or not message.failed:
            return
        try:
            written = self.record(message, exception)
        except Exception as error:
            set_outcome(message, Outcome.UNRECORDED)
            logger.error(
                "Could not write the dead letter of handler %s (event %s): %s: %s. It "
                "stays in flight and is handled again later.",
                message.actor_name,
                message.message_id,
                type(error).__name__,
                error_text(error),
                exc_info=True,
            )
            return
        set_outcome(message, Outcome.DEAD_LETTER if written else Outcome.DROPPED)

    def record(self, message: Message[Any] | MessageProxy, exception: BaseException) -> bool:
        """Write the dead letter of ``message`` that failed with ``exception``; False
        when dead-lettering is disabled (the failure is only logged).

        Raises:
          Exception: Whatever the store raises when it cannot write the record.
        """
        failed = build_failed_event(message, exception)
        logger.warning(
            "Handler %s gave up on event %s after %d attempt(s): %s: %s",
            failed.handler,
            failed.event.event_id if failed.event else "<undecodable>",
            failed.attempts,
            failed.error_type,
            failed.error,
        )
        if self.store is None:
            logger.error("Dead-lettering is disabled; the event above is dropped.")
            return False
        self.store.add(failed)
        try:
            self.metrics.inc_dlq(failed.topic)
        except Exception:  # the record is written: a metrics bug must not undo it
            logger.exception("The metrics collector failed to count a dead letter.")
        return True


def _error_type(exception: BaseException) -> str:
    # dramatiq's worker raises TimeLimitExceeded where the embedded backend raises
    # HandlerTimeout: one name for one failure, whatever the backend.
    if isinstance(exception, TimeLimitExceeded):
        return HandlerTimeout.__name__
    return type(exception).__name__


def _describe(message: Message[Any] | MessageProxy, exception: BaseException) -> str:
    if isinstance(exception, TimeLimitExceeded):
        return f"handler {message.actor_name} exceeded its time limit"
    return type(exception).__name__


def build_failed_event(
    message: Message[Any] | MessageProxy, exception: BaseException
) -> FailedEvent:
    """The FailedEvent of ``message`` whose last attempt raised ``exception``."""
    options = message.options
    envelope = message.args[0] if message.args else None
    try:
        event = decode_event(envelope)
    except EventDecodeError:
        event = None
    now = datetime.now(UTC)
    first = options.get(keys.FIRST_FAILED_AT)
    topic = options.get(keys.TOPIC) or (event.topic if event else "")
    if not topic and isinstance(envelope, dict) and isinstance(envelope.get(EVENT_KEY), dict):
        topic = str(envelope[EVENT_KEY].get("topic", ""))
    return FailedEvent(
        id=str(options.get(DEAD_LETTER_ID) or message.message_id),
        event=event,
        envelope=envelope,
        topic=str(topic),
        handler=message.actor_name,
        queue=message.queue_name,
        attempts=failed_attempts(message) + 1,
        error=error_text(exception) or _describe(message, exception),
        error_type=_error_type(exception),
        traceback="".join(traceback.format_exception(exception)),
        first_failed_at=datetime.fromtimestamp(first / 1000, UTC) if first else now,
        last_failed_at=now,
        correlation_id=str(options.get(keys.CORRELATION_ID, "")),
        trace_id=str(options.get(keys.TRACE_ID, "")),
        replay_of=str(options.get(keys.REPLAY_OF) or ""),
        field_errors=list(exception.field_errors)
        if isinstance(exception, EventDecodeError)
        else [],
        attempt_log=[
            {
                "at": datetime.fromtimestamp(entry[0] / 1000, UTC),
                "error_type": str(entry[1]),
                "error": str(entry[2]),
            }
            for entry in attempt_log(options, exception)
            if len(entry) == 3
            and isinstance(entry[0], int | float)
            and 0 <= entry[0] <= _MAX_EPOCH_MS  # from the wire: hostile values are dropped
        ],
    )
