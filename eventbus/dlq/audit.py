"""Where the console keeps its audit trail: with the dead letters, in every store.

- Each store of the project keeps it (``store.audit``, the
  :class:`~eventbus.dlq.audit_log.AuditedStore` protocol): in memory and Redis a
  bounded list next to the records; on Kafka a topic of its own next to the DLQ
  topics (:mod:`eventbus.kafka.audit`).
- Any other store: in this process's memory, with a warning.

Every bound trail (memory, Redis) keeps its newest entries by count; actions on
nothing are not recorded (:mod:`eventbus.console.actions`), so only real actions
take its room.  :func:`audit_rows` pairs each action's "started" entry with its
completion for the audit page.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime

from eventbus.dlq.audit_log import STARTED, AuditedStore, AuditEntry, AuditLog, MemoryAuditLog
from eventbus.dlq.store import DeadLetterStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditRow:
    """One action on the audit page: its started entry and its completion merged.

    Attributes:
      at: When it started (or ended, when its start is older than the page).
      ended_at: When it ended; None when not completed or not known.
      status: ``started`` (not completed), ``done`` or ``failed``.
      selected: Records selected, when its start is known.
      count: Records done (for a row that never completed: selected).
    """

    at: datetime
    ended_at: datetime | None
    who: str
    action: str
    status: str
    selected: int | None
    count: int
    failed: int
    detail: str
    ids: tuple[str, ...]


def audit_rows(entries: list[AuditEntry]) -> list[AuditRow]:
    """One row per action of ``entries`` (newest first), newest first."""
    starts = {e.action_id: e for e in entries if e.action_id and e.status == STARTED}
    completed = {e.action_id for e in entries if e.action_id and e.status != STARTED}
    rows = []
    for entry in entries:
        if entry.status == STARTED:
            if entry.action_id not in completed:  # else its completion makes its row
                rows.append(_row(entry, selected=entry.count))
            continue
        start = starts.get(entry.action_id) if entry.action_id else None
        if start is None:
            rows.append(_row(entry, selected=None))
        else:
            rows.append(replace(_row(entry, selected=start.count), at=start.at, ended_at=entry.at))
    return rows


def _row(entry: AuditEntry, *, selected: int | None) -> AuditRow:
    return AuditRow(
        at=entry.at,
        ended_at=None,
        who=entry.who,
        action=entry.action,
        status=entry.status,
        selected=selected,
        count=entry.count,
        failed=entry.failed,
        detail=entry.detail,
        ids=entry.ids,
    )


def audit_log_for(store: DeadLetterStore) -> AuditLog:
    """The audit trail that goes with ``store``: its own (``store.audit``), else one
    in this process's memory."""
    if isinstance(store, AuditedStore):
        return store.audit
    logger.warning(
        "The dead-letter store %s keeps no audit trail: the console keeps it in this "
        "process's memory (pass dlq_console(audit=...) to keep it elsewhere).",
        type(store).__name__,
    )
    return MemoryAuditLog()
