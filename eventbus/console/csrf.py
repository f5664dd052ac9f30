"""CSRF protection of the console's forms: a double-submit token and fetch metadata.

Every page sets (once) a random token in a cookie scoped to the console's path
and writes the same token into each of its forms.  A state-changing request is
refused unless

- its form carries the token of its cookie (another site can make the browser
  send the cookie, but cannot read it to put it in the form), and
- the browser does not say it comes from another site: ``Sec-Fetch-Site``, when
  sent, is ``same-origin`` or ``none``, and ``Origin``, when sent, names the
  host the request went to (:func:`eventbus.fastapi.cross_site_refusal`, which
  the admin JSON router applies too).

The cookie is ``HttpOnly`` and ``SameSite=Lax`` (a top-level link from elsewhere
still opens the console logged in; a cross-site POST gets no cookie at all) and
``Secure`` on HTTPS.
"""

from __future__ import annotations

import hmac
import secrets

from starlette.requests import Request
from starlette.responses import Response

from eventbus.fastapi import cross_site_refusal

#: Name of the cookie holding the token.
COOKIE = "eventbus_console_csrf"
#: Name of the form field repeating it.
FIELD = "csrf_token"
#: Random bytes in a token (encoded as 43 URL-safe characters).
TOKEN_BYTES = 32


def _valid(token: str) -> bool:
    return 20 <= len(token) <= 100 and token.isascii()


def request_token(request: Request) -> tuple[str, bool]:
    """The token of ``request``'s cookie, or a new one; and whether it is new."""
    token = request.cookies.get(COOKIE)
    if token is not None and _valid(token):
        return token, False
    return secrets.token_urlsafe(TOKEN_BYTES), True


def set_token_cookie(response: Response, request: Request, token: str, path: str) -> None:
    """Send ``token`` in the console's cookie, scoped to ``path``."""
    response.set_cookie(
        COOKIE,
        token,
        path=path or "/",
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
    )


def refusal(request: Request, form_token: str | None) -> str | None:
    """Why ``request`` fails the CSRF check, or None when it passes.

    The fetch-metadata check is :func:`eventbus.fastapi.cross_site_refusal`, the
    one the admin JSON router makes too.
    """
    cross_site = cross_site_refusal(request)
    if cross_site is not None:
        return cross_site
    cookie = request.cookies.get(COOKIE)
    if cookie is None or not _valid(cookie):
        return "the console's CSRF cookie is missing: reload the page and try again"
    if not form_token:
        return "the form has no CSRF token: reload the page and try again"
    if not hmac.compare_digest(cookie.encode(), form_token.encode()):
        return "the form's CSRF token does not match: reload the page and try again"
    return None
