"""The ``eventbus`` command: dead letters, subscriptions, settings, a local Kafka.

It is configured by the same ``EVENTBUS_*`` environment as the application, so on
a worker or web host::

    eventbus dlq list --topic user.created
    eventbus dlq show 0f3c...            # the record with its traceback
    eventbus dlq replay 0f3c... 9a1b...  # back to the handler that failed
    eventbus dlq replay --error-type TimeoutError
    eventbus dlq replay --handler old_name --to-handler new_name  # a renamed handler
    eventbus dlq purge --all --yes

    eventbus subscriptions list          # service, topic, handler, backlog, workers
    eventbus subscriptions sync myapp.handlers   # a deploy's release step
    eventbus subscriptions remove 'user.created:myapp.handlers.old' --yes

    eventbus settings > docs/settings.md # every setting: variable, type, default, meaning
    eventbus schema snapshot shop.events -o contracts.json  # event contracts to commit
    eventbus schema check shop.events    # CI: breaking changes against contracts.json
    eventbus asyncapi shop.main:app --yaml  # the AsyncAPI 3.0 document of an application
    eventbus dev kafka                   # a local Kafka-protocol broker (Tansu, in memory)

Every ``dlq`` and ``subscriptions`` command takes ``--json`` for machine-readable
output.  Text output escapes non-printable characters (``\\x1b``, ``\\n``): dead
letters hold whatever was queued, and a terminal must not obey it.  An error is
one line on stderr, ``eventbus: <what is wrong>``; ``eventbus -v ...`` adds the
traceback and the libraries' logs.  Whatever it prints goes through
:func:`eventbus.redact.redact`: passwords in URLs (userinfo or query parameters,
every form redis-py and SQLAlchemy read), secret settings and the secret values of
the environment and the command line are shown as ``***``.

Exit statuses and the variables that choose the backend: ``eventbus --help``
(:data:`EPILOG`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import textwrap
import traceback
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from eventbus.config import ENV_PREFIX, EventBusSettings
from eventbus.exceptions import ConfigurationError, EventBusError
from eventbus.extras import MissingExtraError
from eventbus.redact import is_secret_name, redact, url_secrets

if TYPE_CHECKING:
    from eventbus.backends.base import Backend
    from eventbus.bus import EventBus
    from eventbus.dlq.records import FailedEvent

#: Widest error text shown in a table cell.
MAX_ERROR_WIDTH = 60

#: Exit status: done.
EXIT_OK = 0
#: Exit status: something asked for was missing or failed.
EXIT_FAILED = 1
#: Exit status: bad usage, an invalid setting, or an action refused (ids with
#: filters, no ``--yes``).  argparse's own usage errors exit 2 as well.
EXIT_USAGE = 2
#: Exit status: the backend could not be reached.
EXIT_UNREACHABLE = 3

_MIXED_SELECTION = (
    "give either record ids or a filter (--topic/--handler/--error-type) or --all, not several"
)


class Refused(Exception):
    """A command refused to act (exit status 2); the message says what to do."""


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped (``\\x1b``, ``\\n``, ``\\u202e``)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _secrets(environ: Mapping[str, str], argv: Iterable[str] = ()) -> list[str]:
    """The secret values of the ``EVENTBUS_*`` environment and of the command line:
    secret settings (``EVENTBUS_KAFKA_SASL_PASSWORD``) and the passwords in URLs
    (``EVENTBUS_REDIS_URL``, ``--database-url``), as written and decoded."""
    found: list[str] = []
    for name, value in environ.items():
        if not name.upper().startswith(ENV_PREFIX):
            continue
        if is_secret_name(name.upper().removeprefix(ENV_PREFIX)):
            found.append(value)
        found += url_secrets(value)
    for arg in argv:
        found += url_secrets(arg) + url_secrets(arg.partition("=")[2])
    return sorted({s for s in found if s}, key=len, reverse=True)


#: The end of ``eventbus --help``: the environment and the exit statuses (plain
#: text: argparse prints it as is, and ``python -OO`` keeps it).
EPILOG = """\
environment (the application's settings; all of them: eventbus settings):
  EVENTBUS_BACKEND                  redis or kafka: where the dead letters and
                                    subscriptions live (sync keeps them in the
                                    application's memory, out of reach here)
  EVENTBUS_REDIS_URL                the Redis server (redis backend)
  EVENTBUS_REDIS_NAMESPACE          prefix of the Redis keys (default eventbus):
                                    the deployment to act on
  EVENTBUS_SERVICE                  the service that subscriptions sync writes
  EVENTBUS_KAFKA_BOOTSTRAP_SERVERS  the Kafka brokers (kafka backend)
  EVENTBUS_DLQ_TOPIC_SUFFIX         dead letters of topic T are in topic T +
                                    this suffix (kafka; default .dlq)

exit status:
  0  done
  1  something asked for was missing or failed (no such record, a replay failed)
  2  bad usage or refused: a wrong option or setting, ids mixed with --all or
     filters, a purge or removal without --yes
  3  the backend could not be reached (down, wrong address, credentials refused)
"""

#: Characters per line of the help's prose.
HELP_WIDTH = 78

_JSON_HELP = "print JSON instead of a table"
#: Characters of a subscription's schema hash ``subscriptions list`` shows.
SCHEMA_HASH_SHOWN = 8


def _parser() -> argparse.ArgumentParser:
    from eventbus import __version__
    from eventbus.backends import DEV_SERVERS, dev_server

    parser = argparse.ArgumentParser(
        prog="eventbus",
        description=textwrap.fill(
            "Dead letters, subscriptions and settings of fastapi-eventbus; a local "
            "Kafka-protocol broker to try the kafka backend.",
            HELP_WIDTH,
            break_on_hyphens=False,
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"eventbus {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log, and show tracebacks of errors"
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="what to do"
    )

    def command(
        group: Any, name: str, text: str, epilog: str | None = EPILOG, more: str = ""
    ) -> argparse.ArgumentParser:
        description = text[0].upper() + text[1:] + (more or ".")
        sub: argparse.ArgumentParser = group.add_parser(
            name,
            help=text,
            description=textwrap.fill(description, HELP_WIDTH, break_on_hyphens=False),
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        return sub

    dlq = command(commands, "dlq", "dead letters: list, show, replay, purge").add_subparsers(
        dest="action", required=True, metavar="ACTION", help="what to do"
    )

    def add_filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--topic", help="only dead letters of this topic")
        p.add_argument("--handler", help="only those of this handler (its actor name)")
        p.add_argument(
            "--error-type", help="only those that failed with this exception, e.g. TimeoutError"
        )
        p.add_argument("--json", action="store_true", help=_JSON_HELP)

    listing = command(dlq, "list", "list dead letters, newest last")
    add_filters(listing)
    listing.add_argument(
        "--limit", type=int, default=50, help="show at most this many (default: %(default)s)"
    )

    show = command(dlq, "show", "show one dead letter with its traceback")
    show.add_argument("id", help="the record id (see dlq list)")
    show.add_argument("--json", action="store_true", help=_JSON_HELP)

    for name, text in (
        ("replay", "send dead letters back to the handler that failed on them"),
        ("purge", "delete dead letters for good"),
    ):
        action = command(dlq, name, text)
        action.add_argument("ids", nargs="*", help="record ids (or use filters, or --all)")
        add_filters(action)
        action.add_argument("--all", action="store_true", help="every dead letter")
        if name == "replay":
            action.add_argument(
                "--to-handler",
                metavar="NAME",
                help="deliver to this handler of the same topic and service instead (the "
                "new name of a renamed handler)",
            )
        if name == "purge":
            action.add_argument(
                "--yes", action="store_true", help="confirm a purge by filter or --all"
            )

    subs = command(
        commands, "subscriptions", "handler subscriptions stored in Redis"
    ).add_subparsers(dest="action", required=True, metavar="ACTION", help="what to do")
    listing = command(subs, "list", "list every subscription with its backlog and workers")
    listing.add_argument("--service", help="only the subscriptions of this service")
    listing.add_argument("--json", action="store_true", help=_JSON_HELP)
    sync = command(
        subs,
        "sync",
        "write the subscriptions of the handlers in MODULES without starting a worker",
    )
    sync.add_argument("modules", nargs="+", help="handler modules, e.g. myapp.handlers")
    sync.add_argument("--json", action="store_true", help=_JSON_HELP)
    remove = command(
        subs, "remove", "remove a subscription and dead-letter the events queued for it"
    )
    remove.add_argument("handler", help="the handler's actor name (see subscriptions list)")
    remove.add_argument("--service", help="its service, when several have that handler")
    remove.add_argument("--yes", action="store_true", help="confirm the removal")
    remove.add_argument("--json", action="store_true", help=_JSON_HELP)

    settings = command(
        commands,
        "settings",
        "print the reference of every setting (variable, type, default, meaning) as markdown",
        epilog=None,
    )
    settings.add_argument(
        "-o", "--output", metavar="FILE", help="write it to FILE instead of standard output"
    )

    dev = command(
        commands, "dev", "local services for trying eventbus out", epilog=None
    ).add_subparsers(dest="action", required=True, metavar="SERVICE", help="the service to run")
    for name in DEV_SERVERS:
        try:
            server = dev_server(name)
        except ImportError as exc:  # its backend's extra: `eventbus dev NAME` says which
            served = command(dev, name, f"not installed here: {exc}", epilog=None)
            served.add_argument("--host", help="address to listen on")
            served.add_argument("--port", type=int, help="port to listen on")
            continue
        served = command(dev, name, server.summary, epilog=server.epilog, more=server.details)
        served.add_argument(
            "--host", default=server.host, help="address to listen on (default: %(default)s)"
        )
        served.add_argument(
            "--port", type=int, default=server.port, help="port to listen on (default: %(default)s)"
        )

    outbox = command(
        commands,
        "outbox",
        "the transactional outbox (PostgreSQL): its relay and the rows it set aside",
    ).add_subparsers(dest="action", required=True, metavar="ACTION", help="what to do")

    def outbox_command(name: str, text: str) -> argparse.ArgumentParser:
        sub = command(outbox, name, text)
        sub.add_argument(
            "--database-url", help="SQLAlchemy async URL (default: EVENTBUS_OUTBOX_DATABASE_URL)"
        )
        return sub

    outbox_command("relay", "forward committed outbox rows to the backend until SIGTERM")
    listing = outbox_command("list", "list the rows the relay set aside, with their reasons")
    listing.add_argument("--topic", help="only the rows of this topic")
    listing.add_argument(
        "--limit", type=int, default=50, help="show at most this many (default: %(default)s)"
    )
    listing.add_argument("--json", action="store_true", help=_JSON_HELP)
    for name, text in (
        ("retry", "put set-aside rows back in the outbox: the relay sends them again"),
        ("drop", "delete set-aside rows for good"),
    ):
        action = outbox_command(name, text)
        action.add_argument("ids", nargs="*", type=int, help="row ids (or --topic, or --all)")
        action.add_argument("--topic", help="the rows of this topic")
        action.add_argument("--all", action="store_true", help="every set-aside row")
        action.add_argument("--json", action="store_true", help=_JSON_HELP)
        if name == "drop":
            action.add_argument(
                "--yes", action="store_true", help="confirm a drop by --topic or --all"
            )
    _schema_parser(commands, command)
    _asyncapi_parser(commands, command)
    return parser


def _schema_parser(commands: Any, command: Any) -> None:
    """``eventbus schema snapshot|check``: event contracts before deploy."""
    from eventbus.contracts.compat import MODES
    from eventbus.contracts.snapshot import ROLES

    schema = command(
        commands,
        "schema",
        "event schemas: snapshot them, check a change is compatible before deploy",
        epilog=None,
    ).add_subparsers(dest="action", required=True, metavar="ACTION", help="what to do")
    snap = command(
        schema,
        "snapshot",
        "write the JSON Schema of every event class of MODULES (a lock file to commit)",
        epilog=None,
        more=(
            ". Rewriting an existing FILE keeps each changed event's previous schema in its "
            "history (the transitive modes check it)."
        ),
    )
    snap.add_argument("modules", nargs="+", metavar="MODULE", help="e.g. myapp.events")
    snap.add_argument("-o", "--output", metavar="FILE", help="write to FILE (default: stdout)")
    check = command(
        schema,
        "check",
        "check the event classes of MODULES against a snapshot and other services' contracts",
        epilog=SCHEMA_EPILOG,
    )
    check.add_argument("modules", nargs="+", metavar="MODULE", help="e.g. myapp.events")
    check.add_argument(
        "--snapshot",
        metavar="FILE",
        help="the committed snapshot (default: contracts.json, unless only --against is given)",
    )
    check.add_argument(
        "--mode",
        choices=MODES,
        default="full",
        help="compatibility with the snapshot, as in Schema Registry (default: %(default)s)",
    )
    check.add_argument(
        "--against",
        metavar="FILE",
        action="append",
        default=[],
        help="another service's snapshot or AsyncAPI document (repeatable)",
    )
    check.add_argument(
        "--role",
        choices=ROLES,
        help="the other service's role: it publishes the events (this code reads them) or "
        "subscribes to them (this code writes them); default: both",
    )
    check.add_argument(
        "--live",
        action="store_true",
        help="instead, check them (as their publisher) against the schemas the live "
        "subscribers of their topics stored in the broker (Redis, Kafka; EVENTBUS_* settings)",
    )


#: The end of ``eventbus schema check --help``.
SCHEMA_EPILOG = """modes (new = the classes of MODULES, old = the snapshot):
  backward     new classes read what the old ones wrote (subscribers deploy first)
  forward      old classes read what the new ones write (publishers deploy first)
  full         both (either side may deploy first)
  *_transitive the same against every older schema in the snapshot's history
  none         no check

exit status:
  0  compatible (one line says what was checked)
  1  breaking changes, one line each: <event type>: <field path>: <change>
  2  bad input: a module that does not import, a file that cannot be read or is
     not a snapshot or an AsyncAPI document
"""


def _schema(args: argparse.Namespace, out: TextIO) -> int:
    """``eventbus schema snapshot|check`` (without ``--live``)."""
    from eventbus.contracts import snapshot as contracts

    try:
        classes = contracts.event_classes(args.modules)
        if not classes:
            raise Refused(f"no event classes found in {', '.join(args.modules)}")
        if args.action == "snapshot":
            previous = None
            if args.output and os.path.exists(args.output):
                previous = contracts.read_contracts(args.output)
            text = contracts.dump(contracts.snapshot(classes, previous))
            if args.output is None:
                out.write(text)
            else:
                with open(args.output, "w", encoding="utf-8") as file:
                    file.write(text)
                out.write(f"{len(classes)} event type(s) written to {args.output}\n")
            return EXIT_OK
        current = contracts.contracts_of(classes)
        results: list[tuple[str, contracts.CheckResult]] = []
        snapshot_path = args.snapshot or (None if args.against else "contracts.json")
        if snapshot_path is not None:
            recorded = contracts.read_contracts(snapshot_path)
            results.append(
                (
                    f"{snapshot_path} (mode {args.mode})",
                    contracts.check_snapshot(current, recorded, args.mode),
                )
            )
        for path in args.against:
            other = contracts.read_contracts(path)
            role = f"as {args.role}" if args.role else "as publisher and subscriber"
            results.append((f"{path} ({role})", contracts.check_against(current, other, args.role)))
    except contracts.ContractError as exc:
        raise Refused(str(exc)) from exc
    breaking = [item for _, result in results for item in result.breaking]
    for _, result in results:
        for note in result.notes:
            out.write(f"note: {printable(note)}\n")
    for item in breaking:
        out.write(printable(str(item)) + "\n")
    if breaking:
        return EXIT_FAILED
    checked = "; ".join(f"{r.checked} event type(s) against {what}" for what, r in results)
    out.write(f"compatible: {checked}\n")
    return EXIT_OK


def _asyncapi_parser(commands: Any, command: Any) -> None:
    """``eventbus asyncapi APP``: the application's AsyncAPI 3.0 document."""
    sub = command(
        commands,
        "asyncapi",
        "print the AsyncAPI 3.0 document of an application: channels, messages, operations",
        epilog=None,
        more=(
            ". APP is module:attribute (an EventBus, or the FastAPI app: then the one "
            "EventBus of its module), or a module holding one EventBus; the working "
            "directory is on the import path."
        ),
    )
    sub.add_argument("app", metavar="APP", help="e.g. shop.main:app or shop.main:bus")
    sub.add_argument(
        "modules",
        nargs="*",
        metavar="MODULE",
        help="handler modules to import first (those APP does not import)",
    )
    sub.add_argument("--yaml", action="store_true", help="YAML instead of JSON (needs PyYAML)")
    sub.add_argument("-o", "--output", metavar="FILE", help="write to FILE (default: stdout)")
    sub.add_argument("--title", help="info.title (default: the app's title, else the service)")
    sub.add_argument(
        "--doc-version", metavar="VERSION", help="info.version (default: the app's version)"
    )


def _asyncapi(args: argparse.Namespace, out: TextIO) -> int:
    """``eventbus asyncapi APP``: print (or write) the document."""
    from eventbus.contracts.asyncapi import asyncapi_document, load_app

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # modules of the project, as dramatiq's CLI does
    try:
        target = load_app(args.app)
        for name in args.modules:
            importlib.import_module(name)
    except ImportError as exc:
        raise Refused(f"cannot import {exc.name or args.app!r}: {exc}") from exc
    except LookupError as exc:
        raise Refused(str(exc.args[0])) from exc
    document = asyncapi_document(target, title=args.title, version=args.doc_version)
    if args.yaml:
        try:
            yaml: Any = importlib.import_module("yaml")
        except ImportError as exc:
            raise Refused("--yaml needs PyYAML (pip install pyyaml); JSON needs nothing") from exc
        text = yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100)
    else:
        text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    if args.output is None:
        out.write(text)
    else:
        with open(args.output, "w", encoding="utf-8") as file:
            file.write(text)
        out.write(f"AsyncAPI document written to {args.output}\n")
    return EXIT_OK


def _table(records: list[FailedEvent]) -> str:
    rows: list[tuple[str, ...]] = [
        ("ID", "LAST FAILED (UTC)", "TOPIC", "HANDLER", "ATTEMPTS", "ERROR")
    ]
    for r in records:
        error = printable(f"{r.error_type}: {r.error}")
        if len(error) > MAX_ERROR_WIDTH:
            error = error[: MAX_ERROR_WIDTH - 1] + "…"
        when = r.last_failed_at.strftime("%Y-%m-%d %H:%M:%S")
        rows.append((r.id, when, r.topic, r.handler, str(r.attempts), error))
    return _grid(rows)


def _grid(rows: list[tuple[str, ...]]) -> str:
    """Aligned columns; every cell made printable."""
    rows = [tuple(printable(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _subscriptions(args: argparse.Namespace, bus: EventBus, out: TextIO, err: TextIO) -> int:
    from eventbus.backends import StoresSubscriptions

    backend = bus.backend
    if not isinstance(backend, StoresSubscriptions):
        raise Refused(
            f"the {backend.name} backend stores no subscriptions to act on: "
            f"{backend.subscriptions_home()}"
        )

    def emit(data: Any, text: str) -> None:
        out.write((json.dumps(data, indent=2, default=str) if args.json else text) + "\n")

    if args.action == "sync":
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # modules of the project, as dramatiq's CLI does
        for name in args.modules:
            try:
                importlib.import_module(name)
            except ImportError as exc:
                raise Refused(f"cannot import handler module {name!r}: {exc}") from exc
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
            (
                "SERVICE",
                "TOPIC",
                "HANDLER",
                "QUEUE",
                "BACKLOG",
                "WORKERS",
                "CODE",
                "SCHEMA",
                "LAST SEEN (UTC)",
            )
        ]
        notes = []
        for r in rows:
            seen = r.last_seen.strftime("%Y-%m-%d %H:%M:%S") if r.last_seen else "never"
            # CODE: how many code versions its live workers run ("MIXED" past one).
            code = str(len(r.code)) + (" MIXED" if r.mixed_code else "")
            table.append(
                (
                    r.service,
                    r.topic,
                    r.handler,
                    r.queue,
                    str(r.backlog),
                    str(r.live_workers),
                    code,
                    # SCHEMA: the hash of what its handler validates into ("-": untyped).
                    (r.schema or "-")[:SCHEMA_HASH_SHOWN],
                    seen,
                )
            )
            if r.mixed_code:
                notes.append(f"{r.handler} ({r.service}): {r.mixed_code}")
        text = _grid(table) + f"\n{len(rows)} subscription(s)"
        if notes:
            text += "\nMIXED code versions among live workers:\n" + "\n".join(
                "  " + printable(note) for note in notes
            )
        emit([r.to_dict() for r in rows], text)
        for warning in backend.subscription_warnings():  # e.g. a topic that looks mistyped
            err.write(f"warning: {printable(warning)}\n")
        return 0

    matches = [r for r in rows if r.handler == args.handler]
    if args.service:
        matches = [r for r in matches if r.service == args.service]
    if not matches:
        return _fail(err, f"no subscription of handler {args.handler!r}")
    if len(matches) > 1:
        services = ", ".join(sorted(r.service for r in matches))
        raise Refused(f"handler {args.handler!r} is subscribed in {services}: add --service")
    [row] = matches
    if not args.yes:
        raise Refused(
            f"removing {row.handler} ({row.service}, topic {row.topic}) stops its deliveries "
            f"and dead-letters the {row.backlog} event(s) waiting for it: add --yes"
        )
    count = backend.remove_subscription(row.service, row.topic, row.handler, bus.dlq.store)
    emit(
        {"removed": row.to_dict(), "dead_lettered": count},
        f"removed {row.handler} ({row.service}); {count} waiting event(s) dead-lettered",
    )
    return 0


def _schema_live(modules: Sequence[str], bus: EventBus, out: TextIO) -> int:
    """``schema check --live MODULES``: the event classes of ``MODULES`` against the
    schemas their topics' live subscribers stored (:mod:`eventbus.contracts.live`);
    one line per breaking change naming the subscriber and the field.  Exit 1 when
    any breaks."""
    from eventbus.backends import StoresSubscriptions
    from eventbus.contracts.live import (
        ReadsLiveSchemas,
        SubscriberSchema,
        check_live,
        default_topic,
        module_event_classes,
    )

    backend = bus.backend
    if not isinstance(backend, StoresSubscriptions | ReadsLiveSchemas):
        raise Refused(
            f"the {backend.name} backend stores no subscriptions, so no live schemas: "
            f"{backend.subscriptions_home()}"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    classes = []
    for name in modules:
        try:
            classes += module_event_classes(importlib.import_module(name))
        except ImportError as exc:
            raise Refused(f"cannot import module {name!r}: {exc}") from exc
    if not classes:
        raise Refused(f"no event class with a default topic in {', '.join(modules)}")
    topics = {default_topic(cls) for cls in classes}
    subscribers: list[SubscriberSchema]
    if isinstance(backend, ReadsLiveSchemas):  # no subscription store: a schema topic
        subscribers = backend.live_schemas(topics)
    else:
        rows = [r for r in backend.subscription_list() if r.topic in topics]
        schemas = backend.stored_schemas(r.schema for r in rows if r.schema)
        subscribers = [
            SubscriberSchema(r.service, r.topic, r.handler, r.schema, schemas[r.schema])
            for r in rows
            if r.schema and r.schema in schemas
        ]
    found = check_live(classes, subscribers)
    checked = len({(s.service, s.handler) for s in subscribers})
    lines = [printable(str(m)) for m in found]
    lines.append(
        f"{len(found)} breaking change(s); {len(classes)} event class(es) checked against "
        f"{checked} live subscriber schema(s)"
    )
    out.write("\n".join(lines) + "\n")
    return EXIT_FAILED if found else EXIT_OK


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return {"topic": args.topic, "handler": args.handler, "error_type": args.error_type}


def _outbox(args: argparse.Namespace, bus: EventBus, out: TextIO) -> int:
    """``outbox relay`` runs the relay until SIGTERM; ``outbox list|retry|drop`` act on
    the rows it set aside (see :mod:`eventbus.outbox.process`, :mod:`eventbus.outbox.dead`)."""
    from eventbus.outbox.dead import count_rows, drop_rows, list_rows, retry_rows
    from eventbus.outbox.process import database_call, run_relay
    from eventbus.outbox.schema import outbox_dead_table as dead
    from eventbus.outbox.schema import outbox_table

    if args.action == "relay":
        return run_relay(bus, out, args.database_url)

    def emit(data: Any, text: str) -> None:
        out.write((json.dumps(data, indent=2, default=str) if args.json else text) + "\n")

    if args.action == "list":

        async def listing(conn: Any) -> tuple[list[Any], int]:
            rows = await list_rows(conn, dead, limit=args.limit, topic=args.topic)
            return rows, await count_rows(conn, dead, topic=args.topic)

        rows, total = database_call(args.database_url, listing)
        table: list[tuple[str, ...]] = [
            ("ID", "SET ASIDE (UTC)", "TOPIC", "EVENT ID", "ATTEMPTS", "REASON")
        ]
        for row in rows:
            reason = printable(row.reason)
            if len(reason) > MAX_ERROR_WIDTH:
                reason = reason[: MAX_ERROR_WIDTH - 1] + "…"
            when = row.set_aside_at.strftime("%Y-%m-%d %H:%M:%S")
            table.append((str(row.id), when, row.topic, row.event_id, str(row.attempts), reason))
        emit(
            {"size": total, "items": [row.to_dict() for row in rows]},
            _grid(table) + f"\n{len(rows)} shown, {total} set aside",
        )
        return EXIT_OK

    selections = sum((bool(args.ids), args.topic is not None, args.all))
    if selections > 1:
        raise Refused("give either row ids or --topic or --all, not several")
    if not selections:
        raise Refused("give row ids, --topic or --all")
    select = {"ids": args.ids or None, "topic": args.topic, "all_rows": args.all}
    if args.action == "retry":

        async def retrying(conn: Any) -> list[int]:
            return await retry_rows(conn, outbox_table, dead, **select)

        done = database_call(args.database_url, retrying)
        verb = "retried"
    else:
        if not args.ids and not args.yes:
            raise Refused("dropping by --topic or --all deletes rows for good: add --yes")

        async def dropping(conn: Any) -> list[int]:
            return await drop_rows(conn, dead, **select)

        done = database_call(args.database_url, dropping)
        verb = "dropped"
    missing = [i for i in args.ids if i not in set(done)]
    lines = [f"{verb} {len(done)}"] + [f"missing {i}" for i in missing]
    emit({verb: done, "missing": missing}, "\n".join(lines))
    return EXIT_FAILED if missing else EXIT_OK


def _fail(err: TextIO, message: str) -> int:
    err.write(f"eventbus: {printable(message)}\n")
    return EXIT_FAILED


def run(
    argv: Sequence[str], bus: EventBus, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run a command against ``bus``; returns the exit status.

    Output goes to ``out``, refusals and failures (one line each) to ``err``
    (default: stdout and stderr).  Backend errors propagate: :func:`main` turns
    them into one line and an exit status.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    args = _parser().parse_args(argv)
    try:
        if args.command == "subscriptions":
            return _subscriptions(args, bus, out, err)
        if args.command == "outbox":
            return _outbox(args, bus, out)
        if args.command == "asyncapi":
            return _asyncapi(args, out)
        if args.command == "schema":
            if args.action == "check" and args.live:
                return _schema_live(args.modules, bus, out)
            return _schema(args, out)
        return _dlq(args, bus, out, err)
    except Refused as exc:
        err.write(f"eventbus: {printable(str(exc))}\n")
        return EXIT_USAGE


def _dlq(args: argparse.Namespace, bus: EventBus, out: TextIO, err: TextIO) -> int:
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
        return EXIT_OK

    if args.action == "show":
        record = dlq.get(args.id)
        if record is None:
            return _fail(err, f"no dead letter {args.id!r}")
        data = record.to_dict()
        text = "\n".join(
            f"{k}: {printable(str(v))}"
            for k, v in data.items()
            if k not in ("traceback", "field_errors")
        )
        if record.field_errors:
            text += "\nfailing fields:" + "".join(
                f"\n  {printable(f['path'] or '(the event)')}: expected "
                f"{printable(f['expected'])}; got {printable(f['got'])}"
                for f in record.field_errors
            )
        tb = "\n".join(printable(line) for line in record.traceback.split("\n"))
        emit(data, text + "\n\n" + tb)
        return EXIT_OK

    filtered = any(value is not None for value in _filters(args).values())
    if (args.ids and (args.all or filtered)) or (args.all and filtered):
        raise Refused(_MIXED_SELECTION)
    if not (args.ids or args.all or filtered):
        raise Refused("give record ids, a filter (--topic/--handler/--error-type) or --all")
    kwargs = {**_filters(args), "all_records": args.all}
    ids = args.ids or None

    if args.action == "replay":
        result = dlq.replay(ids, **kwargs, to_handler=args.to_handler or None)
        lines = [f"replayed {len(result.replayed)}"]
        lines += [f"missing {printable(i)}" for i in result.missing]
        lines += [f"failed {printable(i)}: {printable(why)}" for i, why in result.failed.items()]
        emit(
            {"replayed": result.replayed, "missing": result.missing, "failed": result.failed},
            "\n".join(lines),
        )
        return EXIT_FAILED if result.missing or result.failed else EXIT_OK

    if ids is None and not args.yes:
        raise Refused("purging by filter or --all deletes records for good: add --yes")
    purged = dlq.purge(ids, **kwargs)
    emit({"purged": purged}, f"purged {purged}")
    return EXIT_OK if ids is None or purged == len(ids) else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``eventbus`` console script; returns the exit status."""
    from eventbus.backends import create_backend, dev_server
    from eventbus.bus import EventBus

    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)  # usage errors (exit 2) before touching any backend
    secrets = _secrets(os.environ, argv)
    _route_logs(args.verbose, secrets)
    backend: Backend | None = None
    try:
        if args.command == "settings":
            return _settings_reference(args.output)
        if args.command == "dev":
            dev_server(args.action).run(sys.stdout, args.host, args.port)  # returns if it fails
            return EXIT_FAILED
        if args.command == "schema" and not getattr(args, "live", False):
            return _schema(args, sys.stdout)
        if args.command == "asyncapi":
            return _asyncapi(args, sys.stdout)
        settings = EventBusSettings()
        backend = create_backend(settings)
        refusal = backend.dead_letters_out_of_reach() if args.command == "dlq" else None
        if refusal is not None:
            raise Refused(refusal)
        bus = EventBus(backend=backend, settings=settings)
        return run(argv, bus)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        code, message = _describe_failure(exc, backend)
        if args.verbose:
            sys.stderr.write(redact("".join(traceback.format_exception(exc)), secrets))
        sys.stderr.write(f"eventbus: {printable(redact(message, secrets))}\n")
        return code


def _settings_reference(output: str | None) -> int:
    """Print (or write to ``output``) the settings reference."""
    from eventbus.settings_reference import render

    text = render()
    if output is None:
        sys.stdout.write(text)
    else:
        with open(output, "w", encoding="utf-8") as file:
            file.write(text)
    return EXIT_OK


class RedactingFormatter(logging.Formatter):
    """A formatter whose lines (message and traceback) go through :func:`redact`."""

    def __init__(self, fmt: str, secrets: Iterable[str] = ()) -> None:
        super().__init__(fmt)
        self.secrets = list(secrets)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), self.secrets)


def _route_logs(verbose: bool, secrets: Iterable[str] = ()) -> None:
    """Libraries' logs on stderr with ``-v`` (secrets redacted); else nowhere (errors
    are reported once)."""
    root = logging.getLogger()
    if verbose:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(RedactingFormatter("%(levelname)s %(name)s: %(message)s", secrets))
        root.setLevel(logging.INFO)
    else:
        # A handler on the root logger keeps Python's last-resort handler from
        # printing WARNING records (aiokafka logs each failed connection attempt).
        handler = logging.NullHandler()
    if not any(type(h) is type(handler) for h in root.handlers):
        root.addHandler(handler)


def _describe_failure(exc: Exception, backend: Backend | None) -> tuple[int, str]:
    """The exit status and the one-line message of a command that raised ``exc``
    (``backend``: the one built from the settings, if it got that far)."""
    if isinstance(exc, Refused | ConfigurationError | MissingExtraError):
        return EXIT_USAGE, str(exc)
    cause = _connection_error(exc, backend)
    from_none = exc.__suppress_context__ and exc.__cause__ is None
    if cause is not None and isinstance(exc, EventBusError) and from_none:
        # Raised ``from None`` with a message that says what could not be reached
        # (the outbox database): not the backend.
        return EXIT_UNREACHABLE, str(exc)
    if cause is not None and backend is not None:
        detail = str(cause)
        if not detail.startswith(type(cause).__name__):
            detail = f"{type(cause).__name__}: {detail}"
        return EXIT_UNREACHABLE, f"cannot reach {backend.name} at {backend.address()} ({detail})"
    if isinstance(exc, EventBusError):
        return EXIT_FAILED, str(exc)
    return EXIT_FAILED, f"{type(exc).__name__}: {exc}"


def _connection_error(exc: BaseException, backend: Backend | None) -> BaseException | None:
    """The exception in ``exc``'s chain saying a server could not be reached, if any
    (as ``backend`` tells them apart; without one, the network's own errors)."""
    from eventbus.backends.base import NETWORK_ERRORS

    def network_error(error: BaseException) -> bool:
        return isinstance(error, NETWORK_ERRORS)

    unreachable = backend.unreachable if backend is not None else network_error
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if unreachable(current):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
