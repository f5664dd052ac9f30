"""The web process: publishes OrderPlaced and imports no handler.

EVENTBUS_BACKEND=redis uvicorn tests.deploy.web:app
"""

from __future__ import annotations

import sys

from fastapi import FastAPI

from eventbus import EventBus
from eventbus.fastapi import create_lifespan
from tests.deploy.events import OrderPlaced

bus = EventBus()
app = FastAPI(lifespan=create_lifespan(bus))


@app.post("/orders/{n}")
async def place(n: int) -> dict[str, int]:
    await bus.publish(OrderPlaced(n=n))
    return {"n": n}


@app.get("/handler-modules")
async def handler_modules() -> list[str]:
    """The handler modules this process imported (none)."""
    return sorted(
        m for m in sys.modules if m.startswith(("tests.deploy.orders", "tests.deploy.ship"))
    )
