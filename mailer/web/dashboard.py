"""The dashboard's pages for ops staff: the overview, the log search, a registration's or
message's timeline, and the failed list with its re-drive buttons; server-rendered, read from
the same readers as the CLI and the API."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from mailer.clock import ms, utc_now
from mailer.constants import ID_PATTERN, INBOX_KEY, LOG_DEAD_KEY, LOG_KINDS, MESSAGE_KINDS, QUEUE_NAME
from mailer.ops.log_reading import timeline
from mailer.ops.redrive import latest_with_status, redrive
from mailer.state.circuit import CircuitState, relay_states
from mailer.state.deliverylog import (
    ALL_SCOPE,
    LOG_STATUSES,
    LogEntry,
    id_of,
    list_key,
    reference_index,
    registration_index,
)
from mailer.state.heartbeat import fresh_workers
from mailer.state.logquery import LogCounts, LogFilter, entries_at, log_counts, log_page
from mailer.state.logwindow import CHART_STATUSES, RecentCounts, recent_counts
from mailer.state.messages import MessageRef
from mailer.state.redis_types import RedisClient
from mailer.web.pages import page, problem_page
from mailer.web.problems import Problem
from mailer.web.session import Access, access, check_post, read_form

FAILED_PAGE = 200  # dead letters listed at once; re-drive all acts on every one the filter picks
SEARCH_PAGE = 50


def dashboard_access(request: Request) -> Access:
    """Every dashboard page: errors as pages, and a valid session (or the open mode)."""
    request.state.problem_page = problem_page
    request.state.access = access(request)
    return request.state.access  # type: ignore[no-any-return]


router = APIRouter(include_in_schema=False, dependencies=[Depends(dashboard_access)])


@dataclass(frozen=True, slots=True)
class Overview:
    """What the first page shows: is mail going out, and what is stuck."""

    now: datetime
    recent: RecentCounts
    totals: LogCounts
    oldest_due: tuple[str, datetime] | None
    relays: list[CircuitState]
    workers: list[str]
    queued_jobs: int
    inbox: int

    @property
    def chart_peak(self) -> int:
        return max([1, *(n for counts in self.recent.per_minute.values() for n in counts)])

    @property
    def all_time(self) -> dict[str, int]:
        """Entries per status since the log began (the counters, summed over kinds)."""
        totals: dict[str, int] = {}
        for (status, _), n in self.totals.counts.items():
            totals[status] = totals.get(status, 0) + n
        return totals

    @property
    def overdue(self) -> timedelta | None:
        if self.oldest_due is None or self.oldest_due[1] >= self.now:
            return None
        return self.now - self.oldest_due[1]


async def overview(redis: RedisClient) -> Overview:
    """The overview's figures, from counters, lists and sets: no entry is read."""
    now = utc_now()
    recent = await recent_counts(redis, now=now)
    totals = await log_counts(redis)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcard(QUEUE_NAME)
        pipe.llen(INBOX_KEY)
        queued, inbox = await pipe.execute()
    return Overview(
        now=now,
        recent=recent,
        totals=totals,
        oldest_due=totals.oldest_due,
        relays=await relay_states(redis),
        workers=await fresh_workers(redis, now_ms=ms(now)),
        queued_jobs=int(queued),
        inbox=int(inbox),
    )


@router.get("/", response_class=HTMLResponse)
async def overview_page(request: Request, part: str = "") -> HTMLResponse:
    """The overview; `?part=live` is its live panel alone, which the page's script re-reads."""
    seen = await overview(request.app.state.redis)
    template = "overview_live.html" if part == "live" else "overview.html"
    return page(request, template, o=seen, chart_statuses=CHART_STATUSES, statuses=LOG_STATUSES)


# --- search ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Search:
    """What the search box asked for, as the log's filter, and how the box was read."""

    flt: LogFilter
    understood: str  # "recipient", "message", "registration", "event", "reference", or "" for no box


async def _understand(redis: RedisClient, q: str) -> tuple[str, dict[str, str]]:
    """A search box's text as a filter: an address, a message id, a registration or an event
    id (whichever the log knows), else a registration system's reference (booking code)."""
    if "@" in q:
        return "recipient", {"recipient": q}
    if "/" in q:
        try:
            MessageRef.parse(q)
        except ValueError as exc:
            return await _reference(redis, q, str(exc))
        return "message", {"message": q}
    if not re.match(ID_PATTERN, q):
        return await _reference(redis, q, f"{q!r} is no address, message, registration or event id")
    if await redis.hexists(*registration_index(q)):
        return "registration", {"registration": q}
    if await redis.exists(list_key("e", q)):
        return "event", {"event": q}
    if await redis.hexists(*reference_index(q)):
        return "reference", {"reference": q}
    return "registration", {"registration": q}


async def _reference(redis: RedisClient, q: str, otherwise: str) -> tuple[str, dict[str, str]]:
    """A reference the log knows, or 422 saying what the text is not."""
    if len(q) <= 64 and await redis.hexists(*reference_index(q)):
        return "reference", {"reference": q}
    raise Problem(422, "Nothing to search for", f"{otherwise}, nor a reference the log knows")


def _moment(name: str, text: str) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        example = "2026-12-03 or 2026-12-03T18:00"
        raise Problem(422, "Invalid date", f"{name}: {text!r} is not a date ({example})") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@router.get("/log", response_class=HTMLResponse)
