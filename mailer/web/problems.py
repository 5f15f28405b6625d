"""RFC 9457 problem details: every error the HTTP service answers, in one shape and one place."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from mailer.errors import QueueUnavailable

logger = logging.getLogger("mailer.web")

PROBLEM_JSON = "application/problem+json"


class Problem(Exception):
    """An answer other than success: status, a short title, what went wrong, and any extra
    members (the invalid records of a batch, the events it still accepted)."""

    def __init__(self, status: int, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.extra = status, title, detail, extra
        self.headers: dict[str, str] = {}


def problem_response(request: Request, problem: Problem) -> Response:
    # A dashboard page sets an HTML renderer: its errors are pages for people, not JSON.
    as_page = getattr(request.state, "problem_page", None)
    if as_page is not None:
        page: Response = as_page(request, problem)
        return page
    body = {
        "type": "about:blank",
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
        "instance": request.url.path,
        "request_id": getattr(request.state, "request_id", None),
        **problem.extra,
    }
    return JSONResponse(body, status_code=problem.status, media_type=PROBLEM_JSON, headers=problem.headers)


def install(app: FastAPI) -> None:
    """Map every error to a problem: ours, Starlette's (404, 405), FastAPI's validation, Redis
    gone, and anything unforeseen (500, logged with the request id, no stack to the client)."""

    async def on_problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Problem)
        return problem_response(request, exc)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return problem_response(request, Problem(exc.status_code, _title(exc.status_code), str(exc.detail)))

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {"field": ".".join(str(p) for p in e.get("loc", ())), "reason": e.get("msg", "")}
            for e in exc.errors()
        ]
        return problem_response(
            request, Problem(422, "Invalid request", "the request's parameters", errors=errors)
        )

    async def on_redis(request: Request, exc: Exception) -> Response:
        logger.warning("request %s: %s", getattr(request.state, "request_id", "?"), exc)
        return problem_response(request, Problem(503, "Queue unavailable", str(exc)))

    async def on_anything(request: Request, exc: Exception) -> Response:
        logger.exception("request %s failed", getattr(request.state, "request_id", "?"))
        return problem_response(
            request, Problem(500, "Internal error", "the service failed; the log names this request id")
        )

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(QueueUnavailable, on_redis)
    app.add_exception_handler(Exception, on_anything)


def _title(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
