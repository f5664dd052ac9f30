"""Health checks: ``await bus.health.check()`` returns one result per component.

Two questions, two answers (``health_router()`` serves both):

- **readiness** (:meth:`HealthChecker.check`): can this process do its job now?
  Each backend checks its server with a round trip (Redis ``PING``, Kafka
  metadata) and reports its workers and consumers.
- **liveness** (:meth:`HealthChecker.liveness`): is this process's own event
  handling alive?  No network: the bus's dispatcher task, in-process worker and
  Kafka consumer task.  A failing liveness probe means "restart me"; a server that
  is down makes readiness fail and must not make every process restart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING

from eventbus.redact import redact

if TYPE_CHECKING:
    from eventbus.backends.base import Backend
    from eventbus.dispatch import Dispatcher

#: Seconds a health check may take before it reports unhealthy.
DEFAULT_HEALTH_TIMEOUT = 5.0


class HealthStatus(StrEnum):
    """Health of one component."""

    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    #: Working, with a problem that needs attention (a backlog nobody consumes, a
    #: dead letter that cannot be written): not a reason to take the process out
    #: of service.
    DEGRADED = "degraded"


@dataclass(frozen=True)
class HealthResult:
    """Health of one component: ``backend`` names it, ``detail`` says why."""

    backend: str
    status: HealthStatus
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        """The result as a JSON-compatible dict, keyed by attribute name."""
        return {"backend": self.backend, "status": self.status.value, "detail": self.detail}


def overall(results: Iterable[HealthResult]) -> HealthStatus:
    """The worst status among ``results`` (unhealthy, then degraded); healthy if none."""
    statuses = {r.status for r in results}
    for status in (HealthStatus.UNHEALTHY, HealthStatus.DEGRADED):
        if status in statuses:
            return status
    return HealthStatus.HEALTHY


class HealthChecker:
    """Runs the backend's checks with a timeout; a check that raises or hangs is unhealthy."""

    def __init__(self, backend: Backend, timeout: float = DEFAULT_HEALTH_TIMEOUT) -> None:
        self._backend = backend
        self._timeout = timeout

    async def check(self) -> list[HealthResult]:
        """The health of every component of the backend (readiness: round trips)."""
        name = self._backend.name
        try:
            results = await asyncio.wait_for(self._backend.health(), timeout=self._timeout)
        except TimeoutError:
            detail = f"health check timed out after {self._timeout:g}s"
            return [HealthResult(name, HealthStatus.UNHEALTHY, detail)]
        except Exception as exc:
            detail = f"health check failed: {type(exc).__name__}: {exc}"
            results = [HealthResult(name, HealthStatus.UNHEALTHY, detail)]
        return [_redacted(r) for r in results]

    async def is_healthy(self) -> bool:
        """Whether every component is healthy."""
        return all(r.status is HealthStatus.HEALTHY for r in await self.check())

    def liveness(self) -> list[HealthResult]:
        """Whether this process's event handling is alive, without any round trip.

        The backend's :meth:`~eventbus.backends.base.Backend.liveness`: the tasks
        and threads it runs here (the embedded and Kafka dispatchers, the Kafka
        consumer when this process consumes, the in-process Redis worker).
        """
        return [_redacted(r) for r in self._backend.liveness()]


def _redacted(result: HealthResult) -> HealthResult:
    """``result`` with passwords in its detail (an error quoting a URL) as ``***``."""
    detail = redact(result.detail)
    return result if detail == result.detail else replace(result, detail=detail)


def dispatcher_liveness(name: str, dispatcher: Dispatcher | None) -> HealthResult:
    """The liveness of an in-process :class:`~eventbus.dispatch.Dispatcher`."""
    if dispatcher is None:
        return HealthResult(name, HealthStatus.UNHEALTHY, "not started")
    task = dispatcher.task
    if task.done():
        reason = "cancelled" if task.cancelled() else repr(task.exception())
        return HealthResult(name, HealthStatus.UNHEALTHY, f"dispatcher is dead: {reason}")
    return HealthResult(
        name, HealthStatus.HEALTHY, f"dispatcher running, {dispatcher.pending} pending"
    )
