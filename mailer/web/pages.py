"""The dashboard's HTML: one Jinja2 environment over web/templates, the vendored static files,
and the headers every page carries (a strict Content-Security-Policy: no external asset, no
inline script, no framing by other sites)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from mailer.clock import from_ms
from mailer.web.problems import Problem

router = APIRouter(include_in_schema=False)

PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-src 'self'; form-action 'self'; frame-ancestors 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: under no-referrer Chromium posts forms with "Origin: null".
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
# A mail's own HTML, shown in an iframe: no script, no form, nothing fetched but inline images.
MAIL_HEADERS = PAGE_HEADERS | {
    "Content-Security-Policy": "sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:",
}

_STATIC = {"dashboard.css": "text/css; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8"}


def _ago(moment: datetime | None, now: datetime | None = None) -> str:
    """'3 min ago', 'in 2 h': how far a moment is from now, for people scanning a table."""
    if moment is None:
        return ""
    delta = (now or datetime.now(UTC)) - moment
    ahead = delta < timedelta(0)
    seconds = abs(delta.total_seconds())
    for unit, size in (("d", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= size:
            amount = f"{int(seconds // size)} {unit}"
            break
    else:
        amount = f"{int(seconds)} s"
    return f"in {amount}" if ahead else f"{amount} ago"


def _local(moment: datetime | str | None) -> str:
    if moment is None or moment == "":
        return ""
    when = datetime.fromisoformat(moment) if isinstance(moment, str) else moment
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


ENVIRONMENT = Environment(
    loader=PackageLoader("mailer.web", "templates"),
    autoescape=select_autoescape(default=True),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
ENVIRONMENT.filters["ago"] = _ago
ENVIRONMENT.filters["utc"] = _local
ENVIRONMENT.globals["when_ms"] = from_ms


def page(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    """Render a dashboard template with the request's access (CSRF token, open mode)."""
    body = ENVIRONMENT.get_template(template).render(
        request_path=request.url.path,
        access=getattr(request.state, "access", None),
        request_id=getattr(request.state, "request_id", ""),
        **context,
    )
    return HTMLResponse(body, status_code=status, headers=PAGE_HEADERS)


def problem_page(request: Request, problem: Problem) -> HTMLResponse:
    """An error of a dashboard page as a page, not as JSON."""
    return page(request, "problem.html", status=problem.status, problem=problem)


@router.get("/static/{name}")
async def static(name: str) -> Response:
    if name not in _STATIC:
        raise Problem(404, "Not Found", f"no static file {name}")
    body = resources.files("mailer.web").joinpath("static", name).read_bytes()
    headers = {"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"}
    return Response(body, media_type=_STATIC[name], headers=headers)
