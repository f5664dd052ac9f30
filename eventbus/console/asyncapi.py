"""The AsyncAPI document of the application, served as JSON and as a web page.

Mount it behind your auth, like the console::

    from eventbus.console.asyncapi import asyncapi_router

    app.include_router(asyncapi_router(bus, dependencies=[Depends(require_admin)]))

``GET /eventbus/asyncapi.json`` answers the document
(:func:`~eventbus.contracts.asyncapi.asyncapi_document`); ``GET /eventbus/asyncapi``
a page rendered on the server (Jinja2, the ``console`` extra): the servers, the
channels, the operations with their service and queue, and each message with a
table of its fields (name, type, required, default, constraints, description).
No JavaScript and no external asset: the page carries the console's
Content-Security-Policy, which allows no script at all.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from importlib import resources
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from eventbus.bus import EventBus
from eventbus.console.views import environment, render
from eventbus.contracts.asyncapi import asyncapi_document
from eventbus.exceptions import ConfigurationError
from eventbus.fastapi import get_event_bus

#: JSON Schema keywords shown in a field's "constraints" column.
CONSTRAINTS = (
    "minLength",
    "maxLength",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "multipleOf",
    "pattern",
    "minItems",
    "maxItems",
    "uniqueItems",
)
_SCHEMA_REF = "#/components/schemas/"


def type_text(schema: Any) -> str:
    """A short readable type of a JSON Schema: ``integer``, ``list[Customer]``,
    ``string (date-time) | null``, ``"gold" | "silver"``."""
    if not isinstance(schema, dict):
        return "any"
    ref = schema.get("$ref")
    if isinstance(ref, str):
        return ref.rpartition("/")[2]
    if "const" in schema:
        return json.dumps(schema["const"])
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            return " | ".join(type_text(s) for s in schema[key])
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) == 1:
        return type_text(schema["allOf"][0])
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(str(k) for k in kind)
    if kind == "array":
        if isinstance(schema.get("prefixItems"), list):
            return "tuple[" + ", ".join(type_text(s) for s in schema["prefixItems"]) + "]"
        return f"list[{type_text(schema.get('items'))}]"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"dict[string, {type_text(schema['additionalProperties'])}]"
    if kind is None:
        return "any"
    fmt = schema.get("format")
    return f"{kind} ({fmt})" if fmt else str(kind)


def _refs(schema: Any) -> list[str]:
    """The ``components.schemas`` keys ``schema`` refers to (its own level and below)."""
    found: list[str] = []
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith(_SCHEMA_REF):
            found.append(ref[len(_SCHEMA_REF) :])
        for value in schema.values():
            found += _refs(value)
    elif isinstance(schema, list):
        for value in schema:
            found += _refs(value)
    return list(dict.fromkeys(found))


def field_rows(schema: dict[str, Any], envelope: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The rows of a fields table: one per property of an object schema."""
    required = set(schema.get("required") or ())
    rows = []
    for name, prop in (schema.get("properties") or {}).items():
        prop = prop if isinstance(prop, dict) else {}
        constraints = [f"{k} {json.dumps(prop[k])}" for k in CONSTRAINTS if k in prop]
        rows.append(
            {
                "name": name,
                "type": type_text(prop),
                "links": _refs(prop),
                "required": name in required,
                "default": json.dumps(prop["default"]) if "default" in prop else "",
                "constraints": ", ".join(constraints),
                "description": prop.get("description") or "",
                "envelope": name in envelope,
            }
        )
    return rows


