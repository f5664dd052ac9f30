"""Dead letters: the records (:class:`FailedEvent`, ``records.py``), their stores
(``store.py``), the queue the bus exposes as ``bus.dlq`` (``queue.py``), the query
API the console and the CLI search with (``search.py``), the audit trail of
operators' actions (``audit_log.py``, ``audit.py``), and the rules that cut a
record to fit (``cut.py``).

Part of the core: the bus, the dead-letter middleware and every backend's store
use it; it imports no backend.
"""

from __future__ import annotations

from eventbus.dlq.audit_log import AuditedStore, AuditEntry, AuditLog, MemoryAuditLog
from eventbus.dlq.queue import DeadLetterQueue, ReplayResult
from eventbus.dlq.records import FailedEvent
from eventbus.dlq.store import CountsEvictions, DeadLetterStore, MemoryDeadLetterStore

__all__ = [
    "AuditEntry",
    "AuditLog",
    "AuditedStore",
    "CountsEvictions",
    "DeadLetterQueue",
    "DeadLetterStore",
    "FailedEvent",
    "MemoryAuditLog",
    "MemoryDeadLetterStore",
    "ReplayResult",
]
