"""The dashboard's login and logout: a form that takes one of MAILER_API_TOKEN's tokens and
answers with an HttpOnly, SameSite=Strict session cookie."""

from __future__ import annotations

import hmac
import logging
from urllib.parse import urlencode

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from mailer.web.pages import page
from mailer.web.session import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    SESSION_SECONDS,
    Forbidden,
    LoginNeeded,
    access,
    check_post,
    is_open,
    login_nonce,
    login_token,
    new_session,
    read_form,
    same_site,
)

logger = logging.getLogger("mailer.web")
router = APIRouter(include_in_schema=False)


def _local_path(target: str) -> str:
    """Only a path of this site to go back to after the login (no open redirect)."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


def _login_form(request: Request, target: str, *, status: int = 200, refused: str = "") -> HTMLResponse:
    nonce = login_nonce()
    configured = bool(request.app.state.settings.api_tokens)
    answer = page(
        request, "login.html", status=status, nonce=nonce, next=target, refused=refused, configured=configured
    )
    answer.set_cookie(
        LOGIN_COOKIE,
        nonce,
        max_age=600,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return answer


@router.get("/login", response_model=None)
async def login_page(request: Request, next: str = "/") -> Response:
    if is_open(request):
        return RedirectResponse("/", status_code=303)
    return _login_form(request, _local_path(next))


@router.post("/login", response_model=None)
async def log_in(request: Request) -> Response:
    """A valid token (and the form's own CSRF nonce) gives a session for SESSION_SECONDS."""
    if is_open(request):
        return RedirectResponse("/", status_code=303)
    same_site(request)
    form = await read_form(request)
    target = _local_path(form.get("next", "/"))
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    if not nonce or not hmac.compare_digest(form.get("login_csrf", "").encode(), nonce.encode()):
        raise Forbidden("the login form is stale or came from elsewhere: open the login page again")
    token = login_token(request, form.get("token", ""))
    if token is None:
        logger.warning("request %s: dashboard login refused (wrong token)", request.state.request_id)
        return _login_form(request, target, status=401, refused="This token is not accepted.")
    answer = RedirectResponse(target, status_code=303)
    answer.set_cookie(
        SESSION_COOKIE,
        new_session(token),
        max_age=SESSION_SECONDS,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    answer.delete_cookie(LOGIN_COOKIE)
    return answer


@router.post("/logout", response_model=None)
async def log_out(request: Request) -> Response:
    allowed = access(request)
    check_post(request, await read_form(request), allowed)
    answer = RedirectResponse("/login", status_code=303)
    answer.delete_cookie(SESSION_COOKIE)
    return answer


def install(app: FastAPI) -> None:
    """Without a session a page answers with the login form; a refused POST with a 403 page."""

    async def on_login_needed(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LoginNeeded)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if request.method == "GET" and request.url.query.startswith("part="):
            return Response(status_code=401)  # the live panel's script: reload to log in
        return RedirectResponse("/login?" + urlencode({"next": target}), status_code=303)

    async def on_forbidden(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Forbidden)
        logger.warning("request %s: dashboard refused: %s", request.state.request_id, exc.reason)
        return page(request, "forbidden.html", status=403, reason=exc.reason)

    app.add_exception_handler(LoginNeeded, on_login_needed)
    app.add_exception_handler(Forbidden, on_forbidden)
