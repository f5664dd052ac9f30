"""Retry policy and the dramatiq middleware that applies it per handler.

A failed handler attempt is retried alone: its message (one per handler) is
re-enqueued with a delay of ``delay * backoff_factor ** k`` seconds after the
(k+1)-th failure, capped at ``max_delay``.  When the policy gives up, the message
is marked failed and :class:`~eventbus.middleware.dead_letters.DeadLetters`
records it.

Unlike dramatiq's own ``Retries`` (20 retries, 15 s minimum backoff, up to 7 days
between attempts), the defaults here are the seed's: 3 retries, 1 s, x2, 60 s.

**Durable before acknowledged.**  Each failed attempt gets an :class:`Outcome` on
its message: :attr:`Outcome.RETRY` once the retry is enqueued,
:attr:`Outcome.DEAD_LETTER` once the dead letter is written, and
:attr:`Outcome.UNRECORDED` while neither is (the broker or the dead-letter store
is unreachable, or the write raised).  A consumer never acknowledges an
unrecorded attempt away: it hands the event over again later (see
:func:`unrecorded`).  A failure inside this middleware itself (a retry policy
with a bug) dead-letters the event rather than acknowledging it.
"""

from __future__ import annotations

import enum
import logging
import math
import random
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from dramatiq import Middleware
from dramatiq.errors import ActorNotFound, BrokerConnectionError
from dramatiq.errors import Retry as DramatiqRetry
from dramatiq.middleware.time_limit import TimeLimitExceeded

import eventbus.keys as keys
from eventbus.config import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_RETRY_BACKOFF_FACTOR,
    DEFAULT_RETRY_DELAY,
    DEFAULT_RETRY_MAX_DELAY,
    MAX_BACKOFF_FACTOR_LIMIT,
    MAX_RETRIES_LIMIT,
    MAX_RETRY_DELAY_LIMIT,
    EventBusSettings,
)
from eventbus.exceptions import ConfigurationError, EventDecodeError, HandlerTimeout, ShutdownError
from eventbus.metrics import MetricsCollector

if TYPE_CHECKING:
    from dramatiq import Broker, Message
    from dramatiq.broker import MessageProxy

    from eventbus.registry import HandlerSpec

logger = logging.getLogger(__name__)

#: Exceptions never retried: a retry cannot fix them.
NEVER_RETRIED: tuple[type[BaseException], ...] = (EventDecodeError, ActorNotFound, ShutdownError)
#: The ``EVENTBUS_*`` setting behind each field :meth:`RetryPolicy.from_settings` fills.
_SETTING_OF = {
    "max_retries": "EVENTBUS_MAX_RETRIES",
    "delay": "EVENTBUS_RETRY_DELAY",
    "backoff_factor": "EVENTBUS_RETRY_BACKOFF_FACTOR",
    "max_delay": "EVENTBUS_RETRY_MAX_DELAY",
}
#: Seconds before a consumer hands over again an event whose failed attempt could
#: not be recorded (neither retry nor dead letter written): long enough not to spin
#: on a store that keeps failing, short next to an outage.
UNRECORDED_REDELIVERY_DELAY = 1.0
#: Attribute of a message proxy holding the :class:`Outcome` of its failed attempt.
_OUTCOME = "eventbus_outcome"


class Outcome(enum.Enum):
    """What is durably written about a failed attempt of a message."""

    #: Neither a retry nor a dead letter is written: the message must not leave
    #: its queue; its consumer hands it over again later.
    UNRECORDED = "unrecorded"
    #: Its retry is enqueued.
    RETRY = "retry"
    #: Its dead letter is written (or, for a store that writes asynchronously such
    #: as Kafka's, handed to the store, whose consumer waits for the write).
    DEAD_LETTER = "dead letter"
    #: Dead-lettering is disabled (``EVENTBUS_DLQ_ENABLED=false``): the failure is
    #: only logged, as configured.
    DROPPED = "dropped"


