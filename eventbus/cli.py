"""The ``eventbus`` command: dead letters and subscriptions.

It is configured by the same ``EVENTBUS_*`` environment as the application, so on
a worker or web host::

    eventbus dlq list --topic user.created
    eventbus dlq show 0f3c...            # the record with its traceback
    eventbus dlq replay 0f3c... 9a1b...  # back to the handler that failed
    eventbus dlq replay --error-type TimeoutError
    eventbus dlq purge --all --yes

    eventbus subscriptions list          # service, topic, handler, backlog, workers
    eventbus subscriptions sync myapp.handlers   # a Procfile ``release:`` step
    eventbus subscriptions remove 'user.created:myapp.handlers.old' --yes

Every command takes ``--json`` for machine-readable output.  Exit status: 0 on
success, 1 when something asked for was missing or failed, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
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

    subs = commands.add_parser(
        "subscriptions", help="handler subscriptions stored in Redis"
    ).add_subparsers(dest="action", required=True)
    listing = subs.add_parser("list", help="every subscription with its backlog and workers")
    listing.add_argument("--service", help="only this service")
    listing.add_argument("--json", action="store_true", help="print JSON")
    sync = subs.add_parser(
        "sync",
        help="write the subscriptions of the handlers in MODULES without starting a worker",
    )
    sync.add_argument("modules", nargs="+", help="handler modules, e.g. myapp.handlers")
    sync.add_argument("--json", action="store_true", help="print JSON")
    remove = subs.add_parser(
        "remove", help="remove a subscription; events queued for it are dead-lettered"
    )
    remove.add_argument("handler", help="the handler's actor name (see subscriptions list)")
    remove.add_argument("--service", help="its service, when several have that handler")
    remove.add_argument("--yes", action="store_true", help="confirm the removal")
    remove.add_argument("--json", action="store_true", help="print JSON")
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


def _grid(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _subscriptions(args: argparse.Namespace, bus: EventBus, out: TextIO) -> int:
    from .backends.redis import RedisBackend

    backend = bus.backend
    if not isinstance(backend, RedisBackend):
        out.write(
            f"subscriptions are stored by the redis backend; on {backend.name} "
            "they live in the consumer groups (kafka) or the process (sync)\n"
        )
        return 2

    def emit(data: Any, text: str) -> None:
        out.write((json.dumps(data, indent=2, default=str) if args.json else text) + "\n")

    if args.action == "sync":
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # modules of the project, as dramatiq's CLI does
        for name in args.modules:
            importlib.import_module(name)
        bus.subscriptions.subscribe_all()
        bus.subscriptions.service = bus.service
        fields = backend.register_subscriptions()
        emit(
            {"service": bus.subscriptions.service, "subscriptions": fields},
            f"service {bus.subscriptions.service}: {len(fields)} subscription(s) written",
        )
        return 0 if fields else 1

    rows = backend.subscription_list()
    if args.action == "list":
        if args.service:
            rows = [r for r in rows if r.service == args.service]
        table: list[tuple[str, ...]] = [
            ("SERVICE", "TOPIC", "HANDLER", "QUEUE", "BACKLOG", "WORKERS", "LAST SEEN (UTC)")
        ]
        for r in rows:
            seen = r.last_seen.strftime("%Y-%m-%d %H:%M:%S") if r.last_seen else "never"
            table.append(
                (r.service, r.topic, r.handler, r.queue, str(r.backlog), str(r.live_workers), seen)
            )
        emit([r.to_dict() for r in rows], _grid(table) + f"\n{len(rows)} subscription(s)")
        return 0

    matches = [r for r in rows if r.handler == args.handler]
    if args.service:
        matches = [r for r in matches if r.service == args.service]
    if not matches:
        out.write(f"no subscription of handler {args.handler!r}\n")
        return 1
    if len(matches) > 1:
        services = ", ".join(sorted(r.service for r in matches))
        out.write(f"handler {args.handler!r} is subscribed in {services}: add --service\n")
        return 2
    [row] = matches
    if not args.yes:
        out.write(
            f"removing {row.handler} ({row.service}, topic {row.topic}) stops its deliveries "
            f"and dead-letters the {row.backlog} event(s) waiting for it: add --yes\n"
        )
        return 2
    from .backends.redis_subscriptions import remove_subscription

    count = remove_subscription(
        backend.sync_client, backend.namespace, row.service, row.topic, row.handler, bus.dlq.store
    )
    emit(
        {"removed": row.to_dict(), "dead_lettered": count},
        f"removed {row.handler} ({row.service}); {count} waiting event(s) dead-lettered",
    )
    return 0


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return {"topic": args.topic, "handler": args.handler, "error_type": args.error_type}


def run(argv: Sequence[str], bus: EventBus, out: TextIO = sys.stdout) -> int:
    """Run a command against ``bus``'s dead letters; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "subscriptions":
        return _subscriptions(args, bus, out)
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
        if settings.backend == "sync" and argv and argv[0] == "dlq":
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
