"""Exceptions raised by eventbus.

Every error the library raises on purpose derives from :class:`EventBusError`, so
``except EventBusError`` catches all of them and nothing else.
"""

from __future__ import annotations


class EventBusError(Exception):
    """Base class for every error raised by eventbus."""


class ConfigurationError(EventBusError, ValueError):
    """Invalid settings, options or names, raised when they are given."""


class PublishError(EventBusError):
    """An event could not be handed to the backend.

    Nothing of it was enqueued, unless the message says it *may have been
    published*: the request reached the backend but no answer came in time, so
    the backend may hold it (publishing it again can deliver it twice).
    """


class EventTooLargeError(PublishError):
    """An event's JSON is larger than ``EVENTBUS_MAX_EVENT_BYTES``; nothing was enqueued."""


class UnroutedError(PublishError):
    """No subscription anywhere handles a published topic (``EVENTBUS_UNROUTED=error``).

    Nothing of the publish call was enqueued.  ``topics`` names the topics.
    """

    def __init__(self, message: str, topics: list[str]) -> None:
        super().__init__(message)
        self.topics = topics


class SubscribeError(EventBusError):
    """Deprecated, never raised: kept so that code written for fastapi-eventbus
    0.1.1 that catches it still imports."""


class BackendError(EventBusError):
    """A backend operation failed.

    Parameters:
      message: What failed.
      backend: The name of the backend (``sync``, ``redis``, ``kafka``).
    """

    def __init__(self, message: str, backend: str = "unknown") -> None:
        super().__init__(message)
        self.backend = backend


class HandlerError(EventBusError):
    """Deprecated, never raised: kept so that code written for fastapi-eventbus
    0.1.1 that catches it still imports.  A failed handler is retried, then
    dead-lettered with its own exception (see ``FailedEvent.error_type``)."""

    def __init__(self, message: str, original: BaseException | None = None) -> None:
        super().__init__(message)
        self.original = original


class RetryExhaustedError(EventBusError):
    """Deprecated, never raised: kept so that code written for fastapi-eventbus
    0.1.1 that catches it still imports.  A handler that failed on every attempt
    its retry policy allowed is dead-lettered (``bus.dlq``)."""

    def __init__(self, message: str, attempts: int = 0) -> None:
        super().__init__(message)
        self.attempts = attempts


class EventDecodeError(EventBusError, ValueError):
    """A message payload is not a valid event envelope.

    Raised for bytes that are not JSON, an envelope without a type or fields, or
    fields that do not validate into the event class.  It is never retried: the
    message goes straight to the dead-letter store with this error as the reason.

    Parameters:
      message: What is wrong.
      field_errors: When fields failed validation, one entry per failing field:
        ``{"path": ..., "expected": ..., "got": ...}`` (recorded in the dead letter).
    """

    def __init__(self, message: str = "", field_errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.field_errors: list[dict[str, str]] = field_errors or []


class HandlerTimeout(EventBusError):
    """A handler ran past its ``time_limit``."""


class ShutdownError(EventBusError):
    """The bus stopped before an event was handled; the event is dead-lettered with this."""