def set_outcome(message: MessageProxy, outcome: Outcome) -> None:
    """Record what became of ``message``'s failed attempt (see :class:`Outcome`)."""
    setattr(message, _OUTCOME, outcome)


def outcome_of(message: MessageProxy) -> Outcome | None:
    """The outcome of ``message``'s failed attempt; None when it did not fail (or
    no :class:`Retries` middleware saw it)."""
    outcome = getattr(message, _OUTCOME, None)
    return outcome if isinstance(outcome, Outcome) else None


def unrecorded(message: MessageProxy) -> bool:
    """Whether ``message`` failed and neither its retry nor its dead letter is
    written: its consumer must hand it over again later, never acknowledge it."""
    return outcome_of(message) is Outcome.UNRECORDED


def error_text(exception: BaseException) -> str:
    """``str(exception)``, or a stand-in when its ``__str__`` raises."""
    try:
        return str(exception)
    except Exception:
        return f"<{type(exception).__name__}: its message could not be rendered>"


class Retry(DramatiqRetry):
    """Raise from a handler to ask for a retry after ``delay`` seconds.

    It counts as a failed attempt, without an error log.  ``delay=None`` uses the
    policy's backoff.
    """

    def __init__(self, message: str = "", *, delay: float | None = None) -> None:
        super().__init__(message, delay=None if delay is None else int(delay * 1000))


