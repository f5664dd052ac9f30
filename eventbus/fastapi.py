"""FastAPI integration: lifespan helpers, the ``get_event_bus`` dependency, the health
and dead-letter routers (the metrics router is :func:`eventbus.prometheus.metrics_router`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import asdict
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse

from eventbus.bus import EventBus
from eventbus.dlq.records import FailedEvent
from eventbus.exceptions import ConfigurationError
from eventbus.health import HealthResult, HealthStatus, overall

#: Status code of a health answer whose overall status is unhealthy.
UNHEALTHY_STATUS_CODE = 503
#: ``Sec-Fetch-Site`` values of requests a page of the same origin made, or the user
#: (typed URL, bookmark); any other value means another site made the browser send it.
SAME_SITE_FETCH = ("same-origin", "none")
#: Methods that change nothing (never checked for cross-site requests).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
#: Header that marks a state-changing admin request as sent by a script or client,
#: not a form: a browser sends it cross-site only after a CORS preflight allows it.
CSRF_HEADER = "X-Requested-With"


def create_lifespan(bus: EventBus) -> Callable[[Any], AbstractAsyncContextManager[None]]:
    """A FastAPI ``lifespan`` that starts ``bus`` with the app and stops it after.

    Example::

        bus = EventBus()
        app = FastAPI(lifespan=create_lifespan(bus))
    """

    def lifespan(app: Any) -> AbstractAsyncContextManager[None]:
        return eventbus_lifespan(bus, app)

    return lifespan


@asynccontextmanager
async def eventbus_lifespan(bus: EventBus, app: Any) -> AsyncIterator[None]:
    """Start ``bus`` for the duration of the block; compose it into your own lifespan.

    Example::

        @asynccontextmanager
        async def lifespan(app):
            async with eventbus_lifespan(bus, app):
                yield
    """
    app.state.event_bus = bus
    await bus.start()
    try:
        yield
    finally:
        await bus.stop()


def get_event_bus(conn: HTTPConnection) -> EventBus:
    """FastAPI dependency returning the app's bus: ``bus: EventBus = Depends(get_event_bus)``.

    Raises:
      RuntimeError: The app was not given ``create_lifespan(bus)`` or
        ``eventbus_lifespan``.
    """
    bus: EventBus | None = getattr(conn.app.state, "event_bus", None)
    if bus is None:
        raise RuntimeError(
            "no EventBus on app.state: create the app with FastAPI(lifespan=create_lifespan(bus)) "
            "or use eventbus_lifespan(bus, app) in your lifespan"
        )
    return bus


class HealthCheck(BaseModel):
    """One component's health, as :meth:`HealthResult.to_dict` writes it."""

    backend: str
    status: HealthStatus
    detail: str


class HealthReport(BaseModel):
    """Body of the health routes: the overall status and every component's."""

    status: HealthStatus
    backends: list[HealthCheck]


def health_router(
    *,
    bus: EventBus | None = None,
    prefix: str = "/health",
    tags: list[str | Enum] | None = None,
    dependencies: Sequence[Any] | None = None,
) -> APIRouter:
    """A router answering readiness and liveness probes.

    Example::

        app.include_router(health_router())

    Routes (under ``prefix``):

    - ``GET /ready`` (readiness) runs :meth:`bus.health.check()
      <eventbus.health.HealthChecker.check>`: round trips to the backend's servers
      and the state of its workers.  503 when any component is unhealthy or the bus
      is not started; 200 otherwise.  **Degraded answers 200**, with
      ``"status": "degraded"`` in the body: the process still publishes (a backlog
      no worker takes, a dead letter that cannot be written need an operator, not
      a process taken out of service).
    - ``GET /live`` (liveness) runs :meth:`bus.health.liveness()
      <eventbus.health.HealthChecker.liveness>`: the bus is started and its
      dispatcher, consumer and in-process worker are alive.  No network, so a
      server that is down never makes the orchestrator restart every process.
      503 when not.
    - ``GET`` ``prefix`` itself answers as ``/ready`` (``curl localhost:8000/health``).

    Body of each: ``{"status": "healthy" | "degraded" | "unhealthy", "backends":
    [{"backend": ..., "status": ..., "detail": ...}]}``.

    Parameters:
      bus: The bus to check; default: the app's (``create_lifespan(bus)`` or
        ``eventbus_lifespan``).
      prefix: Path of the routes.
      tags: OpenAPI tags (default ``["eventbus"]``).
      dependencies: Dependencies of every route (the answers name servers and
        handlers: guard them if the port is public).
    """
    router = APIRouter(prefix=prefix, tags=tags or ["eventbus"], dependencies=dependencies)
    responses: dict[int | str, dict[str, Any]] = {
        UNHEALTHY_STATUS_CODE: {"model": HealthReport, "description": "unhealthy"}
    }

    def app_bus(request: Request) -> EventBus | None:
        found: EventBus | None = getattr(request.app.state, "event_bus", None)
        return bus if bus is not None else found

    async def readiness(request: Request) -> JSONResponse:
        checked = app_bus(request)
        if checked is None or not checked.started:
            return _answer([_not_running(checked)])
        return _answer(await checked.health.check())

    async def liveness(request: Request) -> JSONResponse:
        checked = app_bus(request)
        if checked is None or not checked.started:
            return _answer([_not_running(checked)])
        return _answer(checked.health.liveness())

    for path, endpoint, summary in (
        ("", readiness, "Readiness (alias of /ready)"),
        ("/ready", readiness, "Readiness: 503 when a component is unhealthy"),
        ("/live", liveness, "Liveness: 503 when the bus's own tasks are dead"),
    ):
        router.add_api_route(
            path,
            endpoint,
            methods=["GET"],
            response_model=HealthReport,
            responses=responses,
            summary=summary,
            name=f"eventbus_health{path.replace('/', '_')}",
        )
    return router


