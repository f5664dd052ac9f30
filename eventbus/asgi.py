"""Correlation ids: the ASGI middleware that sets them and the context that carries them.

:class:`EventBusMiddleware` gives every HTTP request a correlation id, taken from
the ``X-Correlation-ID`` request header or freshly generated, and echoes it on the
response.  Events published while the request runs carry it in their metadata,
and inside their handlers :func:`get_correlation_id` returns it again.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The header read from requests and set on responses.
DEFAULT_HEADER = "X-Correlation-ID"

#: Incoming ids must match this; anything else (too long, odd characters that
#: could forge log lines) is replaced by a fresh id.
_VALID_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")

correlation_id_var: ContextVar[str] = ContextVar("eventbus_correlation_id", default="")


def get_correlation_id() -> str:
    """The correlation id of the current request or event, or ``""`` outside both."""
    return correlation_id_var.get()


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


class EventBusMiddleware:
    """Pure ASGI middleware that sets a correlation id per HTTP request.

    Example::

        app.add_middleware(EventBusMiddleware)

    Parameters:
      app: The ASGI application to wrap.
      header_name: The request and response header carrying the id.
    """

    def __init__(self, app: ASGIApp, header_name: str = DEFAULT_HEADER) -> None:
        self.app = app
        self.header_name = header_name
        self._header_key = header_name.lower().encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return

        cid = ""
        for key, value in scope.get("headers", ()):
            if key == self._header_key:
                candidate = value.decode("latin-1")
                if _VALID_ID.fullmatch(candidate):
                    cid = candidate
                break
        cid = cid or new_correlation_id()
        encoded = cid.encode("latin-1")

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                headers.append((self._header_key, encoded))
                message["headers"] = headers
            await send(message)

        token = correlation_id_var.set(cid)
        try:
            await self.app(scope, receive, send_with_header)
        finally:
            correlation_id_var.reset(token)
