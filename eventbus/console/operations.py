"""The console's operations page: what runs and what waits.

Services and their subscriptions (topic, handler, queue, backlog, parked events,
the age of the oldest waiting event, code versions), the live workers (last
heartbeat, queues, in-flight events), Kafka lag per partition and the events
that reached no subscription: one :meth:`~eventbus.backends.base.Backend.operations`
reading per request, rendered on the server like the dead-letter pages (no
script).  Reload the page for a fresh reading.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from eventbus.backends.base import Operations, SubscriptionState
from eventbus.bus import EventBus
from eventbus.fastapi import get_event_bus

if TYPE_CHECKING:
    from eventbus.console.pages import Pages

#: Age (seconds) of a subscription's oldest waiting event past which the page
#: marks it as late.
LATE_AFTER = 60.0
#: Seconds since a worker's last heartbeat past which the page marks it as late.
SILENT_AFTER = 10.0


def age(seconds: float | None) -> str:
    """``0.4 s``, ``42 s``, ``3 min 5 s``, ``2 h 10 min``, ``3 d 4 h``; "-" for None."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    if whole < 86400:
        return f"{whole // 3600} h {whole % 3600 // 60} min"
    return f"{whole // 86400} d {whole % 86400 // 3600} h"


@dataclass(frozen=True)
class ServiceView:
    """One service and its subscriptions, with their totals."""

    name: str
    subscriptions: list[SubscriptionState]

    @property
    def backlog(self) -> int | None:
        counts = [s.backlog for s in self.subscriptions]
        return None if any(c is None for c in counts) else sum(c or 0 for c in counts)

    @property
    def parked(self) -> int:
        return sum(s.parked for s in self.subscriptions)

    @property
    def mixed(self) -> int:
        return sum(1 for s in self.subscriptions if s.mixed_code)


def context(snapshot: Operations) -> dict[str, Any]:
    """What ``operations.html`` shows of one reading."""
    services = [
        ServiceView(name, [s for s in snapshot.subscriptions if s.service == name])
        for name in snapshot.services
    ]
    backlogs = [s.backlog for s in snapshot.subscriptions]
    return {
        "ops": snapshot,
        "services": services,
        "total_backlog": sum(b or 0 for b in backlogs),
        "backlog_known": all(b is not None for b in backlogs),
        "total_parked": sum(s.parked for s in snapshot.subscriptions),
        "mixed": [s for s in snapshot.subscriptions if s.mixed_code],
        "idle": [s for s in snapshot.subscriptions if not s.live_workers],
        "unrouted_waiting": sum(snapshot.unrouted_waiting.values()),
        "unrouted_dropped": sum(snapshot.unrouted_dropped.values()),
        "total_lag": sum(p.lag for p in snapshot.partitions),
        "late_after": LATE_AFTER,
        "silent_after": SILENT_AFTER,
    }


def add_operations_page(
    router: APIRouter, pages: Pages, bus: EventBus | None, who_dep: Any
) -> None:
    """Serve ``GET <prefix>/operations`` on ``router`` (the console's, behind its auth;
    ``who_dep`` is its ``Depends`` naming the user)."""
    pages.env.filters["age"] = age

    @router.get("/operations", response_class=HTMLResponse)
    async def operations_page(request: Request, who: str = who_dep) -> Response:
        started = time.perf_counter()
        target = bus if bus is not None else get_event_bus(request)
        try:
            snapshot = await target.backend.operations()
        except Exception as exc:  # the server down: say so on the page, 503
            text = (
                f"Could not read the {target.backend.name} backend at "
                f"{target.backend.address()}: {type(exc).__name__}: {exc}"
            )
            return pages.message(request, who, "Operations unavailable", text, status=503)
        return pages.page(
            request, "operations.html", "operations", who, context(snapshot), started=started
        )
