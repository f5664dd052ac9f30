"""Retry policy and the dramatiq middleware that applies it per handler.

A failed handler attempt is retried alone: its message (one per handler) is
re-enqueued with a delay of ``delay * backoff_factor ** k`` seconds after the
(k+1)-th failure, capped at ``max_delay``.  When the policy gives up, the message
is marked failed and :class:`~eventbus.middleware.dead_letters.DeadLetters`
records it.

Unlike dramatiq's own ``Retries`` (20 retries, 15 s minimum backoff, up to 7 days
between attempts), the defaults here are the seed's: 3 retries, 1 s, x2, 60 s.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from dramatiq import Middleware
from dramatiq.errors import ActorNotFound
from dramatiq.errors import Retry as DramatiqRetry
from dramatiq.middleware.time_limit import TimeLimitExceeded

from ..config import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_RETRY_BACKOFF_FACTOR,
    DEFAULT_RETRY_DELAY,
    DEFAULT_RETRY_MAX_DELAY,
    EventBusSettings,
)
from ..exceptions import ConfigurationError, EventDecodeError, HandlerTimeout, ShutdownError
from ..metrics import MetricsCollector
from . import keys

if TYPE_CHECKING:
    from dramatiq import Broker
    from dramatiq.broker import MessageProxy

    from ..registry import HandlerSpec

logger = logging.getLogger(__name__)

#: Exceptions never retried: a retry cannot fix them.
NEVER_RETRIED: tuple[type[BaseException], ...] = (EventDecodeError, ActorNotFound, ShutdownError)


class Retry(DramatiqRetry):
    """Raise from a handler to ask for a retry after ``delay`` seconds.

    It counts as a failed attempt, without an error log.  ``delay=None`` uses the
    policy's backoff.
    """

    def __init__(self, message: str = "", *, delay: float | None = None) -> None:
        super().__init__(message, delay=None if delay is None else int(delay * 1000))


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
        if not 0 <= self.jitter <= 1:
            raise ConfigurationError(f"jitter must be between 0 and 1, got {self.jitter}")
        if self.max_retries < 0:
            raise ConfigurationError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.delay < 0 or self.max_delay < 0:
            raise ConfigurationError("retry delay and max_delay must be >= 0")
        if self.backoff_factor < 1:
            raise ConfigurationError(f"backoff_factor must be >= 1, got {self.backoff_factor}")

    @classmethod
    def from_settings(cls, settings: EventBusSettings) -> RetryPolicy:
        """The policy the ``EVENTBUS_MAX_RETRIES`` / ``EVENTBUS_RETRY_*`` settings describe."""
        return cls(
            max_retries=settings.max_retries,
            delay=settings.retry_delay,
            backoff_factor=settings.retry_backoff_factor,
            max_delay=settings.retry_max_delay,
        )

    def with_max_retries(self, max_retries: int) -> RetryPolicy:
        """This policy with another ``max_retries``."""
        return replace(self, max_retries=max_retries)

    def get_delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
        delay = min(self.delay * self.backoff_factor**attempt, self.max_delay)
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
    entries.append([int(time.time() * 1000), name, str(exception)[: keys.MAX_ATTEMPT_ERROR]])
    return entries[-keys.MAX_ATTEMPT_LOG :]


class Retries(Middleware):
    """Re-enqueues a failed handler message with backoff, or marks it failed.

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
        failures = int(message.options.get(keys.ATTEMPTS, 0)) + 1
        policy = self.policy_for(broker, message.actor_name)
        if not policy.should_retry(exception, failures):
            message.fail()
            return

        if isinstance(exception, DramatiqRetry) and exception.delay is not None:
            delay_ms = int(exception.delay)
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
        except Exception:
            logger.exception("Could not schedule a retry of %s; dead-lettering it.", message)
            message.fail()
            return
        self.metrics.inc_retry(str(message.options.get(keys.TOPIC, "")), failures)