def _not_running(bus: EventBus | None) -> HealthResult:
    """The result of a bus that is missing or not started."""
    if bus is None:
        detail = (
            "no EventBus on app.state: create the app with FastAPI(lifespan="
            "create_lifespan(bus)) or pass health_router(bus=bus)"
        )
        return HealthResult("bus", HealthStatus.UNHEALTHY, detail)
    return HealthResult("bus", HealthStatus.UNHEALTHY, "not started")


def _answer(results: list[HealthResult]) -> JSONResponse:
    status = overall(results)
    code = UNHEALTHY_STATUS_CODE if status is HealthStatus.UNHEALTHY else 200
    body = {"status": status.value, "backends": [r.to_dict() for r in results]}
    return JSONResponse(body, status_code=code)


def cross_site_refusal(request: HTTPConnection) -> str | None:
    """Why ``request`` looks sent by another site, or None when nothing says so.

    ``Sec-Fetch-Site``, when sent, must be ``same-origin`` or ``none``, and
    ``Origin``, when sent, must name the host the request went to (``null``, from
    a sandboxed frame say, is another origin too).  Requests from scripts and
    tools send neither and pass.  The console (:mod:`eventbus.console.csrf`) and
    :func:`dlq_router` both refuse what this names.
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in SAME_SITE_FETCH:
        return f"the request came from another site (Sec-Fetch-Site: {site})"
    origin = request.headers.get("origin")
    if origin is not None:
        host = request.headers.get("host", "")
        if urlsplit(origin).netloc.lower() != host.lower():
            return "the request came from another origin"
    return None


def _json_content(request: Request) -> bool:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return kind == "application/json" or (
        kind.startswith("application/") and kind.endswith("+json")
    )


async def refuse_cross_site(request: Request) -> None:
    """Dependency: refuse a state-changing request another site could have sent.

    A browser attaches cached credentials (Basic auth, cookies) to requests that a
    page of any site makes.  Without a CORS preflight, such a page can only send
    forms (URL-encoded, multipart, ``text/plain``) and bodiless requests, and
    cannot add headers.  So a POST, PUT, PATCH or DELETE is refused (403) unless
    it sends ``Content-Type: application/json`` or the :data:`CSRF_HEADER` header,
    and it is refused anyway when :func:`cross_site_refusal` says another site
    sent it.  ``GET`` and ``HEAD`` pass: they change nothing.

    Raises:
      HTTPException: 403, with the reason and what to send.
    """
    if request.method in SAFE_METHODS:
        return
    reason = cross_site_refusal(request)
    if reason is None and not (_json_content(request) or CSRF_HEADER.lower() in request.headers):
        reason = (
            f"send Content-Type: application/json or the header {CSRF_HEADER} (any value) "
            "with this request: without either, another site could have made a browser "
            "send it"
        )
    if reason is not None:
        raise HTTPException(403, f"refused: {reason}")


class DeadLetterSelection(BaseModel):
    """Body of the bulk replay and purge routes: ids, or filters, or ``all``; one of them."""

    ids: list[str] | None = None
    topic: str | None = None
    handler: str | None = None
    error_type: str | None = None
    all: bool = False

    def kwargs(self) -> dict[str, Any]:
        """The selection as keyword arguments of ``replay`` / ``purge`` (ids apart).

        Raises:
          HTTPException: 422 when nothing is selected, or ids come with filters
            or ``all``, or ``all`` with filters: which was meant is not guessed.
        """
        filtered = self.topic is not None or self.handler is not None or self.error_type is not None
        if (self.ids is not None and (filtered or self.all)) or (self.all and filtered):
            raise HTTPException(
                422,
                "give either ids or filters (topic, handler, error_type) or all=true, not several",
            )
        if not (self.ids or filtered or self.all):
            raise HTTPException(422, "give ids, a filter (topic, handler, error_type) or all=true")
        return {
            "topic": self.topic,
            "handler": self.handler,
            "error_type": self.error_type,
            "all_records": self.all,
        }


def _summary(record: FailedEvent) -> dict[str, Any]:
    data = record.to_dict()
    data.pop("traceback")
    data["event_type"] = record.event.event_type if record.event else None
    return data


def dlq_router(
    *,
    dependencies: Sequence[Any] | None = None,
    allow_unauthenticated: bool = False,
    prefix: str = "/eventbus/dlq",
    tags: list[str | Enum] | None = None,
) -> APIRouter:
    """An admin router to list, show, replay and purge dead letters.

    Mount it behind your auth: it refuses to exist without a dependency unless you
    pass ``allow_unauthenticated=True`` (for a private network you trust).

    Example::

        async def require_admin(token: str = Header(alias="X-Admin-Token")) -> None:
            if token != settings.admin_token:
                raise HTTPException(403)

        app.include_router(dlq_router(dependencies=[Depends(require_admin)]))

    Routes (under ``prefix``): ``GET /`` (``limit``, ``topic``, ``handler``,
    ``error_type``), ``GET /{id}``, ``POST /{id}/replay``, ``DELETE /{id}``,
    ``POST /replay`` and ``POST /purge`` (body: ``ids``, or filters, or
    ``all``: one of them, else 422).  Ids may contain ``/`` (Kafka record ids are
    ``topic:partition:offset``); replaying a record whose payload is not an
    event envelope answers 409 and keeps it.

    **Cross-site requests.**  A browser sends the credentials it cached for your
    site (Basic auth, cookies) with any request a page of another site makes, so
    every ``POST`` and ``DELETE`` must carry ``Content-Type: application/json``
    or the header ``X-Requested-With`` (any value; a page elsewhere cannot add
    either without a CORS preflight), and is refused (403) when ``Origin`` or
    ``Sec-Fetch-Site`` names another site (:func:`refuse_cross_site`)::

        curl -X POST -H "X-Requested-With: curl" -u ops:... .../eventbus/dlq/<id>/replay

    Raises:
      ConfigurationError: No ``dependencies`` and not ``allow_unauthenticated``.
    """
    if not dependencies and not allow_unauthenticated:
        raise ConfigurationError(
            "dlq_router() needs an auth dependency, e.g. "
            "dlq_router(dependencies=[Depends(require_admin)]); pass "
            "allow_unauthenticated=True only if every client that can reach it may "
            "read and replay your failed events"
        )
    guarded = [*(dependencies or ()), Depends(refuse_cross_site)]
    router = APIRouter(prefix=prefix, tags=tags or ["eventbus"], dependencies=guarded)
    bus_dep = Depends(get_event_bus)

    @router.get("")
    async def list_dead_letters(
        limit: int = Query(50, ge=1, le=1000),
        topic: str | None = None,
        handler: str | None = None,
        error_type: str | None = None,
        bus: EventBus = bus_dep,
    ) -> dict[str, Any]:
        filters = {"topic": topic, "handler": handler, "error_type": error_type}
        records = await bus.dlq.apeek(limit, **filters)
        return {"size": await bus.dlq.asize(**filters), "items": [_summary(r) for r in records]}

    @router.get("/{record_id:path}")
    async def show_dead_letter(record_id: str, bus: EventBus = bus_dep) -> dict[str, Any]:
        record = await bus.dlq.aget(record_id)
        if record is None:
            raise HTTPException(404, f"no dead letter {record_id!r}")
        return record.to_dict()

    @router.post("/{record_id:path}/replay")
    async def replay_dead_letter(record_id: str, bus: EventBus = bus_dep) -> dict[str, Any]:
        record = await bus.dlq.aget(record_id)
        result = await bus.dlq.areplay([record_id])
        if result.missing:
            raise HTTPException(404, f"no dead letter {record_id!r}")
        if result.failed:
            undecodable = record is not None and record.event is None
            raise HTTPException(409 if undecodable else 502, result.failed[record_id])
        return asdict(result)

    @router.delete("/{record_id:path}", status_code=204)
    async def delete_dead_letter(record_id: str, bus: EventBus = bus_dep) -> None:
        if not await bus.dlq.apurge([record_id]):
            raise HTTPException(404, f"no dead letter {record_id!r}")

    @router.post("/replay")
    async def replay_dead_letters(
        selection: DeadLetterSelection, bus: EventBus = bus_dep
    ) -> dict[str, Any]:
        result = await bus.dlq.areplay(selection.ids, **selection.kwargs())
        return asdict(result)

    @router.post("/purge")
    async def purge_dead_letters(
        selection: DeadLetterSelection, bus: EventBus = bus_dep
    ) -> dict[str, int]:
        return {"purged": await bus.dlq.apurge(selection.ids, **selection.kwargs())}

    return router
