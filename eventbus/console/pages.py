"""The console's pages: what each one shows, built from requests and store reads.

:mod:`eventbus.console.routes` routes requests here; :mod:`eventbus.console.views`
renders; :mod:`eventbus.console.actions` acts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

import eventbus.console.csrf as csrf
from eventbus.bus import EventBus
from eventbus.console.actions import (
    MAX_FORM_IDS,
    ConsoleActions,
    EditCheck,
    Outcome,
    Selection,
    editable_type,
)
from eventbus.console.views import (
    MAX_ERROR_SHOWN,
    MAX_SHOWN,
    BadForm,
    environment,
    fill_link,
    first,
    parse_time,
    query_string,
    read_form,
    render,
    time_field,
)
from eventbus.dlq.audit import audit_log_for
from eventbus.dlq.audit_log import AuditLog
from eventbus.dlq.records import FailedEvent, json_text, payload_dropped
from eventbus.dlq.search import (
    MAX_MICROS,
    MIN_MICROS,
    DeadLetterQuery,
    FailureGroup,
    from_micros,
    micros,
    parse_cursor,
)

#: The parts of a record ``/record/text`` serves in full.
TEXT_PARTS = ("error", "traceback", "envelope")


@dataclass(frozen=True)
class ConsoleSettings:
    """What :func:`~eventbus.console.routes.dlq_console` was given."""

    prefix: str
    title: str
    page_size: int
    trace_url: str | None
    correlation_url: str | None
    max_form_bytes: int


class Pages:
    """Builds the console's responses (one per router)."""

    def __init__(self, settings: ConsoleSettings, bus: EventBus | None, audit: AuditLog | None):
        self.settings = settings
        self.env = environment()
        self.audit = audit
        self._actions: dict[int, tuple[EventBus, ConsoleActions]] = {}
        if bus is not None:
            self.actions(bus)

    def actions(self, bus: EventBus) -> ConsoleActions:
        """The actions on ``bus``'s dead letters (made once per bus)."""
        known = self._actions.get(id(bus))
        if known is None or known[0] is not bus:
            audit = self.audit if self.audit is not None else audit_log_for(bus.dlq.store)
            known = (bus, ConsoleActions(bus.dlq, bus.registry, audit))
            self._actions[id(bus)] = known
        return known[1]

    def base(self, request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/") + self.settings.prefix

    def page(
        self,
        request: Request,
        template: str,
        nav: str,
        who: str,
        context: dict[str, Any],
        *,
        status: int = 200,
        started: float | None = None,
    ) -> Response:
        token, new = csrf.request_token(request)
        full = {
            "base": self.base(request),
            "title": self.settings.title,
            "nav": nav,
            "who": who,
            "csrf_field": csrf.FIELD,
            "csrf_token": token,
            **context,
        }
        response = render(self.env, template, full, status=status, started=started)
        if new:
            csrf.set_token_cookie(response, request, token, self.base(request))
        return response

    def message(
        self, request: Request, who: str, heading: str, text: str, *, status: int
    ) -> Response:
        context = {"heading": heading, "text": text, "new_id": None}
        return self.page(request, "message.html", "", who, context, status=status)

    def missing(
        self,
        request: Request,
        who: str,
        record_id: str,
        replayed_as: Mapping[str, str] | None = None,
    ) -> Response:
        text = f"No dead letter {record_id!r}: it was replayed or purged, or never existed."
        new_id = (replayed_as or {}).get(record_id)
        context: dict[str, Any] = {"heading": "Not found", "text": text, "new_id": new_id}
        if new_id is not None:
            context["heading"] = "Replayed, and failed again"
            context["text"] = (
                f"Dead letter {record_id!r} was replayed; its handler failed on the event "
                "again, and it is now a new dead letter:"
            )
        return self.page(request, "message.html", "", who, context, status=404)

    async def checked_form(
        self, request: Request, who: str
    ) -> tuple[dict[str, list[str]], Response | None]:
        """The form of a state-changing request, or the page refusing it."""
        try:
            form = await read_form(request, self.settings.max_form_bytes)
        except BadForm as exc:
            return {}, self.message(request, who, "Bad request", str(exc), status=exc.status)
        refusal = csrf.refusal(request, first(form, csrf.FIELD))
        if refusal is not None:
            return form, self.message(request, who, "Refused", refusal, status=403)
        return form, None

    def record_context(
        self, request: Request, record: FailedEvent, actions: ConsoleActions
    ) -> dict[str, Any]:
        type_name, cls = actions.event_class_of(record)
        envelope = envelope_text(record.envelope)
        lengths = {
            "error": (record.error, MAX_ERROR_SHOWN),
            "traceback": (record.traceback, MAX_SHOWN),
        }
        lengths["envelope"] = (envelope, MAX_SHOWN)
        full = {
            part: self.base(request)
            + "/record/text"
            + query_string({"id": record.id, "part": part})
            if len(text) > limit
            else None
            for part, (text, limit) in lengths.items()
        }
        return {
            "record": record,
            "envelope_text": envelope,
            "full": full,
            "dropped": payload_dropped(record),
            "event_type": type_name,
            "event_class": cls.__name__ if cls is not None else None,
            "editable": editable_type(record) is not None,
            "attempts": attempt_rows(record),
            "trace_link": fill_link(self.settings.trace_url, "{trace_id}", record.trace_id),
            "correlation_link": fill_link(
                self.settings.correlation_url, "{correlation_id}", record.correlation_id
            ),
        }

    def edit(
        self,
        request: Request,
        who: str,
        record: FailedEvent,
        actions: ConsoleActions,
        text: str,
        check: EditCheck | None,
    ) -> Response:
        type_name, cls = actions.event_class_of(record)
        context = {
            "record": record,
            "event_type": type_name,
            "event_class": cls.__name__ if cls is not None else None,
            "text": text,
            "check": check,
            "editable": editable_type(record) is not None,
        }
        status = 422 if check is not None and check.problems else 200
        return self.page(request, "edit.html", "list", who, context, status=status)

    def result(
        self,
        request: Request,
        who: str,
        outcome: Outcome,
        scope: str = "selected",
        selection: Selection | None = None,
    ) -> Response:
        """The page of an action's outcome; a dry run's offers to replay the records
        that would be queued (those ids, or the same selection when they are all of
        it or too many for a form)."""
        status = 500 if outcome.error else 207 if outcome.failed and not outcome.dry_run else 200
        context: dict[str, Any] = {"outcome": outcome, "again": None, "same": None}
        if selection is not None:
            same = {"scope": scope, "ids": selection.ids, "fields": _fields(selection.query)}
            context["same"] = same
        if outcome.dry_run and outcome.action == "replay" and outcome.would_replay:
            every = len(outcome.would_replay) == len(outcome.selected)
            if selection is not None and (every or len(outcome.would_replay) > MAX_FORM_IDS):
                context["again"] = {
                    "scope": scope,
                    "ids": selection.ids,
                    "fields": _fields(selection.query),
                    "count": len(outcome.selected) if every else None,
                }
            else:
                context["again"] = {
                    "scope": "selected",
                    "ids": outcome.would_replay,
                    "fields": {},
                    "count": len(outcome.would_replay),
                }
        return self.page(request, "result.html", "", who, context, status=status)

    def confirm(
        self, request: Request, who: str, scope: str, selection: Selection, outcome: Outcome
    ) -> Response:
        bound = outcome.preview[0].last_failed_at if outcome.preview else None
        context = {
            "outcome": outcome,
            "scope": scope,
            "ids": selection.ids,
            "fields": {
                **_fields(selection.query),
                "bound": micros(bound) if bound is not None and scope != "selected" else None,
            },
        }
        return self.page(request, "confirm.html", "", who, context)


def _fields(query: DeadLetterQuery | None) -> dict[str, str | None]:
    """The form fields that select ``query``'s records again."""
    query = query or DeadLetterQuery()
    return {
        "topic": query.topic,
        "handler": query.handler,
        "error_type": query.error_type,
        "since": query.since.isoformat() if query.since else None,
        "until": query.until.isoformat() if query.until else None,
    }


def attempt_rows(record: FailedEvent) -> list[dict[str, Any]]:
    """One row per attempt: its number, when it failed and its outcome.

    Records carry each failed attempt's time and error (``attempt_log``, the newest
    20); older records keep only the first and final failure, and the attempts in
    between are known to have failed and been retried.
    """
    if record.attempts <= 0:
        return [
            {
                "number": "-",
                "at": record.last_failed_at,
                "outcome": "never ran: dead-lettered on arrival",
                "error": f"{record.error_type}: {record.error}",
            }
        ]
    log = record.attempt_log
    if log:
        first = record.attempts - len(log) + 1  # the log keeps the newest attempts
        return [
            {
                "number": str(first + i),
                "at": entry["at"],
                "outcome": "failed, gave up: dead-lettered"
                if i == len(log) - 1
                else "failed, retried",
                "error": f"{entry['error_type']}: {entry['error']}",
            }
            for i, entry in enumerate(log)
        ]
    rows = []
    for number in range(1, record.attempts + 1):
        final = number == record.attempts
        rows.append(
            {
                "number": str(number),
                "at": record.last_failed_at
                if final
                else record.first_failed_at
                if number == 1
                else None,
                "outcome": "failed, gave up: dead-lettered" if final else "failed, retried",
                "error": f"{record.error_type}: {record.error}" if final else "",
            }
        )
    return rows


def envelope_text(envelope: Any) -> str:
    """A record's envelope as indented JSON (a string as is), however deep."""
    if isinstance(envelope, str):
        return envelope
    try:
        return json.dumps(envelope, indent=2, ensure_ascii=False, default=str)
    except (ValueError, RecursionError):
        return json_text(envelope)


def record_text(record: FailedEvent, part: str) -> str:
    """The whole ``part`` (one of :data:`TEXT_PARTS`) of ``record``."""
    if part == "error":
        return f"{record.error_type}: {record.error}"
    if part == "traceback":
        return record.traceback
    return envelope_text(record.envelope)


def cursor_problem(cursor: str | None) -> str | None:
    """Why ``cursor`` (from a query) is not one the console wrote, or None."""
    if not cursor or parse_cursor(cursor) is not None:
        return None
    return (
        f"cursor: {cursor[:100]!r} is not a cursor this console made (the time of a record "
        "and its id): start again from the first page"
    )


def blank_to_none(value: str | None) -> str | None:
    return value if value else None


def parse_query(
    topic: str | None,
    handler: str | None,
    error_type: str | None,
    since: str | None,
    until: str | None,
) -> tuple[DeadLetterQuery, list[str]]:
    problems = []
    times: list[datetime | None] = []
    for name, value, end in (("from", since, False), ("to", until, True)):
        try:
            times.append(parse_time(value, end=end))
        except ValueError as exc:
            problems.append(f"{name}: {exc}; ignored")
            times.append(None)
    query = DeadLetterQuery(
        topic=blank_to_none(topic),
        handler=blank_to_none(handler),
        error_type=blank_to_none(error_type),
        since=times[0],
        until=times[1],
    )
    return query, problems


def filter_fields(
    query: DeadLetterQuery, since: str | None, until: str | None, problems: list[str]
) -> dict[str, Any]:
    return {
        "topic": query.topic or "",
        "handler": query.handler or "",
        "error_type": query.error_type or "",
        "since": time_field(query.since) if query.since else "",
        "until": time_field(query.until) if query.until else "",
        "problems": problems,
    }


def facets(groups: list[FailureGroup], query: DeadLetterQuery) -> dict[str, list[str]]:
    """The values the filter menus offer: those seen in the groups, plus the current one."""
    facets = {
        "topic": {g.topic for g in groups},
        "handler": {g.handler for g in groups},
        "error_type": {g.error_type for g in groups},
    }
    for name, value in (
        ("topic", query.topic),
        ("handler", query.handler),
        ("error_type", query.error_type),
    ):
        if value is not None:
            facets[name].add(value)
    return {name: sorted(values) for name, values in facets.items()}


def list_url(
    filters: dict[str, Any], limit: int, cursor: str | None, *, select: str | None = None
) -> str:
    params = {k: filters[k] for k in ("topic", "handler", "error_type", "since", "until")}
    return query_string({**params, "limit": limit, "cursor": cursor, "select": select})


def selection_from_form(scope: str, form: Mapping[str, list[str]]) -> Selection:
    """The records a bulk form names.

    Raises:
      ValueError: No record selected, or an unknown scope, or a group without
        its handler and error type.
    """
    if scope == "selected":
        ids = tuple(i for i in form.get("id", []) if i)
        if not ids:
            raise ValueError("select at least one record first (the boxes in the first column)")
        return Selection("selected", ids=ids)
    if scope not in ("filter", "group"):
        raise ValueError(f"unknown selection {scope!r}")
    query, problems = parse_query(
        first(form, "topic"),
        first(form, "handler"),
        first(form, "error_type"),
        first(form, "since"),
        first(form, "until"),
    )
    if problems:
        raise ValueError("; ".join(problems))
    if scope == "group" and (query.handler is None or query.error_type is None):
        raise ValueError("a group is a handler and an error type: both are needed")
    bound = first(form, "bound")
    if bound:  # a confirmed purge stops at what it showed
        if not re.fullmatch(r"-?[0-9]{1,20}", bound) or not (
            MIN_MICROS <= int(bound) <= MAX_MICROS
        ):
            raise ValueError(
                f"the confirmation's bound {bound[:40]!r} is not one this console wrote: "
                "ask for the purge again"
            )
        limit = from_micros(int(bound))
        if query.until is None or query.until > limit:
            query = DeadLetterQuery(
                topic=query.topic,
                handler=query.handler,
                error_type=query.error_type,
                since=query.since,
                until=limit,
            )
    return Selection(scope, query=query)
