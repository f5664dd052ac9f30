"""The transactional outbox and the inbox (``pip install "fastapi-eventbus[outbox]"``).

``bus.publish(event, session=session)`` writes the event in the caller's database
transaction; a relay sends committed rows through the bus's backend.  The inbox
(:mod:`eventbus.outbox.inbox`) makes a handler apply an event once.  Sits above
the bus: it publishes through it and never reaches a backend directly.
"""

from __future__ import annotations

from eventbus.outbox.outbox import Outbox, OutboxSession, OutboxSettings, OutboxStats, SetAsideRow

__all__ = ["Outbox", "OutboxSession", "OutboxSettings", "OutboxStats", "SetAsideRow"]
