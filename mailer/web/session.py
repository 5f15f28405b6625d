"""Who may use the dashboard: a session cookie that the login form sets for one of
MAILER_API_TOKEN's tokens, a CSRF token in every form, and the open mode of a service bound to
loopback without a token.

The cookie holds no token: an expiry, a random nonce and an HMAC over both, keyed by the token
that logged in. Removing a token from MAILER_API_TOKEN therefore ends its sessions too, and
every `mailer serve` behind a load balancer accepts the others' cookies. A form's CSRF token is
an HMAC of the session's nonce under the same key, so a page of another site can neither read
nor forge it; on top, a POST whose Origin or Sec-Fetch-Site says it came from elsewhere is
refused, and the cookie is SameSite=Strict.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from fastapi import Request

from mailer.web.auth import matching_token

SESSION_COOKIE = "mailer_session"
LOGIN_COOKIE = "mailer_login"  # the login form's own CSRF nonce (double submit)
SESSION_SECONDS = 12 * 3600
FORM_LIMIT_BYTES = 16_384  # the largest dashboard form read: a login or a re-drive
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class LoginNeeded(Exception):
    """No valid session: the dashboard answers with the login form (a redirect for GETs)."""


class Forbidden(Exception):
    """A POST without a valid CSRF token, from another site, or a Host the open mode refuses."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Access:
    """A dashboard request allowed in: the CSRF token its forms carry, and whether it is the
    open mode (no login, nothing to log out of)."""

    csrf: str
    open: bool


def _key(token: bytes) -> bytes:
    return hmac.new(token, b"mailer dashboard session v1", hashlib.sha256).digest()


def _sign(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def new_session(token: bytes, *, now: float | None = None) -> str:
    """The cookie value for a login with `token`."""
    expires = int((now if now is not None else time.time()) + SESSION_SECONDS)
    head = f"{expires}.{secrets.token_urlsafe(16)}"
    return f"{head}.{_sign(_key(token), head)}"


def _session(tokens: list[bytes], cookie: str, *, now: float) -> Access | None:
    expires, _, rest = cookie.partition(".")
    nonce, _, signature = rest.partition(".")
    if not expires.isdigit() or int(expires) < now or not nonce or not signature:
        return None
    head = f"{expires}.{nonce}"
    for token in tokens:
        key = _key(token)
        if hmac.compare_digest(_sign(key, head), signature):
            return Access(csrf=_sign(key, "csrf:" + nonce), open=False)
    return None


def is_open(request: Request) -> bool:
    """No login: bound to loopback and no token configured (`mailer serve` decides)."""
    return bool(request.app.state.open_dashboard)


def access(request: Request) -> Access:
    """The request's dashboard access, or LoginNeeded / Forbidden."""
    if is_open(request):
        # Bound to loopback, but a page elsewhere can point a name at 127.0.0.1 (DNS
        # rebinding): only the loopback names are served.
        host = urlsplit("//" + request.headers.get("host", "")).hostname or ""
        if host not in LOOPBACK_HOSTS:
            raise Forbidden(f"the open dashboard answers only on 127.0.0.1 or localhost, not {host!r}")
        return Access(csrf=_sign(request.app.state.open_key, "csrf:open"), open=True)
    tokens: list[bytes] = request.app.state.settings.api_tokens
    found = _session(tokens, request.cookies.get(SESSION_COOKIE, ""), now=time.time())
    if found is None:
        raise LoginNeeded
    return found


def login_token(request: Request, offered: str) -> bytes | None:
    """The configured token the login form's field names, or None."""
    return matching_token(request.app.state.settings.api_tokens, offered.strip().encode())


async def read_form(request: Request) -> dict[str, str]:
    """A urlencoded form, at most FORM_LIMIT_BYTES (the dashboard posts nothing bigger)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > FORM_LIMIT_BYTES:
            raise Forbidden(f"a dashboard form is at most {FORM_LIMIT_BYTES} bytes")
    fields = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
    return {name: values[-1] for name, values in fields.items()}


def same_site(request: Request) -> None:
    """Refuse a POST that says it comes from another site (Origin, Sec-Fetch-Site)."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        raise Forbidden(f"a form posted from another site ({fetch_site}) is refused")
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host", ""):
        raise Forbidden("a form posted from another origin is refused")


def check_post(request: Request, form: dict[str, str], allowed: Access) -> None:
    """A dashboard POST: from this site, with this session's CSRF token."""
    same_site(request)
    if not hmac.compare_digest(form.get("csrf", "").encode(), allowed.csrf.encode()):
        raise Forbidden("the form's CSRF token is missing or stale: reload the page and try again")


def login_nonce() -> str:
    return secrets.token_urlsafe(16)
