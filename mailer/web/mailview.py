"""Mails as attendees see them, in the dashboard: the outbox of the embedded defaults (as
Mailpit shows a staging server's) and the template previews of every kind × locale, each with
its HTML, text, headers and calendar file."""

from __future__ import annotations

import heapq
import os
import re
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response

from mailer.constants import LOCALES, MESSAGE_KINDS
from mailer.lifecycle.kinds import kind_named
from mailer.ops.preview import preview, sample_event, sample_previous
from mailer.web.dashboard import dashboard_access
from mailer.web.pages import MAIL_HEADERS, page
from mailer.web.problems import Problem

router = APIRouter(include_in_schema=False, dependencies=[Depends(dashboard_access)])

OUTBOX_LISTED = 100  # the newest mails the outbox page lists
_MAILDIR_NAME = re.compile(r"^[A-Za-z0-9._:,=+-]{1,255}$")


@dataclass(slots=True)
class MailParts:
    """One mail taken apart for display: every header, and its text, HTML and calendar parts."""

    headers: list[tuple[str, str]] = field(default_factory=list)
    text: str = ""
    html: str = ""
    calendar: str = ""
    attachments: list[str] = field(default_factory=list)  # the file names the mail carries

    def header(self, name: str) -> str:
        return next((v for k, v in self.headers if k.lower() == name.lower()), "")


def parts_of(data: bytes) -> MailParts:
    """The mail's headers and parts, decoded as a mail client would."""
    mail = BytesParser(policy=policy.default).parsebytes(data)
    assert isinstance(mail, EmailMessage)
    parts = MailParts(headers=[(k, str(v)) for k, v in mail.items()])
    for part in mail.walk():
        if part.is_multipart():
            continue
        kind = part.get_content_type()
        name = part.get_filename()
        if name:
            parts.attachments.append(name)
        try:
            content = part.get_content()
        except (LookupError, ValueError):  # an unknown charset: shown as bytes decoded leniently
            raw = part.get_payload(decode=True)
            content = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else ""
        if isinstance(content, bytes):
            content = content.decode("utf-8", errors="replace")
        if kind == "text/plain" and not name and not parts.text:
            parts.text = content
        elif kind == "text/html" and not parts.html:
            parts.html = content
        elif kind == "text/calendar" and not parts.calendar:
            parts.calendar = content
    return parts


# --- the outbox ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutboxMail:
    name: str
    mtime: float
    to: str
    subject: str


def _outbox(request: Request) -> Path | None:
    """The Maildir the workers write to, or None when this instance sends through a relay."""
    settings = request.app.state.settings
    return None if settings.smtp_host else settings.effective_outbox_dir


def _newest(outbox: Path, limit: int) -> list[tuple[float, Path]]:
    found: list[tuple[float, Path]] = []
    for sub in ("new", "cur"):
        try:
            with os.scandir(outbox / sub) as listing:
                for item in listing:
                    if item.is_file():
                        found.append((item.stat().st_mtime, Path(item.path)))
        except FileNotFoundError:
            continue
    return heapq.nlargest(limit, found)


def _summary(path: Path, mtime: float) -> OutboxMail:
    with path.open("rb") as source:
        head = BytesParser(policy=policy.default).parsebytes(source.read(16_384), headersonly=True)
    return OutboxMail(path.name, mtime, str(head.get("To", "")), str(head.get("Subject", "")))


def _mail_file(request: Request, name: str) -> Path:
    outbox = _outbox(request)
    if outbox is None:
        raise Problem(404, "No outbox", "this instance sends through a relay: no outbox to show")
    if not _MAILDIR_NAME.match(name) or name.startswith("."):
        raise Problem(404, "Not found", "no such mail in the outbox")
    for sub in ("new", "cur"):
        path = outbox / sub / name
        if path.is_file():
            return path
    raise Problem(404, "Not found", "no such mail in the outbox (moved or deleted since)")


@router.get("/outbox", response_class=HTMLResponse)
async def outbox_page(request: Request, to: str = "") -> HTMLResponse:
    """The newest mails in the outbox, optionally only those to one address."""
    outbox = _outbox(request)
    mails: list[OutboxMail] = []
    if outbox is not None:
        wanted = to.strip().lower()[:320]
        for mtime, path in _newest(outbox, OUTBOX_LISTED if not wanted else 10 * OUTBOX_LISTED):
            try:
                mail = _summary(path, mtime)
            except OSError:
                continue  # read by a mail client and moved meanwhile
            if not wanted or wanted in mail.to.lower():
                mails.append(mail)
        mails = mails[:OUTBOX_LISTED]
    relay = request.app.state.settings.smtp_host
    return page(request, "outbox.html", outbox=outbox, mails=mails, to=to, relay=relay)


@router.get("/outbox/{name}", response_class=HTMLResponse)
async def outbox_mail(request: Request, name: str) -> HTMLResponse:
    path = _mail_file(request, name)
    parts = parts_of(path.read_bytes())
    return page(
        request,
        "mail.html",
        parts=parts,
        html_src=f"/outbox/{name}/html",
        title=parts.header("Subject"),
        sample=False,
    )


@router.get("/outbox/{name}/html")
async def outbox_mail_html(request: Request, name: str) -> Response:
    """The mail's HTML alone, for the sandboxed frame (no script, nothing fetched)."""
    parts = parts_of(_mail_file(request, name).read_bytes())
    return HTMLResponse(parts.html or "<p>(this mail has no HTML part)</p>", headers=MAIL_HEADERS)


# --- the template previews -------------------------------------------------------------


def _previewed(request: Request, kind: str, locale: str) -> MailParts:
    if kind not in MESSAGE_KINDS or locale not in LOCALES:
        raise Problem(404, "Not found", f"no template {kind}/{locale}")
    event = sample_event()
    # Only a change notice is built against the event as it was; any other kind as sent.
    previous = sample_previous(event) if kind_named(kind).shows_changes else None
    built, _ = preview(request.app.state.settings, kind, event, locale, previous=previous)
    return parts_of(built.data)


@router.get("/previews", response_class=HTMLResponse)
async def previews_page(request: Request) -> HTMLResponse:
    return page(request, "previews.html", kinds=list(MESSAGE_KINDS), locales=list(LOCALES))


@router.get("/previews/{kind}/{locale}", response_class=HTMLResponse)
async def preview_page(request: Request, kind: str, locale: str) -> HTMLResponse:
    """One kind in one locale, built from the sample registration as the pipeline would."""
    parts = _previewed(request, kind, locale)
    return page(
        request,
        "mail.html",
        parts=parts,
        html_src=f"/previews/{kind}/{locale}/html",
        title=f"{kind} · {locale}",
        sample=True,
    )


@router.get("/previews/{kind}/{locale}/html")
async def preview_html(request: Request, kind: str, locale: str) -> Response:
    return HTMLResponse(_previewed(request, kind, locale).html, headers=MAIL_HEADERS)
