"""Correlation ids: the ASGI middleware that sets them and the context that carries them.

:class:`EventBusMiddleware` gives every HTTP request a correlation id, taken from
the ``X-Correlation-ID`` request header or freshly generated, and echoes it on the
response.  Events published while the request runs carry it in their metadata,
and inside their handlers :func:`get_correlation_id` returns it again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from eventbus.context import (
    VALID_CORRELATION_ID,
    CorrelationIdFilter,
    correlation_id_var,
    get_correlation_id,
    new_correlation_id,
)

__all__ = [
    "CorrelationIdFilter",
    "EventBusMiddleware",
    "correlation_id_var",
    "get_correlation_id",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The header read from requests and set on responses.
DEFAULT_HEADER = "X-Correlation-ID"


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
                if VALID_CORRELATION_ID.fullmatch(candidate):
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
