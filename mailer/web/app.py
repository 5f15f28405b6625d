"""The ASGI app behind `mailer serve`: one Redis connection pool and one producer client for all
requests, a request id on every answer and log line, and errors as problem details."""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from mailer.intake.client import MailerClient
from mailer.settings import Settings
from mailer.state.queue import connect_client
from mailer.web import deliveries, health, intake, problems

logger = logging.getLogger("mailer.web")

# A request id a caller sends is kept if it looks like one (so it can be followed across
# systems), else replaced: it goes into log lines, which must not be injectable.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def create_app(settings: Settings, redis_url: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.redis = await connect_client(redis_url)
        app.state.client = MailerClient(redis_url, log_max_entries=settings.log_max_entries, name="http")
        try:
            yield
        finally:
            await app.state.client.close()
            await app.state.redis.aclose()

    app = FastAPI(
        title="mailer",
        summary="The emails of an event-registration system: intake and delivery API.",
        lifespan=lifespan,
    )
    problems.install(app)
    app.include_router(health.router)
    app.include_router(intake.router)
    app.include_router(deliveries.router)

    @app.middleware("http")
    async def request_id(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        given = request.headers.get("x-request-id", "")
        request.state.request_id = given if _REQUEST_ID.match(given) else secrets.token_hex(8)
        began = time.perf_counter()
        response = await call_next(request)
        response.headers["X-Request-ID"] = request.state.request_id
        # Method, path and status only: never a header (the token) or a body (attendee data).
        logger.info(
            "%s %s %s %d %.1f ms",
            request.state.request_id,
            request.method,
            request.url.path,
            response.status_code,
            (time.perf_counter() - began) * 1000,
        )
        return response

    return app
