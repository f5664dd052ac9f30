"""Code fingerprints: which code serves a subscription.

Two codebases can derive the same service name and handler names (two teams'
``shop/handlers.py``, both deployed as service ``shop``): their workers then
share one subscription and take each other's events.  Each worker therefore
records, next to its subscriptions, a short fingerprint of the code behind each
handler, and ``eventbus subscriptions list`` and the console's operations page
flag a subscription whose live workers report more than one.

During a rolling deploy two fingerprints are expected for a while (old and new
workers side by side); the flag says so rather than raising an alarm.  One that
stays after the deploy finished means two different codebases serve it.

A fingerprint is the first :data:`FINGERPRINT_LENGTH` hex digits of the SHA-256 of
the handler's module source file, its qualified name and the eventbus version:
computed once per handler when the worker boots (one file read per module), never
on the event path.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from functools import cache
from importlib import metadata
from typing import Any

#: Hex digits of a fingerprint shown and stored (48 bits: collisions between the
#: few codebases of one deploy are out of reach).
FINGERPRINT_LENGTH = 12


@cache
def eventbus_version() -> str:
    """The installed eventbus distribution's version ("unknown" when not installed)."""
    try:
        return metadata.version("fastapi-eventbus")
    except metadata.PackageNotFoundError:
        return "unknown"


@cache
def _module_digest(path: str) -> str:
    """SHA-256 of a source file's bytes (read once per process); "" if unreadable."""
    try:
        with open(path, "rb") as source:
            return hashlib.sha256(source.read()).hexdigest()
    except OSError:
        return ""


def _target(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The function behind wrappers (``functools.wraps``) and partials."""
    seen = 0
    while seen < 32:
        inner = getattr(fn, "__wrapped__", None) or getattr(fn, "func", None)
        if not callable(inner):
            break
        fn = inner
        seen += 1
    return fn


def code_fingerprint(fn: Callable[..., Any]) -> str:
    """The fingerprint of handler ``fn``: its module file's bytes, its qualified name
    and the eventbus version.  A handler whose source file cannot be read (built at
    run time, a zip without sources) is fingerprinted by its module and name alone."""
    target = _target(fn)
    module = getattr(target, "__module__", None) or "?"
    name = getattr(target, "__qualname__", None) or type(target).__qualname__
    try:
        path = inspect.getsourcefile(target) or ""
    except TypeError:
        path = ""
    digest = _module_digest(path) if path else ""
    text = f"{digest}\n{module}.{name}\n{eventbus_version()}"
    return hashlib.sha256(text.encode()).hexdigest()[:FINGERPRINT_LENGTH]


def mixed_code(fingerprints: Mapping[str, Iterable[str]]) -> str | None:
    """A sentence for a subscription whose live workers run different code, or None.

    ``fingerprints`` maps each fingerprint to the workers that reported it.
    """
    if len(fingerprints) < 2:
        return None
    parts = []
    for fingerprint, workers in sorted(fingerprints.items()):
        names = sorted(workers)
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        parts.append(f"{fingerprint} on {shown}")
    return (
        f"{len(fingerprints)} code versions ({'; '.join(parts)}): expected while a rolling "
        "deploy runs; once it finished, two codebases serve this subscription under one "
        "service name (set EVENTBUS_SERVICE apart)"
    )
