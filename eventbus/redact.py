"""Secrets out of everything eventbus prints or logs: URLs, DSNs, error messages.

One rule for every place a connection string is shown (the ``eventbus`` CLI, its
logs with ``-v``, health details, settings reprs and errors)::

    >>> redact_url("redis://admin:s3cret@redis:6379/0?ssl_password=k3y")
    'redis://admin:***@redis:6379/0?ssl_password=***'

A URL is read the way its clients read it, and whatever any of them could take
for a password is hidden:

- the password of the userinfo, up to the *last* ``@`` before the host, as
  redis-py (``urlsplit``) reads it, so a raw ``@`` in a password hides all of it
  (SQLAlchemy splits at the first ``@``: a subset of that);
- every query parameter whose name looks secret, case-insensitive and
  percent-decoded (``password``, ``ssl_password``, ``sentinel_password``,
  ``sslpassword``, ``token``, ``secret``, ``api_key``... see :func:`is_secret_name`);
- a URL that no parser would read as intended (an ``@`` after the host, in its
  path or in a query field, a port that is not a number) is shown as
  ``scheme://***``: wherever its password ends, none of it is shown.

Free text (:func:`redact`) gets every URL in it redacted that way, every
``name=value`` and ``'name': 'value'`` whose name looks secret, and each known
secret value given by the caller (the CLI passes those of its environment and
command line: :func:`url_secrets`), which also catches a password that an error
message quotes outside of its URL.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote, unquote_plus

__all__ = ["MASK", "is_secret_name", "redact", "redact_url", "url_secrets"]

#: What a hidden secret reads as.
MASK = "***"

#: ``scheme://`` at the start of a URL (RFC 3986 scheme characters).
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
#: A URL in free text: a scheme and everything up to the next white space.
_URL_IN_TEXT = re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*://\S+")
#: Parts of a setting's or parameter's name that make its value a secret.
_SECRET_PARTS = re.compile(
    r"password|passwd|passphrase|(?:^|_)pass(?:$|_)|pwd|secret|token|credential|"
    r"api_?key|private_?key|access_?key|auth_?key|signature"
)
#: Names that are secrets whole (``?key=...``, ``?sig=...``).
_SECRET_NAMES = frozenset({"key", "sig"})
#: Characters taken off the end of a URL found in text when it has no query: the
#: ``)`` or ``'`` that closes the sentence or repr around it.
_TRAILING = ")]}>'\",.;:"
#: ``name=value`` (a query, a libpq DSN ``host=db password=x``, a log line) and
#: ``'name': 'value'`` (a dict's repr) whose value may be quoted.
_NAMED_VALUE = re.compile(
    r"""(?P<head>(?P<q>['"]?)(?P<name>[A-Za-z_][\w.-]*)(?P=q)\s*(?:=|(?<=['"]):)\s*)"""
    r"""(?P<value>'[^']*'|"[^"]*"|[^\s&'",;)}\]]+)"""
)


def is_secret_name(name: str) -> bool:
    """Whether a parameter or setting called ``name`` holds a secret
    (``password``, ``SSL_PASSWORD``, ``sentinel_password``, ``sasl_plain_password``,
    ``token``, ``api-key``...); case and ``-``/``_`` do not matter."""
    normal = name.strip().lower().replace("-", "_")
    return normal in _SECRET_NAMES or _SECRET_PARTS.search(normal) is not None


class _Unreadable(ValueError):
    """A URL whose password cannot be told from the rest: hide everything."""


def _split(url: str) -> tuple[str, str | None, str, str, str, str]:
    """``(scheme, userinfo, hostport, path, query, fragment)`` of ``url`` as
    ``urlsplit`` cuts it (the netloc ends at the first ``/``, ``?`` or ``#``; the
    userinfo at its last ``@``); userinfo is None when there is no ``@``.

    Raises:
      ValueError: Not a ``scheme://`` URL.
      _Unreadable: An ``@`` where no password can end (in the path, a query field's
        name, a field without ``=``, the fragment) or a port that is not a number:
        a password with a raw ``/``, ``?`` or ``#`` in it.
    """
    match = _SCHEME.match(url)
    if match is None:
        raise ValueError("not a URL")
    scheme, tail = url[: match.end() - 3], url[match.end() :]
    netloc, tail = _cut(tail, "/?#")
    userinfo, at, hostport = netloc.rpartition("@")
    path, tail = _cut(tail, "?#")
    query, _, fragment = tail.partition("#")
    if "@" in path or "@" in fragment:
        raise _Unreadable(url)
    for field in query[1:].split("&"):
        name, equals, _ = field.partition("=")
        if "@" in name or (not equals and "@" in field):
            raise _Unreadable(url)
    if hostport.startswith("["):
        _, bracket, port = hostport.partition("]")
        if not bracket:
            raise _Unreadable(url)
    else:
        port = hostport
    port = port.rpartition(":")[2] if ":" in port else ""
    if port and not (port.isascii() and port.isdigit()):
        raise _Unreadable(url)
    return scheme, userinfo if at else None, hostport, path, query, fragment


def _cut(text: str, stops: str) -> tuple[str, str]:
    """``text`` cut before the first of ``stops``: ``(head, tail)``."""
    ends = [i for i in (text.find(c) for c in stops) if i >= 0]
    cut = min(ends) if ends else len(text)
    return text[:cut], text[cut:]


def _query_secrets(query: str) -> list[str]:
    """The values (as written) of the secret-named fields of ``?a=1&password=x``."""
    found = []
    for field in query[1:].split("&"):
        name, equals, value = field.partition("=")
        if equals and value and is_secret_name(unquote_plus(name)):
            found.append(value)
    return found


def _redact_query(query: str) -> str:
    """``?a=1&password=x`` with the secret-named values hidden."""
    if not query:
        return ""
    fields = []
    for field in query[1:].split("&"):
        name, equals, value = field.partition("=")
        secret = equals and value and is_secret_name(unquote_plus(name))
        fields.append(f"{name}={MASK}" if secret else field)
    return "?" + "&".join(fields)


def redact_url(url: str) -> str:
    """``url`` with its password and secret query parameters shown as ``***``; the
    scheme, user, host, port, path and other parameters are kept.

    A string that is not a URL (``host:9092,host2:9092``, a libpq DSN
    ``host=db password=x``) keeps everything but its ``name=value`` secrets.
    """
    try:
        scheme, userinfo, hostport, path, query, fragment = _split(url)
    except _Unreadable:
        return f"{url[: url.index('://')]}://{MASK}"
    except ValueError:
        return _NAMED_VALUE.sub(_mask_named, url)
    shown = ""
    if userinfo is not None:
        user, colon, password = userinfo.partition(":")
        shown = f"{user}:{MASK}@" if colon and password else f"{userinfo}@"
    hash_ = "#" if url.endswith("#") or fragment else ""
    fragment = _NAMED_VALUE.sub(_mask_named, fragment)
    return f"{scheme}://{shown}{hostport}{path}{_redact_query(query)}{hash_}{fragment}"


def url_secrets(url: str) -> list[str]:
    """The secret values in ``url``, as written and percent-decoded: the userinfo's
    password and the values of secret-named parameters (for :func:`redact`).

    For a URL that :func:`redact_url` cannot read, everything between ``://`` and
    its last ``@`` (and that without the user name) counts as secret.
    """
    found: list[str] = []
    try:
        _, userinfo, _, _, query, fragment = _split(url)
    except _Unreadable:
        head = url[url.index("://") + 3 :]
        if "@" in head:
            userinfo = head.rpartition("@")[0]
            found += [userinfo, userinfo.partition(":")[2]]
        named = head
    except ValueError:
        named = url
    else:
        found.append((userinfo or "").partition(":")[2])
        found += _query_secrets(query)
        named = fragment
    for match in _NAMED_VALUE.finditer(named.replace("?", "&")):
        if is_secret_name(unquote_plus(match["name"])):
            found.append(match["value"].strip("'\""))
    decoded = [form for s in found for form in (unquote(s), unquote_plus(s))]
    return sorted({s for s in found + decoded if s}, key=len, reverse=True)


def _mask_named(match: re.Match[str]) -> str:
    if not is_secret_name(match["name"]):
        return match[0]
    value = match["value"]
    quote = value[0] if value[0] in "'\"" else ""
    return f"{match['head']}{quote}{MASK}{quote}"


def _redact_found_url(match: re.Match[str]) -> str:
    url = match[0]
    if "?" in url or "#" in url:
        return redact_url(url)  # a trailing ")" may belong to a secret value: keep it
    bare = url.rstrip(_TRAILING)
    return redact_url(bare) + url[len(bare) :]


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every URL's password, every secret-named ``name=value`` and each
    of ``secrets`` (longest first) shown as ``***``."""
    text = _URL_IN_TEXT.sub(_redact_found_url, text)
    text = _NAMED_VALUE.sub(_mask_named, text)
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text
