"""Rendering the console: the Jinja2 environment, value formatting, forms, headers.

Every value that came from a message (topic, payload, error, traceback, ids) is
rendered by Jinja2 with autoescaping on and never marked safe; links built from
such values percent-encode them into a URL whose scheme the application chose.
Pages also send a Content-Security-Policy that allows no script at all, so even
markup that slipped through could not run.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

from starlette.requests import Request
from starlette.responses import HTMLResponse

from eventbus.dlq.records import json_text
from eventbus.exceptions import ConfigurationError
from eventbus.extras import requires_extra

with requires_extra("console", "eventbus.console.routes"):
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

#: Characters of a payload or traceback shown on a page (a link leads to the rest).
MAX_SHOWN = 256 * 1024
#: Characters of an error message shown on a page: in a record's facts, each of its
#: attempts, a preview row (a link on the record's page leads to the rest).
MAX_ERROR_SHOWN = 2_000
#: Largest form body accepted, in bytes (an edited event travels in one).
DEFAULT_MAX_FORM_BYTES = 2 * 1024 * 1024
#: Form fields accepted at most (a page shows at most 200 records to select).
MAX_FORM_FIELDS = 1_000

#: Headers of every page: no script may run, no framing, nothing cached.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class BadForm(Exception):
    """A form body that cannot be read; the message says why, the status how."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def link_template(template: str | None, placeholder: str, option: str) -> str | None:
    """Check a link template given by the application (``https://...{trace_id}``).

    Raises:
      ConfigurationError: It lacks ``placeholder`` or is not an http(s) or
        absolute-path URL.
    """
    if template is None:
        return None
    if placeholder not in template:
        raise ConfigurationError(
            f"{option} must contain {placeholder}, e.g. https://x/{placeholder}"
        )
    if not template.startswith(("https://", "http://", "/")) or template.startswith("//"):
        raise ConfigurationError(f"{option} must start with https://, http:// or /")
    return template


def fill_link(template: str | None, placeholder: str, value: str) -> str | None:
    """``template`` with ``value`` percent-encoded in place of ``placeholder``."""
    if template is None or not value:
        return None
    return template.replace(placeholder, quote(value, safe=""))


def when(moment: datetime | None) -> str:
    """``2024-05-01 12:00:03.123 UTC``; a time that has no UTC date (the years 1 to
    9999 in UTC: ``9999-12-31T23:59:59-01:00``, stored by a forged record) as written."""
    if moment is None:
        return ""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        utc = moment.astimezone(UTC)
    except OverflowError:
        return moment.isoformat()
    return utc.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def when_short(moment: datetime | None) -> str:
    """``2024-05-01 12:00:03`` (UTC, to the second)."""
    return when(moment)[:19]


def pretty(value: Any) -> str:
    """``value`` as indented JSON (a string is shown as is), cut at :data:`MAX_SHOWN`."""
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
        except (ValueError, RecursionError):
            text = json_text(value, MAX_SHOWN)
    return shorten(text)


def shorten(text: str, limit: int = MAX_SHOWN) -> str:
    """``text``, cut at ``limit`` characters with a note saying so."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n... ({len(text) - limit:,} more characters not shown)"


def short_error(text: str) -> str:
    """An error message cut at :data:`MAX_ERROR_SHOWN` characters."""
    return shorten(text, MAX_ERROR_SHOWN)


def number(value: int | None) -> str:
    """``12,345``."""
    return "?" if value is None else f"{value:,}"


def query_string(params: Mapping[str, object]) -> str:
    """``?a=1&b=2`` of the parameters that are not None or empty, else ``""``."""
    kept = {k: str(v) for k, v in params.items() if v is not None and v != ""}
    return "?" + urlencode(kept) if kept else ""


def environment() -> Environment:
    """The console's Jinja2 environment: templates from the package, autoescaped."""
    env = Environment(
        loader=PackageLoader("eventbus", "templates/console"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        when=when,
        when_short=when_short,
        pretty=pretty,
        number=number,
        shorten=shorten,
        short_error=short_error,
    )
    env.globals.update(query_string=query_string)
    return env


def render(
    env: Environment,
    name: str,
    context: dict[str, Any],
    *,
    status: int = 200,
    started: float | None = None,
) -> HTMLResponse:
    """The page ``name`` rendered with ``context``, with the security headers.

    ``started`` (a ``time.perf_counter()``) adds a ``Server-Timing`` header: the
    milliseconds spent on the request.
    """
    html = env.get_template(name).render(**context)
    headers = dict(SECURITY_HEADERS)
    if started is not None:
        headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.1f}"
    return HTMLResponse(html, status_code=status, headers=headers)


async def read_form(request: Request, max_bytes: int) -> dict[str, list[str]]:
    """The fields of a URL-encoded form body (the console's forms send nothing else).

    Raises:
      BadForm: Another content type (415), a body over ``max_bytes`` (413), or
        too many fields (400).
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise BadForm("the console accepts URL-encoded forms only", 415)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise BadForm(f"the form is larger than {max_bytes:,} bytes", 413)
    try:
        return parse_qs(
            body.decode("utf-8"),
            keep_blank_values=True,
            max_num_fields=MAX_FORM_FIELDS,
            errors="strict",
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadForm(f"the form cannot be read: {exc}") from None


def first(form: Mapping[str, list[str]], name: str) -> str | None:
    """The first value of field ``name``, or None."""
    values = form.get(name)
    return values[0] if values else None


def parse_time(value: str | None, *, end: bool = False) -> datetime | None:
    """A time from a filter field (``2024-05-01T12:00``, naive is UTC); None if blank.

    With ``end``, the last microsecond of what the text names: "to 12:00" includes
    12:00:59.999999, "to 2024-05-01" the whole day.

    Raises:
      ValueError: Not an ISO 8601 date and time, or one outside the years 1 to
        9999 once in UTC (``9999-12-31T23:59:59-01:00``).
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{value!r} is not a date and time like 2024-05-01T12:00") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        moment = moment.astimezone(UTC)
        if end and "." not in text:
            clock = re.split(r"[Z+-]", text[10:].lstrip("T "))[0]  # "12:00", "12:00:05", ""
            if not clock:
                span = timedelta(days=1)
            elif clock.count(":") == 1:
                span = timedelta(minutes=1)
            else:
                span = timedelta(seconds=1)
            moment += span - timedelta(microseconds=1)
    except OverflowError:
        raise ValueError(
            f"{value!r} is outside the dates the console handles: the years 1 to 9999, in UTC"
        ) from None
    return moment


def time_field(moment: datetime | None) -> str:
    """``moment`` as a ``datetime-local`` field value, in UTC."""
    if moment is None:
        return ""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
