"""The context that travels with an event: correlation id, span, the event being handled.

Backends, middlewares, the tracer and the ASGI middleware read and set these
variables; nothing here imports another eventbus module.
"""

from __future__ import annotations

import logging
import os
import re
from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from eventbus.events import BaseEvent

#: Correlation ids must match this; anything else (too long, characters that could
#: forge log lines or headers) is replaced by a fresh id.
VALID_CORRELATION_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")

#: The correlation id of the request or event being handled (``""``: none).
correlation_id_var: ContextVar[str] = ContextVar("eventbus_correlation_id", default="")
#: The event whose handler runs in this context.
current_event_var: ContextVar[BaseEvent | None] = ContextVar("eventbus_current_event", default=None)


def get_correlation_id() -> str:
    """The correlation id of the current request or event, or ``""`` outside both."""
    return correlation_id_var.get()


def get_current_event() -> BaseEvent | None:
    """The event whose handler is running in this context, if any."""
    return current_event_var.get()


def new_correlation_id() -> str:
    """A fresh correlation id (32 random hex characters)."""
    return os.urandom(16).hex()


def new_message_id() -> str:
    """A fresh message id: 128 random bits in UUID form, cheaper than uuid.uuid4()."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class CorrelationIdFilter(logging.Filter):
    """Adds ``record.correlation_id`` to every log record (``""`` outside a request or event).

    Example::

        handler = logging.StreamHandler()
        handler.addFilter(CorrelationIdFilter())
        handler.setFormatter(logging.Formatter("%(correlation_id)s %(levelname)s %(message)s"))
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.correlation_id = correlation_id_var.get()
        return True
