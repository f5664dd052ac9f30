"""The audit trail's entries and where they are kept: :class:`AuditEntry` (one action
taken on dead letters), the :class:`AuditLog` protocol, :class:`MemoryAuditLog`, and
:class:`AuditedStore` (a store that keeps its own trail).  Which trail a store uses,
and the rows of the console's audit page, are in :mod:`eventbus.dlq.audit`.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from eventbus.dlq.records import parse_time

#: Audit entries a store keeps; older ones are dropped.
DEFAULT_AUDIT_SIZE = 10_000
#: Record ids written into one audit entry (the count says how many there were).
MAX_AUDIT_IDS = 100

#: :attr:`AuditEntry.status` of the entry written before an action runs.
STARTED = "started"
#: :attr:`AuditEntry.status` of the entry written after an action ran to its end.
DONE = "done"
#: :attr:`AuditEntry.status` of the entry written after an action stopped on an error.
FAILED = "failed"


@dataclass(frozen=True)
class AuditEntry:
    """One action taken on dead letters: who did what, when, to which records.

    A bulk action writes two entries with the same ``action_id``: one with status
    :data:`STARTED` before it changes anything (``count``: the records selected),
    and one with status :data:`DONE` (or :data:`FAILED`, when it stopped on an
    error) after (``count``: the records it replayed or purged; ``failed``: those
    it could not).  A started entry without its completion is an action that was
    interrupted (its process died) or is still running.  Entries written before
    there were two (no ``action_id``) read as :data:`DONE`.

    Attributes:
      at: When (UTC).
      who: The person or client, as the console's auth dependency named it.
      action: ``replay``, ``replay-edited`` or ``purge``.
      count: Records selected (started) or touched (done, failed).
      ids: Their ids, at most :data:`MAX_AUDIT_IDS` of them.
      detail: What was selected and what came of it, in words.
      action_id: Pairs a started entry with its completion.
      status: :data:`STARTED`, :data:`DONE` or :data:`FAILED`.
      failed: Records the action could not replay (they stay).
    """

    at: datetime
    who: str
    action: str
    count: int
    ids: tuple[str, ...] = ()
    detail: str = ""
    action_id: str = ""
    status: str = DONE
    failed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The entry as a JSON-compatible dict."""
        return {
            "at": self.at.isoformat(),
            "who": self.who,
            "action": self.action,
            "count": self.count,
            "ids": list(self.ids),
            "detail": self.detail,
            "action_id": self.action_id,
            "status": self.status,
            "failed": self.failed,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditEntry:
        """Rebuild an entry from :meth:`to_dict` output."""
        ids = data.get("ids")
        return cls(
            at=parse_time(data.get("at")),
            who=str(data.get("who", "")),
            action=str(data.get("action", "")),
            count=_count(data.get("count")),
            ids=tuple(str(i) for i in ids) if isinstance(ids, list) else (),
            detail=str(data.get("detail", "")),
            action_id=str(data.get("action_id") or ""),
            status=str(data.get("status") or DONE),
            failed=_count(data.get("failed")),
        )


@runtime_checkable
class AuditLog(Protocol):
    """Where the actions taken on dead letters are kept.  Safe across threads."""

    #: True when calls do network I/O (callers on an event loop use a thread).
    blocking: bool

    def append(self, entry: AuditEntry) -> None:
        """Keep ``entry``."""
        ...

    def entries(self, limit: int = 50) -> list[AuditEntry]:
        """The newest ``limit`` entries, newest first."""
        ...


class MemoryAuditLog:
    """The newest ``max_size`` audit entries, in memory (gone with the process)."""

    blocking = False

    def __init__(self, max_size: int = DEFAULT_AUDIT_SIZE) -> None:
        self._entries: deque[AuditEntry] = deque(maxlen=max_size)
        self._lock = threading.Lock()

    def append(self, entry: AuditEntry) -> None:
        with self._lock:
            self._entries.append(entry)

    def entries(self, limit: int = 50) -> list[AuditEntry]:
        with self._lock:
            newest_first = list(reversed(self._entries))
        return newest_first[: max(limit, 0)]


@runtime_checkable
class AuditedStore(Protocol):
    """A store that keeps an audit trail of the actions taken on its records."""

    @property
    def audit(self) -> AuditLog: ...


def _count(value: object) -> int:
    """``value`` as a count: an integer, or the integer a finite number or digits
    name; 0 for anything else (a forged ``Infinity``, text)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return int(value)
    return 0