def policy_problem(
    max_retries: object, delay: object, backoff_factor: object, max_delay: object, jitter: object
) -> tuple[str, str] | None:
    """The first retry parameter that cannot work, and why (None: all can)."""
    if not isinstance(max_retries, int) or isinstance(max_retries, bool):
        return "max_retries", f"must be a whole number, got {max_retries!r}"
    if not 0 <= max_retries <= MAX_RETRIES_LIMIT:
        return "max_retries", (
            f"must be between 0 and {MAX_RETRIES_LIMIT}, got {max_retries} (to retry for "
            "longer, raise the maximum delay instead)"
        )
    week = MAX_RETRY_DELAY_LIMIT
    numbers: list[tuple[str, object, float, float, str]] = [
        ("delay", delay, 0.0, week, "seconds, 0 to a week"),
        ("backoff_factor", backoff_factor, 1.0, MAX_BACKOFF_FACTOR_LIMIT, "a factor from 1 to 100"),
        ("max_delay", max_delay, 0.0, week, "seconds, 0 to a week"),
        ("jitter", jitter, 0.0, 1.0, "a fraction between 0 and 1"),
    ]
    for name, value, low, high, wanted in numbers:
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
            or not low <= value <= high
        ):
            return name, f"must be a finite number of {wanted}, got {value!r}"
    return None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often, and how far apart, a failing handler is retried.

    Parameters:
      max_retries: Retries after the first attempt (0: one attempt only).
      delay: Seconds before the first retry.
      backoff_factor: Each further retry waits this many times longer.
      max_delay: Cap on any single delay, in seconds.
      retryable_exceptions: Only these exception types are retried; any other
        goes straight to the dead-letter store.
      non_retryable_exceptions: These are never retried, even when they are also
        retryable (``ValueError`` inside ``Exception``, say).
      jitter: Fraction of each delay drawn at random, 0 to 1: with 0.2 a 10 s delay
        becomes 8 to 12 s, so failures of many events do not retry in lockstep.

    Values that cannot work are refused with a :class:`~eventbus.ConfigurationError`
    naming the parameter, within the bounds the ``EVENTBUS_*`` settings have: a
    delay, cap or factor that is not a finite number, delays over a week, a factor
    over 100, ``max_retries`` over 1,000
    (:data:`~eventbus.config.MAX_RETRIES_LIMIT`: a poison event dies within days;
    to retry for longer, raise ``max_delay``).  The backoff never overflows: once
    ``delay * backoff_factor ** k`` passes ``max_delay`` (or the largest float),
    every further retry waits ``max_delay``.

    Example::

        bus = EventBus(retry_policy=RetryPolicy(max_retries=5, delay=0.5, jitter=0.1))

        @on_event("payment.captured", retry=RetryPolicy(non_retryable_exceptions=(ValueError,)))
        async def book(event): ...
    """

    max_retries: int = DEFAULT_MAX_RETRIES
    delay: float = DEFAULT_RETRY_DELAY
    backoff_factor: float = DEFAULT_RETRY_BACKOFF_FACTOR
    max_delay: float = DEFAULT_RETRY_MAX_DELAY
    retryable_exceptions: tuple[type[BaseException], ...] = field(default=(Exception,))
    non_retryable_exceptions: tuple[type[BaseException], ...] = ()
    jitter: float = 0.0

    def __post_init__(self) -> None:
        problem = policy_problem(
            self.max_retries, self.delay, self.backoff_factor, self.max_delay, self.jitter
        )
        if problem is not None:
            name, text = problem
            raise ConfigurationError(f"RetryPolicy {name} {text}")

    @classmethod
    def from_settings(cls, settings: EventBusSettings) -> RetryPolicy:
        """The policy the ``EVENTBUS_MAX_RETRIES`` / ``EVENTBUS_RETRY_*`` settings describe.

        Raises:
          ConfigurationError: A setting cannot work; the message names it.
        """
        options: dict[str, Any] = {
            "max_retries": settings.max_retries,
            "delay": settings.retry_delay,
            "backoff_factor": settings.retry_backoff_factor,
            "max_delay": settings.retry_max_delay,
        }
        problem = policy_problem(**options, jitter=0.0)
        if problem is not None:
            name, text = problem
            raise ConfigurationError(f"{_SETTING_OF[name]} {text}")
        return cls(**options)

    def with_max_retries(self, max_retries: int) -> RetryPolicy:
        """This policy with another ``max_retries``."""
        return replace(self, max_retries=max_retries)

    def get_delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based); at most
        ``max_delay`` (before jitter), however large ``attempt`` is."""
        delay = float(self.delay)
        if attempt > 0 and delay > 0 and self.backoff_factor > 1:
            try:
                delay *= self.backoff_factor**attempt  # inf once past the largest float
            except OverflowError:
                delay = math.inf
        delay = min(delay, self.max_delay)
        if self.jitter:
            delay *= 1 + random.uniform(-self.jitter, self.jitter)
        return float(delay)

    def should_retry(self, exception: BaseException, failures: int) -> bool:
        """Whether to try again after ``failures`` failed attempts ending in ``exception``."""
        if failures > self.max_retries or isinstance(exception, NEVER_RETRIED):
            return False
        if isinstance(exception, self.non_retryable_exceptions):
            return False
        if isinstance(exception, TimeLimitExceeded):  # a worker's time limit: a BaseException
            return issubclass(HandlerTimeout, self.retryable_exceptions) and not issubclass(
                HandlerTimeout, self.non_retryable_exceptions
            )
        return isinstance(exception, self.retryable_exceptions)


def attempt_log(options: dict[str, Any], exception: BaseException) -> list[list[Any]]:
    """The message's attempt log with the attempt that just failed with ``exception``."""
    log = options.get(keys.ATTEMPT_LOG)
    entries = [e for e in log if isinstance(e, list)] if isinstance(log, list) else []
    name = (
        "HandlerTimeout" if isinstance(exception, TimeLimitExceeded) else type(exception).__name__
    )
    entries.append([int(time.time() * 1000), name, error_text(exception)[: keys.MAX_ATTEMPT_ERROR]])
    return entries[-keys.MAX_ATTEMPT_LOG :]


def failed_attempts(message: Message[Any] | MessageProxy) -> int:
    """Failed attempts of ``message`` before this one (0 when the option is absent or
    not a count: it comes from the wire)."""
    count = message.options.get(keys.ATTEMPTS, 0)
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else 0


