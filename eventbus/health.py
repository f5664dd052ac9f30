"""Health checks: ``await bus.health.check()`` returns one result per component."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .backends.base import Backend

#: Seconds a health check may take before it reports unhealthy.
DEFAULT_HEALTH_TIMEOUT = 5.0


class HealthStatus(StrEnum):
    """Health of one component."""

    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    DEGRADED = "degraded"


@dataclass(frozen=True)
class HealthResult:
    """Health of one component: ``backend`` names it, ``detail`` says why."""

    backend: str
    status: HealthStatus
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        """The result as a JSON-compatible dict."""
        return {"name": self.backend, "status": self.status.value, "detail": self.detail}


class HealthChecker:
    """Runs the backend's checks with a timeout; a check that raises or hangs is unhealthy."""

    def __init__(self, backend: Backend, timeout: float = DEFAULT_HEALTH_TIMEOUT) -> None:
        self._backend = backend
        self._timeout = timeout

    async def check(self) -> list[HealthResult]:
        """The health of every component of the backend."""
        name = self._backend.name
        try:
            return await asyncio.wait_for(self._backend.health(), timeout=self._timeout)
        except TimeoutError:
            detail = f"health check timed out after {self._timeout:g}s"
            return [HealthResult(name, HealthStatus.UNHEALTHY, detail)]
        except Exception as exc:
            detail = f"health check failed: {type(exc).__name__}: {exc}"
            return [HealthResult(name, HealthStatus.UNHEALTHY, detail)]

    async def is_healthy(self) -> bool:
        """Whether every component is healthy."""
        return all(r.status is HealthStatus.HEALTHY for r in await self.check())
