"""The ASGI app behind `mailer serve`: one Redis connection pool and one producer client for all
requests, a request id on every answer and log line, and errors as problem details."""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import Message, Receive, Scope, Send

from mailer.intake.client import MailerClient
from mailer.settings import Settings
from mailer.state.connection import RedisTarget
from mailer.state.queue import connect_client
from mailer.web import (
    dashboard,
    deliveries,
    health,
    intake,
    login,
    mailview,
    metrics,
    pages,
    problems,
    repair,
)
from mailer.web.metrics import INTAKE_REQUESTS

logger = logging.getLogger("mailer.web")

# A request id a caller sends is kept if it looks like one (so it can be followed across
# systems), else replaced: it goes into log lines, which must not be injectable.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def create_app(settings: Settings, where: RedisTarget | str, *, open_dashboard: bool = False) -> RequestIds:
    """The service on the Redis `where` names (a URL, or Sentinels: the pools follow a failover
    by themselves). `open_dashboard`: no login (only for a service bound to loopback without a
    token; `mailer serve` decides)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.open_dashboard = open_dashboard and not settings.api_tokens
        # Signs the open dashboard's CSRF tokens: per process, as the open mode is one process.
        app.state.open_key = secrets.token_bytes(32)
        app.state.redis_target = RedisTarget.of(where)
        app.state.redis = await connect_client(where)
        app.state.client = MailerClient(where, log_max_entries=settings.log_max_entries, name="http")
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
    app.include_router(repair.router)
    app.include_router(metrics.router)
    login.install(app)
    app.include_router(pages.router)
    app.include_router(login.router)
    app.include_router(dashboard.router)
    app.include_router(mailview.router)

    # Outermost, as plain ASGI: Starlette's BaseHTTPMiddleware (what @app.middleware builds)
    # wraps every response in a stream and task group, and cost half of a single event's time
    # in py-spy (bench intake phase).
    return RequestIds(app)


class RequestIds:
    """A request id on every answer (X-Request-ID, the caller's when it looks like one) and
    one log line per request: id, method, path, status, time; never a header or a body."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = request_id
        began = time.perf_counter()
        status = 500

        async def tagged(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        intake_post = scope["path"] == "/v1/events" and scope["method"] == "POST"
        try:
            if intake_post:
                await intake.serve_events(self.app, scope, receive, tagged)
            else:
                await self.app(scope, receive, tagged)
        finally:
            if intake_post:
                INTAKE_REQUESTS.labels(str(status)).inc()
            logger.info(
                "%s %s %s %d %.1f ms",
                request_id,
                scope["method"],
                scope["path"],
                status,
                (time.perf_counter() - began) * 1000,
            )
