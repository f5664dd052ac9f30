"""CSRF protection of the console's forms: a double-submit token and fetch metadata.

Every page sets (once) a random token in a cookie scoped to the console's path
and writes the same token into each of its forms.  A state-changing request is
refused unless

- its form carries the token of its cookie (another site can make the browser
  send the cookie, but cannot read it to put it in the form), and
- the browser does not say it comes from another site: ``Sec-Fetch-Site``, when
  sent, is ``same-origin`` or ``none``, and ``Origin``, when sent, names the
  host the request went to.

The cookie is ``HttpOnly`` and ``SameSite=Lax`` (a top-level link from elsewhere
still opens the console logged in; a cross-site POST gets no cookie at all) and
``Secure`` on HTTPS.
"""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

#: Name of the cookie holding the token.
COOKIE = "eventbus_console_csrf"
#: Name of the form field repeating it.
FIELD = "csrf_token"
#: Random bytes in a token (encoded as 43 URL-safe characters).
TOKEN_BYTES = 32
#: ``Sec-Fetch-Site`` values of requests made by the console's own pages.
SAME_SITE_FETCH = ("same-origin", "none")


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
    """Why ``request`` fails the CSRF check, or None when it passes."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in SAME_SITE_FETCH:
        return f"the request came from another site (Sec-Fetch-Site: {site})"
    origin = request.headers.get("origin")
    if origin is not None:  # "null" (a sandboxed frame, say) is another origin too
        host = request.headers.get("host", "")
        if urlsplit(origin).netloc.lower() != host.lower():
            return "the request came from another origin"
    cookie = request.cookies.get(COOKIE)
    if cookie is None or not _valid(cookie):
        return "the console's CSRF cookie is missing: reload the page and try again"
    if not form_token:
        return "the form has no CSRF token: reload the page and try again"
    if not hmac.compare_digest(cookie.encode(), form_token.encode()):
        return "the form's CSRF token does not match: reload the page and try again"
    return None