async def search_page(
    request: Request,
    q: str = "",
    status: str = "",
    kind: str = "",
    event: str = "",
    since: str = "",
    until: str = "",
    cursor: str = "",
) -> HTMLResponse:
    """Search the log by address, registration, message or event, with the log's filters."""
    q, event = q.strip()[:320], event.strip()[:128]
    if status and status not in LOG_STATUSES:
        raise Problem(422, "Unknown status", f"status must be one of {', '.join(LOG_STATUSES)}")
    if kind and kind not in LOG_KINDS:
        raise Problem(422, "Unknown kind", f"kind must be one of {', '.join(LOG_KINDS)}")
    if cursor and not re.fullmatch(r"\d{1,16}-\d{1,4}", cursor):
        raise Problem(422, "Invalid cursor", "the cursor is an entry id from a previous page")
    understood, by = await _understand(request.app.state.redis, q) if q else ("", {})
    if event and by.get("event", event) != event:
        by["event"] = event
    flt = LogFilter(
        status=status or None,
        kind=kind or None,
        event=by.pop("event", event or None),
        since=_moment("since", since),
        until=_moment("until", until),
        **by,
    )
    found = await log_page(request.app.state.redis, flt, cursor=cursor or None, limit=SEARCH_PAGE)
    asked = {"q": q, "status": status, "kind": kind, "event": event, "since": since, "until": until}
    more = urlencode({k: v for k, v in asked.items() if v} | {"cursor": found.cursor}) if found.cursor else ""
    return page(
        request,
        "search.html",
        asked=asked,
        understood=understood,
        entries=found.entries,
        more=more,
        statuses=LOG_STATUSES,
        kinds=list(LOG_KINDS),
    )


# --- timeline ----------------------------------------------------------------------------


@router.get("/timeline/{ident:path}", response_class=HTMLResponse)
async def timeline_page(request: Request, ident: str) -> HTMLResponse:
    """A registration's timeline (or one message's): every message, every attempt, and each
    message's state now, with a re-drive button where one applies."""
    if "/" in ident:
        try:
            MessageRef.parse(ident)
        except ValueError as exc:
            raise Problem(422, "Not a message id", str(exc)) from None
    elif not re.match(ID_PATTERN, ident):
        raise Problem(422, "Not a registration id", f"a registration id matches {ID_PATTERN}")
    story = await timeline(request.app.state.redis, ident)
    if not story.messages and not story.other:
        raise Problem(404, "Not found", f"mailer knows nothing of {ident}")
    return page(request, "timeline.html", story=story, ident=ident)


# --- failed messages and re-drives -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeadLetter:
    message_id: str
    entry: LogEntry | None  # its failed entry (None: trimmed from the log since)


async def _dead_letters(redis: RedisClient, ids: list[str], event: str) -> list[DeadLetter]:
    shown = ids[:FAILED_PAGE]
    scope = "e:" + event if event else ALL_SCOPE
    positions = await redis.hmget(LOG_DEAD_KEY.format(scope=scope), shown) if shown else []
    wanted = [id_of(int(p)) for p in positions if p is not None]
    by_message = {e.message_id: e for e in await entries_at(redis, wanted)}
    return [DeadLetter(m, by_message.get(m)) for m in shown]


def _filter_of(kind: str, event: str) -> dict[str, str]:
    if kind and kind not in MESSAGE_KINDS:
        raise Problem(422, "Unknown kind", f"kind must be one of {', '.join(MESSAGE_KINDS)}")
    if event and not re.match(ID_PATTERN, event):
        raise Problem(422, "Not an event id", f"an event id matches {ID_PATTERN}")
    return {"kind": kind, "event": event}


@router.get("/failed", response_class=HTMLResponse)
async def failed_page(request: Request, kind: str = "", event: str = "", done: str = "") -> HTMLResponse:
    """The dead letters, newest first, each with its reason, and re-drive buttons."""
    chosen = _filter_of(kind, event.strip())
    redis = request.app.state.redis
    ids = await latest_with_status(redis, "failed", kind=kind or None, event_id=chosen["event"] or None)
    letters = await _dead_letters(redis, ids, chosen["event"])
    return page(
        request,
        "failed.html",
        letters=letters,
        total=len(ids),
        chosen=chosen,
        kinds=list(MESSAGE_KINDS),
        done=done[:200],
    )


@router.post("/failed/retry", response_model=None)
async def retry_from_dashboard(request: Request) -> Response:
    """Re-drive one message (`message`), or every dead letter the filter picks (`all`): the
    latter first answers with a page asking to confirm, showing how many it will send."""
    allowed: Access = request.state.access
    form = await read_form(request)
    check_post(request, form, allowed)
    redis = request.app.state.redis
    settings = request.app.state.settings
    who = f"dashboard, request {request.state.request_id}"
    if form.get("message"):
        try:
            refs = [MessageRef.parse(form["message"])]
        except ValueError as exc:
            raise Problem(422, "Not a message id", str(exc)) from None
        back = form.get("back", "/failed")
    else:
        chosen = _filter_of(form.get("kind", ""), form.get("event", "").strip())
        ids = await latest_with_status(
            redis, "failed", kind=chosen["kind"] or None, event_id=chosen["event"] or None
        )
        if form.get("confirm") != "yes":
            return page(request, "confirm.html", count=len(ids), chosen=chosen)
        refs = [MessageRef.parse(m) for m in ids]
        back = "/failed?" + urlencode({k: v for k, v in chosen.items() if v})
    done = await redrive(redis, refs, who=who, log_max_entries=settings.log_max_entries)
    said = f"re-driven: {len(done.planned)}"
    if done.refused:
        left = list(done.refused.items())[:5]
        said += "; left alone: " + ", ".join(f"{m} ({s or 'unknown'})" for m, s in left)
    if not back.startswith("/") or back.startswith("//"):
        back = "/failed"  # only back to a page of this dashboard
    joiner = "&" if "?" in back else "?"
    return RedirectResponse(f"{back}{joiner}{urlencode({'done': said})}", status_code=303)