class Retries(Middleware):
    """Re-enqueues a failed handler message with backoff, or marks it failed.

    Each failed attempt gets its :class:`Outcome`: a retry is recorded once
    enqueued; when the broker is unreachable the attempt stays unrecorded and its
    consumer hands the event over again later (it is not dead-lettered for a
    broker outage).  Any other error while scheduling, a retry policy that raises
    included, dead-letters the event: a durable record an operator can replay,
    never a silent acknowledgement.

    Parameters:
      default_policy: The policy of handlers that set none of their own.
      metrics: Receives ``inc_retry`` once per scheduled retry.
    """

    def __init__(self, default_policy: RetryPolicy, metrics: MetricsCollector) -> None:
        self.default_policy = default_policy
        self.metrics = metrics

    @property
    def actor_options(self) -> set[str]:
        return {keys.HANDLER}

    def policy_for(self, broker: Broker, actor_name: str) -> RetryPolicy:
        """The retry policy of the handler behind ``actor_name``."""
        actor = broker.actors.get(actor_name)
        spec: HandlerSpec | None = actor.options.get(keys.HANDLER) if actor else None
        if spec is None:
            return self.default_policy
        if spec.retry is not None:
            return spec.retry
        if spec.max_retries is not None:
            return self.default_policy.with_max_retries(spec.max_retries)
        return self.default_policy

    def after_process_message(
        self,
        broker: Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None:
            return
        set_outcome(message, Outcome.UNRECORDED)
        try:
            failures = self._schedule(broker, message, exception)
        except Exception as error:
            # A retry policy (or this code) with a bug: record the event as a dead
            # letter, which an operator can replay, rather than ack it without a trace.
            reason = f"{type(error).__name__}: {error_text(error)}"
            logger.exception(
                "Could not decide on a retry of %s (%s); dead-lettering it.", message, reason
            )
            exception.add_note(f"eventbus: not retried, the retry middleware failed: {reason}")
            message.fail()
            return
        if failures:
            try:
                self.metrics.inc_retry(str(message.options.get(keys.TOPIC, "")), failures)
            except Exception:  # the retry is scheduled: a metrics bug must not undo it
                logger.exception("The metrics collector failed to count a retry.")

    def _schedule(self, broker: Broker, message: MessageProxy, exception: BaseException) -> int:
        """Enqueue the retry of ``message`` or mark it failed; returns the failed
        attempts so far when a retry was scheduled, else 0."""
        failures = failed_attempts(message) + 1
        policy = self.policy_for(broker, message.actor_name)
        if not policy.should_retry(exception, failures):
            message.fail()
            return 0

        if isinstance(exception, DramatiqRetry) and exception.delay is not None:
            delay_ms = max(0, int(exception.delay))
        else:
            delay_ms = int(policy.get_delay(failures - 1) * 1000)
        options: dict[str, Any] = {
            keys.ATTEMPTS: failures,
            keys.ATTEMPT_LOG: attempt_log(message.options, exception),
        }
        if keys.FIRST_FAILED_AT not in message.options:
            options[keys.FIRST_FAILED_AT] = int(time.time() * 1000)
        logger.info(
            "Handler %s failed attempt %d (%s); retrying in %d ms.",
            message.actor_name,
            failures,
            type(exception).__name__,
            delay_ms,
        )
        try:
            broker.enqueue(message.copy(options=options), delay=delay_ms)
        except BrokerConnectionError as error:
            logger.warning(
                "Could not schedule retry %d of handler %s (event %s): the broker is "
                "unreachable (%s). The event stays in flight and is handled again once "
                "the broker is back.",
                failures,
                message.actor_name,
                message.message_id,
                error_text(error),
            )
            return 0  # unrecorded: the consumer keeps it
        except Exception:
            logger.exception("Could not schedule a retry of %s; dead-lettering it.", message)
            message.fail()
            return 0
        set_outcome(message, Outcome.RETRY)
        return failures
