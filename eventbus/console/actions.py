"""What the console does to dead letters: select, replay, edit and replay, purge, audit.

The HTTP layer (:mod:`eventbus.console.routes`) parses requests and renders pages; this
module holds the actions and their rules, so they read (and test) without HTTP:

- A bulk action names its records by ids, or by a query (filters, a failure
  group).  A query is resolved to ids when the action runs; a purge confirmed on
  a page is bounded by the newest record that page showed, so records that fail
  after the confirmation are not purged with it.
- A dry run resolves the selection and says what would happen; it changes nothing
  and is not audited.
- Every replay and purge is written to the audit trail with who asked, twice:
  "started" (with the count selected) before it changes anything, and "done" (or
  "failed", when the store failed midway) with what it did after.  An action
  whose process died midway stays "started": the audit page shows it as not
  completed.  Bulk actions run :data:`BULK_CHUNK` records per store call.
- An action on nothing (no record of the selection exists: the ids are gone, no
  record matches the filters) does nothing and is not recorded, so a flood of
  them cannot push real actions out of a bounded audit trail.
- An edited payload is validated against the handler's event class (or the class
  its type names, when this process defines it) before anything is replayed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import ValidationError

from eventbus.dlq.audit_log import DONE, FAILED, MAX_AUDIT_IDS, STARTED, AuditEntry, AuditLog
from eventbus.dlq.queue import DeadLetterQueue, ReplayResult
from eventbus.dlq.records import FailedEvent, refuse_constants
from eventbus.dlq.search import DeadLetterQuery, FailureGroup, SearchableStore, searchable
from eventbus.events import (
    EVENT_KEY,
    MAX_DEPTH,
    TYPE_KEY,
    BaseEvent,
    UnknownEvent,
    event_class,
    text_too_deep,
)
from eventbus.registry import HandlerRegistry

T = TypeVar("T")

logger = logging.getLogger(__name__)

#: Records a dry run or a confirmation page shows (it counts them all).
PREVIEW_ROWS = 20
#: Records a bulk replay or purge hands to the store per call (in a thread).
BULK_CHUNK = 500


@dataclass(frozen=True)
class Selection:
    """The records a bulk action applies to: ``ids``, or every match of ``query``.

    Attributes:
      scope: ``selected`` (ids), ``filter`` or ``group`` (a query).
    """

    scope: str
    ids: tuple[str, ...] = ()
    query: DeadLetterQuery | None = None

    def describe(self) -> str:
        """The selection in words, for pages and the audit trail."""
        if self.query is None:
            return f"{len(self.ids)} selected"
        q = self.query
        parts = [
            f"{name}={value}"
            for name, value in (
                ("topic", q.topic),
                ("handler", q.handler),
                ("error_type", q.error_type),
                ("since", q.since.isoformat() if q.since else None),
                ("until", q.until.isoformat() if q.until else None),
            )
            if value is not None
        ]
        return f"{self.scope} " + (" ".join(parts) if parts else "(every record)")


@dataclass
class Outcome:
    """What an action did, or would do (``dry_run``).

    Attributes:
      action: ``replay``, ``replay-edited`` or ``purge``.
      selected: The ids the selection resolved to.
      done: Ids replayed or purged.
      missing: Ids gone meanwhile (replayed or purged by someone else).
      failed: Ids whose replay failed, with the reason (their records stay).
      preview: Up to :data:`PREVIEW_ROWS` of the selected records.
      nothing: No record of the selection existed: nothing was done or recorded.
      error: Why the action stopped midway (the store failed); what it did before
        is in ``done``.
    """

    action: str
    selection: str
    dry_run: bool = False
    selected: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    preview: list[FailedEvent] = field(default_factory=list)
    note: str = ""
    nothing: bool = False
    error: str = ""

    def add(self, result: ReplayResult) -> None:
        """Count what one store call did."""
        self.done += result.replayed
        self.missing += result.missing
        self.failed.update(result.failed)


@dataclass
class EditCheck:
    """An edited event checked against its class.

    Attributes:
      envelope: The envelope to replay; None when the edit is refused.
      problems: Why it is refused (JSON errors, validation messages).
      checked_against: The class name it was validated as.
      note: A caveat (the class is not known here, only base fields were checked).
    """

    envelope: dict[str, Any] | None
    problems: list[str]
    checked_against: str
    note: str = ""
    changed: list[str] = field(default_factory=list)


class ConsoleActions:
    """The console's operations on one bus's dead letters.

    Parameters:
      dlq: The bus's dead-letter queue (``bus.dlq``).
      registry: The bus's handlers (to find the event class of a handler).
      audit: Where actions are recorded.
    """

    def __init__(self, dlq: DeadLetterQueue, registry: HandlerRegistry, audit: AuditLog) -> None:
        self.dlq = dlq
        self.registry = registry
        self.audit = audit
        self.search: SearchableStore = searchable(dlq.store)

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a store call; in a thread when the store does network I/O."""
        if self.dlq.store.blocking:
            return await asyncio.to_thread(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    async def record(self, record_id: str) -> FailedEvent | None:
        """The record with ``record_id``, or None."""
        return await self.call(self.dlq.get, record_id)

    async def groups(self, query: DeadLetterQuery) -> list[FailureGroup]:
        """Failure groups of the records matching ``query``."""
        return await self.call(self.search.failure_groups, query)

    async def resolve(self, selection: Selection) -> list[str]:
        """The ids of ``selection`` (a query is resolved now, newest first)."""
        if selection.query is None:
            return list(dict.fromkeys(selection.ids))
        return await self.call(self.search.select, selection.query)

    async def _preview(self, ids: list[str]) -> list[FailedEvent]:
        def fetch() -> list[FailedEvent]:
            found = (self.dlq.get(i) for i in ids[:PREVIEW_ROWS])
            return [r for r in found if r is not None]

        return await self.call(fetch)

    async def _audit(self, entry: AuditEntry) -> None:
        if self.audit.blocking:
            await asyncio.to_thread(self.audit.append, entry)
        else:
            self.audit.append(entry)

    async def entries(self, limit: int) -> list[AuditEntry]:
        """The newest ``limit`` audit entries."""
        if self.audit.blocking:
            return await asyncio.to_thread(self.audit.entries, limit)
        return self.audit.entries(limit)

    async def preview(self, action: str, selection: Selection) -> Outcome:
        """What ``action`` would do to ``selection`` (a dry run, or a confirmation)."""
        ids = await self.resolve(selection)
        outcome = Outcome(action, selection.describe(), dry_run=True, selected=ids)
        outcome.preview = await self._preview(ids)
        refused = sum(1 for r in outcome.preview if r.event is None)
        if action == "replay" and refused:
            outcome.note = (
                f"{refused} of the records shown cannot be replayed (the payload is not an "
                "event envelope): they would stay; inspect them, then purge them"
            )
        return outcome

    async def replay(self, selection: Selection, who: str) -> Outcome:
        """Replay every record of ``selection``; audited when it starts and ends."""
        outcome = Outcome("replay", selection.describe(), selected=await self.resolve(selection))

        def replay(ids: list[str]) -> None:
            for record_id in ids:  # one at a time: a store error midway loses no count
                outcome.add(self.dlq.replay([record_id]))

        return await self._run(who, outcome, replay)

    async def purge(self, selection: Selection, who: str) -> Outcome:
        """Delete every record of ``selection``; audited when it starts and ends."""
        outcome = Outcome("purge", selection.describe(), selected=await self.resolve(selection))

        def purge(ids: list[str]) -> None:
            for record_id in ids:
                gone = self.dlq.store.remove(record_id) is not None
                (outcome.done if gone else outcome.missing).append(record_id)

        return await self._run(who, outcome, purge)

    async def replay_edited(self, record: FailedEvent, check: EditCheck, who: str) -> Outcome:
        """Replay ``record`` with the envelope of a passed ``check``; audited."""
        assert check.envelope is not None, "replay_edited needs an edit that passed its check"
        envelope = check.envelope
        outcome = Outcome(
            "replay-edited",
            f"1 selected, edited ({', '.join(check.changed) or 'no field changed'})",
            selected=[record.id],
        )

        def replay(ids: list[str]) -> None:
            outcome.add(self.dlq.replay_edited(ids[0], envelope))

        return await self._run(who, outcome, replay)

    async def _run(self, who: str, outcome: Outcome, step: Callable[[list[str]], None]) -> Outcome:
        """Run ``step`` over ``outcome.selected``, :data:`BULK_CHUNK` ids per store call
        (in a thread for a blocking store), audited before and after.  ``step`` counts
        into ``outcome`` as it goes, so an error midway leaves exact counts."""
        ids = outcome.selected
        if not await self._any_exists(ids):
            outcome.nothing = True
            outcome.missing = list(ids)
            return outcome
        action_id = uuid.uuid4().hex
        await self._audit(
            AuditEntry(
                at=datetime.now(UTC),
                who=who,
                action=outcome.action,
                count=len(ids),
                ids=tuple(ids[:MAX_AUDIT_IDS]),
                detail=f"{outcome.selection}; {outcome.action}: {len(ids):,} selected",
                action_id=action_id,
                status=STARTED,
            )
        )
        try:
            for i in range(0, len(ids), BULK_CHUNK):
                await self.call(step, ids[i : i + BULK_CHUNK])
        except Exception as exc:  # the store failed: say so, with what was done
            logger.exception(
                "Console %s by %s stopped after %d of %d records",
                outcome.action,
                who,
                len(outcome.done),
                len(ids),
            )
            outcome.error = f"{type(exc).__name__}: {exc}"
        await self._audit(
            AuditEntry(
                at=datetime.now(UTC),
                who=who,
                action=outcome.action,
                count=len(outcome.done),
                ids=tuple(outcome.done[:MAX_AUDIT_IDS]),
                detail=_completion(outcome),
                action_id=action_id,
                status=FAILED if outcome.error else DONE,
                failed=len(outcome.failed),
            )
        )
        return outcome

    async def _any_exists(self, ids: list[str]) -> bool:
        """Whether a record of ``ids`` exists (stops at the first found)."""

        def scan() -> bool:
            return any(self.dlq.get(record_id) is not None for record_id in ids)

        return bool(ids) and await self.call(scan)

    # -- editing -------------------------------------------------------------------

    def event_class_of(self, record: FailedEvent) -> tuple[str, type[BaseEvent] | None]:
        """The type name of ``record``'s event, and the class to validate an edit with.

        The handler's declared class wins (it is what the handler decodes into);
        else the class registered under the type name; else None.
        """
        type_name = editable_type(record) or ""
        for spec in self.registry.all_handlers():
            if spec.name == record.handler and spec.event_type is not None:
                return type_name, spec.event_type
        return type_name, event_class(type_name) if type_name else None

    def check_edit(self, record: FailedEvent, text: str) -> EditCheck:
        """Validate the edited event fields ``text`` (a JSON object) for ``record``."""
        type_name, cls = self.event_class_of(record)
        target = cls.__event_type__ if cls is not None else type_name
        if not type_name:
            return EditCheck(None, ["this record's payload has no event type to keep"], target)
        data, problem = _parse_object(text)
        if data is None:
            return EditCheck(None, [problem], target)
        note = ""
        try:
            (cls or UnknownEvent).model_validate(data)
        except ValidationError as exc:
            return EditCheck(None, validation_messages(exc), target)
        if cls is None:
            note = (
                f"this process does not define the event class {type_name!r}: only the fields "
                "every event has were checked"
            )
        original = record.envelope.get(EVENT_KEY) if isinstance(record.envelope, dict) else None
        changed = sorted(
            key
            for key in set(data) | set(original or {})
            if not isinstance(original, dict)
            or original.get(key, _MISSING) != data.get(key, _MISSING)
        )
        envelope = {TYPE_KEY: type_name, EVENT_KEY: data}
        return EditCheck(envelope, [], target, note=note, changed=changed)


_MISSING = object()


def _completion(outcome: Outcome) -> str:
    """What an action did, in words, for its completing audit entry."""
    parts = [outcome.selection, f"{outcome.action}: {len(outcome.done):,} done"]
    if outcome.missing:
        parts.append(f"{len(outcome.missing):,} missing")
    if outcome.failed:
        parts.append(f"{len(outcome.failed):,} failed")
    left = len(outcome.selected) - len(outcome.done) - len(outcome.missing) - len(outcome.failed)
    if outcome.error:
        parts.append(f"stopped with {left:,} not tried: {outcome.error}")
    return "; ".join(parts)


def editable_type(record: FailedEvent) -> str | None:
    """The event type name an edit of ``record`` keeps, or None when it has none."""
    envelope = record.envelope
    if isinstance(envelope, dict):
        type_name = envelope.get(TYPE_KEY)
        if isinstance(type_name, str) and type_name and isinstance(envelope.get(EVENT_KEY), dict):
            return type_name
    if record.event is not None:
        return record.event.event_type
    return None


def editable_fields(record: FailedEvent) -> str:
    """The event fields of ``record`` as indented JSON, the text the edit form starts with."""
    envelope = record.envelope
    if isinstance(envelope, dict) and isinstance(envelope.get(EVENT_KEY), dict):
        data = envelope[EVENT_KEY]
    elif record.event is not None:
        data = record.event.model_dump(mode="json")
    else:
        return ""
    return json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False)


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(
            f"{text} is not a finite number: it would be Infinity, which JSON cannot carry "
            "(send a smaller number, null, or the value as a string)"
        )
    return number


def _parse_object(text: str) -> tuple[dict[str, Any] | None, str]:
    if text_too_deep(text):
        return None, f"the event is nested more than {MAX_DEPTH} levels deep"
    try:
        data = json.loads(text, parse_constant=refuse_constants, parse_float=_finite)
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
    except ValueError as exc:
        return None, f"not valid JSON: {exc}"
    if not isinstance(data, dict):
        return None, f"the event must be a JSON object, not a JSON {type(data).__name__}"
    return data, ""


def validation_messages(exc: ValidationError) -> list[str]:
    """One line per validation error: ``field.path: message``."""
    lines = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"]) or "(the event)"
        lines.append(f"{location}: {error['msg']}")
    return lines
