"""The dead-letter console: server-rendered pages to search, inspect, replay and
purge dead letters (``pip install "fastapi-eventbus[console]"``)::

    from eventbus.console import dlq_console

    app.include_router(dlq_console(bus, dependencies=[Depends(admin_only)]), prefix="/admin/dlq")

Sits above the bus: it reads ``bus.dlq``, and the operations page reads
``bus.backend.operations()`` (the backend contract); it imports no backend family.
"""

from __future__ import annotations

from eventbus.console.routes import default_identify, dlq_console

__all__ = ["default_identify", "dlq_console"]
