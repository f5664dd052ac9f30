"""What the console does to dead letters: select, replay, edit and replay, purge, audit.

The HTTP layer (:mod:`eventbus.console.routes`) parses requests and renders pages; this
module holds the actions and their rules, so they read (and test) without HTTP:

- A bulk action names its records by ids, or by a query (filters, a failure
  group).  A query is resolved to ids when the action runs; a purge confirmed on
  a page is bounded by the newest record that page showed, so records that fail
  after the confirmation are not purged with it.
- A dry run resolves the selection and makes, for each record, the checks the
  replay would make (an event envelope; the handler still subscribed; the backend
  reachable and willing), without replaying: it says how many would be queued and
  why the others would fail, one line per reason with its count.  It changes
  nothing and is not audited.
- A replay *queues* events: "queued" is not "handled".  A replayed event that
  fails again becomes a new dead letter that names the old one (``replay_of``);
  the console links the old id to it.  A replay may go to another handler of the
  same topic and service (the new name of a renamed handler).
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
from eventbus.exceptions import EventDecodeError
from eventbus.registry import HandlerRegistry
from eventbus.upcasting import VERSION_KEY, upcast, version_of

T = TypeVar("T")

logger = logging.getLogger(__name__)

#: Records a dry run or a confirmation page shows (it counts them all).
PREVIEW_ROWS = 20
#: Records a dry run checks at most (the newest of the selection); the page says
#: when the selection is larger.
DRY_RUN_CHECKS = 5_000
#: Record ids a "replay these" form carries at most (forms take 1,000 fields);
#: a larger set is replayed by the same selection instead.
MAX_FORM_IDS = 900
#: Record ids kept per reason line (links on the page).
REASON_SAMPLES = 3
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

    to_handler: str | None = None
    #: Dry run: the ids that would be queued (of those checked).
    would_replay: list[str] = field(default_factory=list)
    #: Dry run: how many of ``selected`` were checked (at most :data:`DRY_RUN_CHECKS`).
    checked: int = 0
    #: Handlers the selection may be replayed to instead (same topic and service).
    targets: list[str] = field(default_factory=list)

    def add(self, result: ReplayResult) -> None:
        """Count what one store call did."""
        self.done += result.replayed
        self.missing += result.missing
        self.failed.update(result.failed)

    @property
    def reasons(self) -> list[Reason]:
        """``failed`` grouped: one line per reason, with its count, largest first."""
        return group_reasons(self.failed)

    @property
    def all_failed(self) -> bool:
        """Nothing was done and something failed: the page must not look green."""
        return not self.done and bool(self.failed or self.error)


@dataclass(frozen=True)
class Reason:
    """One reason a replay failed (or would fail), with how many records and a few ids."""

    text: str
    count: int
    samples: tuple[str, ...]


def group_reasons(failed: dict[str, str]) -> list[Reason]:
    """``{id: reason}`` as one :class:`Reason` per distinct reason (the record's own
    id, when a reason names it, does not make it distinct), largest first."""
    groups: dict[str, list[str]] = {}
    for record_id, reason in failed.items():
        # a reason naming its own record is not a distinct reason (ids of 8 characters
        # or more: a shorter one could be a piece of any word)
        text = reason.replace(record_id, "<id>") if len(record_id) >= 8 else reason
        groups.setdefault(text, []).append(record_id)
    return sorted(
        (Reason(text, len(ids), tuple(ids[:REASON_SAMPLES])) for text, ids in groups.items()),
        key=lambda r: (-r.count, r.text),
    )


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

    async def preview(
        self, action: str, selection: Selection, to_handler: str | None = None
    ) -> Outcome:
        """What ``action`` would do to ``selection`` (a dry run, or a confirmation).

        A replay's dry run checks each record (the newest :data:`DRY_RUN_CHECKS`)
        as the replay would, without replaying: ``would_replay`` and ``failed``
        (grouped in ``reasons``).
        """
        ids = await self.resolve(selection)
        outcome = Outcome(
            action, selection.describe(), dry_run=True, selected=ids, to_handler=to_handler
        )
        outcome.preview = await self._preview(ids)
        if action == "replay":
            await self.call(self._check_replays, outcome, ids[:DRY_RUN_CHECKS], to_handler)
            outcome.targets = await self._targets(outcome.preview)
        return outcome

    def _check_replays(self, outcome: Outcome, ids: list[str], to_handler: str | None) -> None:
        """Fill ``would_replay``, ``failed`` and ``missing`` of a dry run (blocking),
        :data:`BULK_CHUNK` records per store read and per backend batch."""
        for start in range(0, len(ids), BULK_CHUNK):
            chunk = ids[start : start + BULK_CHUNK]
            try:
                found = self.dlq.get_many(chunk)
                records = [r for r in found if r is not None]
                reasons = self.dlq.refusals(records, to_handler)
            except Exception as exc:  # the store or backend cannot answer: nothing would go
                why = f"cannot be checked: {type(exc).__name__}: {exc}"
                for later in ids[start:]:
                    outcome.failed[later] = why
                break
            outcome.missing += [i for i, r in zip(chunk, found, strict=True) if r is None]
            for record, reason in zip(records, reasons, strict=True):
                if reason is None:
                    outcome.would_replay.append(record.id)
                else:
                    outcome.failed[record.id] = reason
        outcome.checked = len(ids)

    async def _targets(self, records: list[FailedEvent]) -> list[str]:
        """The handlers every record of ``records`` may be replayed to (same topic
        and service); empty when they differ or the backend cannot tell."""
        if not records or len({(r.topic, r.queue) for r in records}) != 1:
            return []
        try:
            names = await self.call(self.dlq.targets, records[0])
        except Exception:  # the page still works; the choice is just not offered
            logger.warning("Could not list the handlers to replay to", exc_info=True)
            return []
        return list(names or [])

    async def targets(self, record: FailedEvent) -> list[str] | None:
        """The handlers ``record`` may be replayed to, or None when unknown."""
        try:
            return await self.call(self.dlq.targets, record)
        except Exception:
            logger.warning("Could not list the handlers to replay to", exc_info=True)
            return None

    async def replayed_as(self, ids: list[str]) -> dict[str, str]:
        """``{old id: new id}``: which of ``ids`` were replayed and failed again, as
        which record (empty when the store cannot be read)."""
        if not ids:
            return {}
        try:
            return await self.call(self.dlq.replayed_as, ids)
        except Exception:
            logger.warning("Could not look up replays that failed again", exc_info=True)
            return {}

    async def replay(
        self, selection: Selection, who: str, to_handler: str | None = None
    ) -> Outcome:
        """Queue every record of ``selection`` again (to ``to_handler`` when given);
        audited when it starts and ends."""
        outcome = Outcome(
            "replay",
            selection.describe() + (f", to handler {to_handler}" if to_handler else ""),
            selected=await self.resolve(selection),
            to_handler=to_handler,
        )

        def replay(ids: list[str]) -> None:
            for record_id in ids:  # one at a time: a store error midway loses no count
                outcome.add(self.dlq.replay([record_id], to_handler=to_handler))

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
        # the edited fields keep the payload's version: they are upcast as they
        # will be on delivery, then validated
        stored = record.envelope if isinstance(record.envelope, dict) else {}
        try:
            version = version_of(stored)
            (cls or UnknownEvent).model_validate(upcast(cls, data, version) if cls else data)
        except EventDecodeError as exc:
            return EditCheck(None, [str(exc)], target)
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
        envelope: dict[str, Any] = {TYPE_KEY: type_name, EVENT_KEY: data}
        if version != 1:
            envelope = {TYPE_KEY: type_name, VERSION_KEY: version, EVENT_KEY: data}
        return EditCheck(envelope, [], target, note=note, changed=changed)


_MISSING = object()


def _completion(outcome: Outcome) -> str:
    """What an action did, in words, for its completing audit entry."""
    did = "purged" if outcome.action == "purge" else "queued (not yet handled)"
    parts = [outcome.selection, f"{outcome.action}: {len(outcome.done):,} {did}"]
    if outcome.missing:
        parts.append(f"{len(outcome.missing):,} missing")
    if outcome.failed:
        reasons = outcome.reasons
        parts.append(
            f"{len(outcome.failed):,} failed ("
            + "; ".join(f"{r.count:,}: {r.text[:200]}" for r in reasons[:3])
            + (f"; {len(reasons) - 3} more reasons" if len(reasons) > 3 else "")
            + ")"
        )
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
