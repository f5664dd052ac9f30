"""The ``eventbus`` command: inspect, replay and purge dead letters.

It is configured by the same ``EVENTBUS_*`` environment as the application, so on
a worker or web host::

    eventbus dlq list --topic user.created
    eventbus dlq show 0f3c...            # the record with its traceback
    eventbus dlq replay 0f3c... 9a1b...  # back to the handler that failed
    eventbus dlq replay --error-type TimeoutError
    eventbus dlq purge --all --yes

Every command takes ``--json`` for machine-readable output.  Exit status: 0 on
success, 1 when something asked for was missing or failed, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from .config import EventBusSettings
from .exceptions import EventBusError

if TYPE_CHECKING:
    from .bus import EventBus
    from .dlq import FailedEvent

#: Widest error text shown in a table cell.
MAX_ERROR_WIDTH = 60


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eventbus", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    dlq = commands.add_parser("dlq", help="dead letters").add_subparsers(
        dest="action", required=True
    )

    def add_filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--topic")
        p.add_argument("--handler", help="actor name of the handler")
        p.add_argument("--error-type", help="exception type name, e.g. TimeoutError")
        p.add_argument("--json", action="store_true", help="print JSON")

    listing = dlq.add_parser("list", help="list dead letters, newest last")
    add_filters(listing)
    listing.add_argument("--limit", type=int, default=50)

    show = dlq.add_parser("show", help="one record with its traceback")
    show.add_argument("id")
    show.add_argument("--json", action="store_true", help="print JSON")

    for name, text in (("replay", "send events back to the failed handler"), ("purge", "delete")):
        action = dlq.add_parser(name, help=text)
        action.add_argument("ids", nargs="*", help="record ids (or use filters / --all)")
        add_filters(action)
        action.add_argument("--all", action="store_true", help="every record")
        if name == "purge":
            action.add_argument("--yes", action="store_true", help="confirm a filtered purge")
    return parser


def _table(records: list[FailedEvent]) -> str:
    rows = [("ID", "LAST FAILED (UTC)", "TOPIC", "HANDLER", "ATTEMPTS", "ERROR")]
    for r in records:
        error = f"{r.error_type}: {r.error}".replace("\n", " ")
        if len(error) > MAX_ERROR_WIDTH:
            error = error[: MAX_ERROR_WIDTH - 1] + "…"
        when = r.last_failed_at.strftime("%Y-%m-%d %H:%M:%S")
        rows.append((r.id, when, r.topic, r.handler, str(r.attempts), error))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return {"topic": args.topic, "handler": args.handler, "error_type": args.error_type}


def run(argv: Sequence[str], bus: EventBus, out: TextIO = sys.stdout) -> int:
    """Run a command against ``bus``'s dead letters; returns the exit status."""
    args = _parser().parse_args(argv)
    dlq = bus.dlq

    def emit(data: Any, text: str) -> None:
        out.write((json.dumps(data, indent=2, default=str) if args.json else text) + "\n")

    if args.action == "list":
        records = dlq.peek(args.limit, **_filters(args))
        total = dlq.size(**_filters(args))
        emit(
            {"size": total, "items": [r.to_dict() for r in records]},
            _table(records) + f"\n{len(records)} shown, {total} in store",
        )
        return 0

    if args.action == "show":
        record = dlq.get(args.id)
        if record is None:
            out.write(f"no dead letter {args.id!r}\n")
            return 1
        data = record.to_dict()
        text = "\n".join(f"{k}: {v}" for k, v in data.items() if k != "traceback")
        emit(data, text + "\n\n" + record.traceback)
        return 0

    selected = bool(args.ids or args.all or any(_filters(args).values()))
    if not selected:
        out.write("give record ids, a filter (--topic/--handler/--error-type) or --all\n")
        return 2
    kwargs = {**_filters(args), "all_records": args.all}
    ids = args.ids or None

    if args.action == "replay":
        result = dlq.replay(ids, **kwargs)
        lines = [f"replayed {len(result.replayed)}"]
        lines += [f"missing {i}" for i in result.missing]
        lines += [f"failed {i}: {why}" for i, why in result.failed.items()]
        emit(
            {"replayed": result.replayed, "missing": result.missing, "failed": result.failed},
            "\n".join(lines),
        )
        return 1 if result.missing or result.failed else 0

    if ids is None and not args.yes:
        out.write("purging by filter or --all deletes records for good: add --yes\n")
        return 2
    purged = dlq.purge(ids, **kwargs)
    emit({"purged": purged}, f"purged {purged}")
    return 0 if ids is None or purged == len(ids) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``eventbus`` console script."""
    from .bus import EventBus

    argv = list(sys.argv[1:] if argv is None else argv)
    _parser().parse_args(argv)  # usage errors before touching any backend
    try:
        settings = EventBusSettings()
        if settings.backend == "sync":
            sys.stderr.write(
                "EVENTBUS_BACKEND=sync keeps dead letters in the application's memory; the "
                "CLI needs a durable backend (redis, kafka). Use dlq_router() in the app.\n"
            )
            return 2
        bus = EventBus(settings=settings)
        return run(argv, bus)
    except EventBusError as exc:
        sys.stderr.write(f"eventbus: {exc}\n")
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