def page_context(document: dict[str, Any]) -> dict[str, Any]:
    """What the page shows, from the document: plain values for the template."""
    from eventbus.contracts.asyncapi import ENVELOPE_PROPERTIES

    components = document.get("components") or {}
    schemas: dict[str, Any] = components.get("schemas") or {}
    operations = []
    by_channel: dict[str, list[str]] = {}
    for key, op in (document.get("operations") or {}).items():
        channel = op["channel"]["$ref"].rpartition("/")[2]
        messages = [m["$ref"].rpartition("/")[2] for m in op.get("messages", [])]
        by_channel.setdefault(channel, []).append(key)
        operations.append(
            {
                "key": key,
                "action": op["action"],
                "title": op.get("title", key),
                "channel": channel,
                "address": document["channels"][channel].get("address", channel),
                "messages": messages,
                "service": op.get("x-eventbus-service", ""),
                "queue": op.get("x-eventbus-queue", ""),
                "description": op.get("description", ""),
            }
        )
    channels = [
        {
            "key": key,
            "address": channel.get("address", key),
            "messages": list(channel.get("messages") or {}),
            "operations": by_channel.get(key, []),
        }
        for key, channel in (document.get("channels") or {}).items()
    ]
    messages = []
    for key, message in (components.get("messages") or {}).items():
        payload = message.get("payload") or {}
        event = (payload.get("properties") or {}).get("event") or {}
        ref = event.get("$ref", "")
        event_schema = schemas.get(ref[len(_SCHEMA_REF) :], {}) if ref else event
        messages.append(
            {
                "key": key,
                "name": message.get("name", key),
                "title": message.get("title", key),
                "summary": message.get("summary", ""),
                "topic": message.get("x-eventbus-topic", ""),
                "version": message.get("x-eventbus-version"),
                "envelope": field_rows(payload),
                "fields": field_rows(event_schema, envelope=tuple(ENVELOPE_PROPERTIES)),
            }
        )
    event_schemas = {
        m["event"]["$ref"][len(_SCHEMA_REF) :]
        for m in (
            (msg.get("payload") or {}).get("properties") or {}
            for msg in (components.get("messages") or {}).values()
        )
        if isinstance(m.get("event"), dict) and "$ref" in m["event"]
    }
    nested = [
        {
            "key": key,
            "title": schema.get("title", key),
            "description": schema.get("description", ""),
            "type": type_text(schema),
            "fields": field_rows(schema),
        }
        for key, schema in schemas.items()
        if key not in event_schemas
    ]
    return {
        "info": document["info"],
        "asyncapi": document["asyncapi"],
        "service": document.get("x-eventbus-service", ""),
        "backend": document.get("x-eventbus-backend", ""),
        "servers": [
            {
                "key": key,
                "protocol": server.get("protocol", ""),
                "host": server.get("host", ""),
                "pathname": server.get("pathname", ""),
                "description": server.get("description", ""),
            }
            for key, server in (document.get("servers") or {}).items()
        ],
        "channels": channels,
        "operations": operations,
        "messages": messages,
        "schemas": nested,
    }


def asyncapi_router(
    bus: EventBus | None = None,
    *,
    dependencies: Sequence[Any] | None = None,
    allow_unauthenticated: bool = False,
    prefix: str = "/eventbus",
    title: str | None = None,
    version: str | None = None,
) -> APIRouter:
    """A router serving the application's AsyncAPI document under ``prefix``.

    Routes: ``GET {prefix}/asyncapi.json`` (the document), ``GET {prefix}/asyncapi``
    (the page) and ``GET {prefix}/asyncapi.css`` (the page's stylesheet, the
    console's).  The document is built on each request, so handlers registered
    at run time are in it.

    Parameters:
      bus: The bus to describe; None: the app's (``get_event_bus``).
      dependencies: Your auth (the document names every handler, queue and
        event field, and the broker's address).
      allow_unauthenticated: Mount without ``dependencies`` (a private network, or
        a document you mean to publish).
      prefix: Where the routes live.
      title: ``info.title`` (see :func:`~eventbus.contracts.asyncapi.asyncapi_document`).
      version: ``info.version``.

    Raises:
      ConfigurationError: No ``dependencies`` and not ``allow_unauthenticated``.
    """
    if not dependencies and not allow_unauthenticated:
        raise ConfigurationError(
            "asyncapi_router() needs an auth dependency, e.g. "
            "asyncapi_router(bus, dependencies=[Depends(require_admin)]); pass "
            "allow_unauthenticated=True only if every client that can reach it may "
            "read your handlers, queues, event schemas and broker address"
        )
    base = prefix.rstrip("/")
    router = APIRouter(prefix=base, dependencies=list(dependencies or ()), include_in_schema=False)
    env = environment()

    def document_of(request: Request) -> dict[str, Any]:
        target: Any = bus if bus is not None else get_event_bus(request)
        if getattr(request.app.state, "event_bus", None) is target:
            target = request.app  # for the app's title and version
        return asyncapi_document(target, title=title, version=version)

    @router.get("/asyncapi.json")
    async def asyncapi_json(request: Request) -> Response:
        return JSONResponse(document_of(request), headers={"Cache-Control": "no-store"})

    @router.get("/asyncapi", response_class=HTMLResponse)
    async def asyncapi_page(request: Request) -> Response:
        started = time.perf_counter()
        context = page_context(document_of(request))
        context["base"] = base
        return render(env, "asyncapi.html", context, started=started)

    @router.get("/asyncapi.css")
    async def stylesheet() -> Response:
        body = resources.files("eventbus").joinpath("static", "console", "console.css")
        return Response(
            body.read_bytes(),
            media_type="text/css; charset=utf-8",
            headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"},
        )

    return router


__all__ = ["asyncapi_router", "field_rows", "page_context", "type_text"]
