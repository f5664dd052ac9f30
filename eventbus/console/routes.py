"""The dead-letter console: web pages to search, group, inspect, edit, replay and purge.

Mount it behind your auth, like :func:`~eventbus.fastapi.dlq_router`::

    from eventbus.console.routes import dlq_console

    async def current_admin(credentials=Depends(HTTPBasic())) -> str:
        if not is_admin(credentials):
            raise HTTPException(401, headers={"WWW-Authenticate": "Basic"})
        return credentials.username        # written into the audit trail

    app.include_router(
        dlq_console(bus, dependencies=[Depends(current_admin)],
                    trace_url="https://jaeger.example.com/trace/{trace_id}")
    )

Pages are server-rendered HTML (Jinja2, the ``console`` extra) with no
JavaScript and no external assets: they work offline.  Every form carries a CSRF
token (:mod:`eventbus.console.csrf`); every value from a message is escaped
(:mod:`eventbus.console.views`).  The actions and their rules are in
:mod:`eventbus.console.actions`.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, Query
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response

from eventbus.bus import EventBus
from eventbus.console.actions import ConsoleActions, editable_fields
from eventbus.console.operations import add_operations_page
from eventbus.console.pages import (
    TEXT_PARTS,
    ConsoleSettings,
    Pages,
    cursor_problem,
    facets,
    filter_fields,
    list_url,
    parse_query,
    record_text,
    selection_from_form,
)
from eventbus.console.views import DEFAULT_MAX_FORM_BYTES, SECURITY_HEADERS, first, link_template
from eventbus.dlq.audit import audit_rows
from eventbus.dlq.audit_log import AuditLog
from eventbus.dlq.search import DeadLetterQuery
from eventbus.exceptions import ConfigurationError
from eventbus.fastapi import get_event_bus

#: Records per page unless the request asks for another number (at most 200).
DEFAULT_PAGE_SIZE = 50
#: Largest page a request may ask for.
MAX_PAGE_SIZE = 200
#: Audit entries the audit page shows.
AUDIT_PAGE = 200
#: Files under ``eventbus/static/console/`` the console serves, with their type.
STATIC_FILES = {"console.css": "text/css; charset=utf-8"}

Identify = Callable[[Any], str]


def default_identify(user: Any) -> str:
    """Who ``user`` (an auth dependency's result) is, in a few words.

    A string is taken as is; a mapping or object gives its ``username``,
    ``email``, ``name``, ``sub`` or ``id``; anything else its ``str()``.
    """
    if isinstance(user, str):
        return user[:200]
    for key in ("username", "email", "name", "sub", "id"):
        value = user.get(key) if isinstance(user, Mapping) else getattr(user, key, None)
        if value:
            return str(value)[:200]
    return str(user)[:200]


def _identity(dependencies: Sequence[Any], identify: Identify) -> Callable[..., Any]:
    """A dependency that runs ``dependencies`` and names who passed them.

    The first result that is not None is the user; with none (the dependencies
    return nothing, or there are none) the client's address stands in.
    """
    parameters = [
        inspect.Parameter(f"auth_{i}", inspect.Parameter.KEYWORD_ONLY, default=dependency)
        for i, dependency in enumerate(dependencies)
    ]
    parameters.append(
        inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, annotation=Request)
    )

    async def who(request: Request, **results: Any) -> str:
        for result in results.values():
            if result is not None:
                return identify(result)
        client = request.client.host if request.client else "unknown address"
        return f"anonymous ({client})"

    who.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    return who


def dlq_console(
    bus: EventBus | None = None,
    *,
    dependencies: Sequence[Any] | None = None,
    allow_unauthenticated: bool = False,
    prefix: str = "/eventbus/console",
    trace_url: str | None = None,
    correlation_url: str | None = None,
    audit: AuditLog | None = None,
    identify: Identify = default_identify,
    page_size: int = DEFAULT_PAGE_SIZE,
    title: str = "Dead letters",
    max_form_bytes: int = DEFAULT_MAX_FORM_BYTES,
) -> APIRouter:
    """A router serving the dead-letter console under ``prefix``.

    Pages: the list (filters by topic, handler, error type and time; cursor
    pages; replay, dry-run or purge the selected records or every match), the
    failure groups (handler and exception type, with counts, first and last
    seen; replay or purge a group), a record (envelope, attempts, traceback,
    correlation and trace ids; replay, edit and replay, purge; a long error,
    traceback or envelope is cut with a link to the whole text) and the audit
    trail.  Purges always ask for confirmation first.  A query the console
    cannot use (a date outside the years 1 to 9999 in UTC, a cursor it did not
    write) answers 400 with the page saying why.  The operations page
    (``/operations``, :mod:`eventbus.console.operations`) shows services,
    subscriptions, live workers, backlogs and unrouted events.

    Parameters:
      bus: The bus whose dead letters to show; None: the app's (``get_event_bus``).
      dependencies: Your auth.  The first one that returns something other than
        None names the user in the audit trail (see ``identify``).
      allow_unauthenticated: Mount without ``dependencies`` (a private network
        where everyone may replay and purge).
      prefix: Where the pages live.
      trace_url: A link template for trace ids, e.g.
        ``https://jaeger.example.com/trace/{trace_id}``.
      correlation_url: A link template for correlation ids (your log search), with
        ``{correlation_id}``.
      audit: Where to keep the audit trail; default: with the store
        (:func:`~eventbus.dlq.audit.audit_log_for`).
      identify: Turns an auth dependency's result into the name the audit trail
        shows.
      page_size: Records per list page (a request may ask for up to 200).
      title: The pages' title.
      max_form_bytes: Largest form accepted (an edited payload travels in one).

    Raises:
      ConfigurationError: No ``dependencies`` and not ``allow_unauthenticated``,
        or a link template without its placeholder or with another scheme.
    """
    if not dependencies and not allow_unauthenticated:
        raise ConfigurationError(
            "dlq_console() needs an auth dependency, e.g. "
            "dlq_console(bus, dependencies=[Depends(require_admin)]); pass "
            "allow_unauthenticated=True only if every client that can reach it may "
            "read, replay and purge your failed events"
        )
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ConfigurationError(f"page_size must be between 1 and {MAX_PAGE_SIZE}")
    settings = ConsoleSettings(
        prefix=prefix.rstrip("/"),
        title=title,
        page_size=page_size,
        trace_url=link_template(trace_url, "{trace_id}", "trace_url"),
        correlation_url=link_template(correlation_url, "{correlation_id}", "correlation_url"),
        max_form_bytes=max_form_bytes,
    )
    who_dep = Depends(_identity(list(dependencies or ()), identify))
    router = APIRouter(prefix=settings.prefix, dependencies=[who_dep], include_in_schema=False)
    pages = Pages(settings, bus, audit)

    async def actions_for(request: Request) -> ConsoleActions:
        return pages.actions(bus if bus is not None else get_event_bus(request))

    actions_dep = Depends(actions_for)

    @router.get("", response_class=HTMLResponse)
    @router.get("/", response_class=HTMLResponse)
    async def list_page(
        request: Request,
        topic: str | None = None,
        handler: str | None = None,
        error_type: str | None = None,
        since: str | None = None,
        until: str | None = None,
        cursor: str | None = None,
        limit: int = Query(settings.page_size, ge=1, le=MAX_PAGE_SIZE),
        select: str | None = Query(None, pattern="^(all|none)$"),
        who: str = who_dep,
        actions: ConsoleActions = actions_dep,
    ) -> Response:
        started = time.perf_counter()
        query, problems = parse_query(topic, handler, error_type, since, until)
        bad_cursor = cursor_problem(cursor)
        if bad_cursor is not None:
            problems.append(bad_cursor)
            cursor = None
        page = await actions.call(actions.search.search, query, limit=limit, cursor=cursor)
        groups = await actions.groups(DeadLetterQuery())
        filters = filter_fields(query, since, until, problems)
        context = {
            "page": page,
            "query": query,
            "filters": filters,
            "facets": facets(groups, query),
            "limit": limit,
            "cursor": cursor,
            "next_url": list_url(filters, limit, page.next_cursor) if page.next_cursor else None,
            "first_url": list_url(filters, limit, None) if cursor else None,
            "all_selected": select == "all",
            "select_all_url": list_url(filters, limit, cursor, select="all"),
            "select_none_url": list_url(filters, limit, cursor),
            "filtered": any(
                filters[k] for k in ("topic", "handler", "error_type", "since", "until")
            ),
        }
        status = 400 if problems else 200
        return pages.page(
            request, "list.html", "list", who, context, status=status, started=started
        )

    @router.get("/groups", response_class=HTMLResponse)
    async def groups_page(
        request: Request,
        topic: str | None = None,
        since: str | None = None,
        until: str | None = None,
        who: str = who_dep,
        actions: ConsoleActions = actions_dep,
    ) -> Response:
        started = time.perf_counter()
        query, problems = parse_query(topic, None, None, since, until)
        groups = await actions.groups(query)
        every = await actions.groups(DeadLetterQuery()) if query != DeadLetterQuery() else groups
        context = {
            "groups": groups,
            "filters": filter_fields(query, since, until, problems),
            "facets": facets(every, query),
        }
        status = 400 if problems else 200
        return pages.page(
            request, "groups.html", "groups", who, context, status=status, started=started
        )

    @router.get("/record", response_class=HTMLResponse)
    async def record_page(
        request: Request,
        id: str = Query(..., max_length=1000),
        who: str = who_dep,
        actions: ConsoleActions = actions_dep,
    ) -> Response:
        started = time.perf_counter()
        record = await actions.record(id)
        if record is None:
            return pages.missing(request, who, id, await actions.replayed_as([id]))
        context = pages.record_context(request, record, actions)
        context["targets"] = await actions.targets(record)
        context["replay_of_exists"] = (
            record.replay_of and await actions.record(record.replay_of) is not None
        )
        return pages.page(request, "record.html", "list", who, context, started=started)

    @router.get("/record/text", response_class=PlainTextResponse)
    async def record_text_page(
        id: str = Query(..., max_length=1000),
        part: str = Query(..., pattern="^(" + "|".join(TEXT_PARTS) + ")$"),
        actions: ConsoleActions = actions_dep,
    ) -> Response:
        record = await actions.record(id)
        if record is None:
            text = f"No dead letter {id!r}: it was replayed or purged, or never existed."
            return PlainTextResponse(text, status_code=404, headers=SECURITY_HEADERS)
        return PlainTextResponse(record_text(record, part), headers=SECURITY_HEADERS)

    @router.get("/record/edit", response_class=HTMLResponse)
    async def edit_page(
        request: Request,
        id: str = Query(..., max_length=1000),
        who: str = who_dep,
        actions: ConsoleActions = actions_dep,
    ) -> Response:
        record = await actions.record(id)
        if record is None:
            return pages.missing(request, who, id)
        return pages.edit(request, who, record, actions, editable_fields(record), None)

    @router.post("/record/edit", response_class=HTMLResponse)
    async def edit_submit(
        request: Request, who: str = who_dep, actions: ConsoleActions = actions_dep
    ) -> Response:
        form, refused = await pages.checked_form(request, who)
        if refused is not None:
            return refused
        record_id = first(form, "id") or ""
        record = await actions.record(record_id)
        if record is None:
            return pages.missing(request, who, record_id)
        text = first(form, "event") or ""
        check = actions.check_edit(record, text)
        if check.problems or first(form, "action") != "replay":
            return pages.edit(request, who, record, actions, text, check)
        outcome = await actions.replay_edited(record, check, who)
        return pages.result(request, who, outcome)

    @router.post("/actions", response_class=HTMLResponse)
    async def act(
        request: Request, who: str = who_dep, actions: ConsoleActions = actions_dep
    ) -> Response:
        form, refused = await pages.checked_form(request, who)
        if refused is not None:
            return refused
        action, _, scope = (first(form, "action") or "").partition(":")
        try:
            selection = selection_from_form(scope, form)
        except ValueError as exc:
            return pages.message(request, who, "Nothing to do", str(exc), status=400)
        to_handler = first(form, "to_handler") or None
        if action == "replay":
            outcome = await actions.replay(selection, who, to_handler)
            return pages.result(request, who, outcome, scope, selection)
        if action == "dry-run":
            outcome = await actions.preview("replay", selection, to_handler)
            return pages.result(request, who, outcome, scope, selection)
        if action == "purge" and first(form, "confirm") == "yes":
            return pages.result(request, who, await actions.purge(selection, who))
        if action == "purge":
            outcome = await actions.preview("purge", selection)
            return pages.confirm(request, who, scope, selection, outcome)
        return pages.message(request, who, "Unknown action", f"no action {action!r}", status=400)

    @router.get("/audit", response_class=HTMLResponse)
    async def audit_page(
        request: Request, who: str = who_dep, actions: ConsoleActions = actions_dep
    ) -> Response:
        started = time.perf_counter()
        entries = audit_rows(await actions.entries(AUDIT_PAGE))
        replayed = [i for e in entries if e.action.startswith("replay") for i in e.ids[:5]]
        context = {
            "entries": entries,
            "audit_kind": type(actions.audit).__name__,
            "replayed_as": await actions.replayed_as(list(dict.fromkeys(replayed))),
        }
        return pages.page(request, "audit.html", "audit", who, context, started=started)

    add_operations_page(router, pages, bus, who_dep)

    @router.get("/static/{name}")
    async def static(name: str) -> Response:
        media_type = STATIC_FILES.get(name)
        if media_type is None:
            return Response("not found", status_code=404, media_type="text/plain")
        body = resources.files("eventbus").joinpath("static", "console", name).read_bytes()
        return Response(
            body,
            media_type=media_type,
            headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"},
        )

    return router
