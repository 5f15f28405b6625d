"""`POST /v1/events`: one event (a JSON object) or a batch (a JSON array, or NDJSON), validated
as the Python client validates them, the valid ones queued, each refusal named and logged."""

from __future__ import annotations

import hashlib
import inspect
import re
from typing import Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from mailer.errors import FieldProblem, InvalidEvent
from mailer.events import parse_event
from mailer.intake.client import MailerClient
from mailer.state import idempotency
from mailer.web.auth import require_token
from mailer.web.problems import PROBLEM_JSON, Problem, problem_response

# A batch's records at most: a larger import goes in several requests.
MAX_RECORDS = 1000
NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/ndjson")

_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")

router = APIRouter()


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (not read whole)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Problem(413, "Body too large", f"at most {limit} bytes per request")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem(413, "Body too large", f"at most {limit} bytes per request")
        chunks.append(chunk)
    return b"".join(chunks)


def _records(body: bytes, content_type: str) -> tuple[list[Any], bool]:
    """The records of a body, and whether it was a batch; a JSON line that does not parse
    stays bytes, so it is refused with the line's number like any other invalid record."""
    if content_type in NDJSON_TYPES:
        lines = [line for line in body.split(b"\n") if line.strip()]
        return [_decoded(line) for line in lines], True
    if content_type not in ("application/json", ""):
        raise Problem(415, "Unsupported media type", "send application/json or application/x-ndjson")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Problem(400, "Malformed JSON", f"the body is not JSON: {exc}") from None
    if isinstance(data, list):
        return data, True
    return [data], False


def _decoded(line: bytes) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return line


async def serve_events(app: FastAPI, scope: Scope, receive: Receive, send: Send) -> None:
    """`POST /v1/events` straight from the outermost ASGI layer, past FastAPI's router, its
    dependency solving and its middleware stack: for a single event those took about as long
    as the endpoint's own work (py-spy, bench intake phase; bench/results/intake-singles-*).
    The same token check, endpoint and error mapping as the route below, which stays for the
    OpenAPI description (and answers if this is not wired in)."""
    scope["app"] = app
    request = Request(scope, receive)
    try:
        await require_token(request)
        response = await post_events(request)
    except Exception as exc:
        response = await _mapped(app, request, exc)
    await response(scope, receive, send)


async def _mapped(app: FastAPI, request: Request, exc: Exception) -> Response:
    """The answer the app's exception handlers (mailer.web.problems) give for `exc`."""
    for kind in type(exc).__mro__:
        handler = app.exception_handlers.get(kind)
        if handler is not None:
            answer = handler(request, exc)
            return await answer if inspect.isawaitable(answer) else answer
    raise exc


@router.post("/v1/events", status_code=202, dependencies=[Depends(require_token)])
async def post_events(request: Request) -> Response:
    """Queue events. 202 with the accepted ids; 422 with each invalid record's line, field and
    reason (the valid ones of a batch are still queued and listed); 413 over the size limits.
    With an `Idempotency-Key` header, the first answer to that key is replayed for 24 hours."""
    body = await _body(request, request.app.state.settings.api_max_body_bytes)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    key = request.headers.get("idempotency-key")
    if key is None:
        return await _answer(request, body, content_type)
    if not _IDEMPOTENCY_KEY.match(key):
        raise Problem(400, "Bad Idempotency-Key", "1 to 255 printable ASCII characters")
    redis = request.app.state.redis
    digest = hashlib.sha256(content_type.encode() + b"\n" + body).hexdigest()
    earlier = await idempotency.claim(redis, key, digest)
    if earlier is not None:
        if earlier.digest != digest:
            raise Problem(422, "Idempotency-Key reused", "this key came with a different body before")
        if earlier.status is None:
            raise Problem(409, "Request in progress", "a request with this Idempotency-Key is still running")
        media = PROBLEM_JSON if earlier.status >= 400 else "application/json"
        replay = Response(earlier.body, status_code=earlier.status, media_type=media)
        replay.headers["Idempotent-Replayed"] = "true"
        return replay
    try:
        answer = await _answer(request, body, content_type)
    except BaseException:
        await idempotency.release(redis, key)
        raise
    if answer.status_code >= 500:
        await idempotency.release(redis, key)
    else:
        await idempotency.finish(redis, key, digest, answer.status_code, bytes(answer.body))
    return answer


async def _answer(request: Request, body: bytes, content_type: str) -> Response:
    """The answer to a body: 202, or the problem that says why not (as a response, so an
    Idempotency-Key can keep it)."""
    try:
        return await _accept(request, body, content_type)
    except Problem as refused:
        return problem_response(request, refused)


async def _accept(request: Request, body: bytes, content_type: str) -> JSONResponse:
    client: MailerClient = request.app.state.client
    records, batch = _records(body, content_type)
    if len(records) > MAX_RECORDS:
        raise Problem(
            413, "Too many records", f"at most {MAX_RECORDS} records per request, got {len(records)}"
        )
    valid: list[dict[str, Any]] = []
    refused: list[tuple[int, InvalidEvent]] = []
    for line, record in enumerate(records, start=1):
        try:
            if not isinstance(record, dict):
                kind = "a line that is not JSON" if isinstance(record, bytes) else type(record).__name__
                raise InvalidEvent([FieldProblem("(record)", f"must be a JSON object, not {kind}")])
            parse_event(record)
            valid.append(record)
        except InvalidEvent as exc:
            refused.append((line, exc))
    if batch:
        await client.enqueue_valid(valid)
    elif valid:
        await client.push_valid(valid[0])
    await client.log_refusals((f"POST /v1/events line {line}", exc) for line, exc in refused)
    accepted = [str(r.get("id")) for r in valid]
    if not refused:
        return JSONResponse({"accepted": accepted}, status_code=202)
    errors = [
        {"line": line, "event_id": exc.event_id, "field": p.field, "reason": p.reason}
        for line, exc in refused
        for p in exc.problems
    ]
    raise Problem(
        422,
        "Invalid events",
        f"{len(refused)} of {len(records)} record(s) refused; the others were accepted",
        accepted=accepted,
        errors=errors,
    )
