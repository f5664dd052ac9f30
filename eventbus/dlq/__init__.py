"""Dead letters: the records (:class:`FailedEvent`), their stores, the queue the bus
exposes as ``bus.dlq``, the query API the console and the CLI search with, the
audit trail of operators' actions, and the rules that cut a record to fit.

Part of the core: the bus, the dead-letter middleware and every backend's store
use it; it imports no backend.
"""

from __future__ import annotations

from eventbus.dlq.store import (
    AuditedStore,
    AuditEntry,
    AuditLog,
    DeadLetterQueue,
    DeadLetterStore,
    FailedEvent,
    MemoryAuditLog,
    MemoryDeadLetterStore,
    ReplayResult,
)

__all__ = [
    "AuditEntry",
    "AuditLog",
    "AuditedStore",
    "DeadLetterQueue",
    "DeadLetterStore",
    "FailedEvent",
    "MemoryAuditLog",
    "MemoryDeadLetterStore",
    "ReplayResult",
]
