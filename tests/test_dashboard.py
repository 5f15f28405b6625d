"""The dashboard of `mailer serve`, against a real uvicorn, the tests' real Redis, a real worker
process and a real headless Chromium (Debian's, driven by Playwright): log in, search a
recipient, open a timeline, re-drive a failed message, read the outbox; and the guards around
it (tokens, CSRF, cross-site posts, DNS rebinding), with hostile queries that must never fail.
Screenshots land in test-artifacts/dashboard/."""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.clock import utc_now
from mailer.intake.client import MailerClient
from mailer.state.deliverylog import DeliveryLog, LogEntry
from mailer.state.logwindow import recent_counts
from tests.conftest import CHROMIUM_FLAGS, RedisServer, SmtpServer, log_until, make_event, wait_for
from tests.test_http import Service, redis_at, start_service, stop_service

TOKEN = "dash-token-5b7e1"  # noqa: S105 (a test token)
OTHER_TOKEN = "dash-token-other-93c2"  # noqa: S105
CHROMIUM = shutil.which("chromium")
ARTIFACTS = Path(__file__).parent.parent / "test-artifacts" / "dashboard"
PAGES = ["/", "/?part=live", "/log", "/failed", "/outbox", "/previews", "/previews/confirmation/de"]
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make system-deps)")


@pytest.fixture(scope="module")
def guarded(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A service with two tokens: the dashboard wants a login."""
    running = start_service(
        redis_server.url, tmp_path_factory.mktemp("dash"), MAILER_API_TOKEN=f"{TOKEN},{OTHER_TOKEN}"
    )
    yield running
    stop_service(running)
    assert "Traceback" not in running.log.read_text()


def logged_in(service: Service, token: str = TOKEN) -> httpx.Client:
    """An HTTP client with a dashboard session, got through the login form as a browser would."""
    client = httpx.Client(base_url=service.url, follow_redirects=False)
    form = client.get("/login")
    nonce = re.search(r'name="login_csrf" value="([^"]+)"', form.text)
    assert nonce, form.text
    answer = client.post("/login", data={"login_csrf": nonce.group(1), "token": token, "next": "/"})
    assert answer.status_code == 303, answer.text
    return client


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf-token" content="([^"]+)"', html)
    assert found, html
    return found.group(1)


# --- login, sessions, CSRF ---------------------------------------------------------------


def test_every_page_wants_a_login_and_the_login_sets_a_strict_httponly_cookie(guarded: Service) -> None:
    with httpx.Client(base_url=guarded.url) as anonymous:
        for path in PAGES:
            answer = anonymous.get(path)
            if path.startswith("/?part"):
                assert answer.status_code == 401  # the live panel's script reloads to the login
            else:
                assert answer.status_code == 303, path
                assert answer.headers["location"].startswith("/login?next=")
    client = httpx.Client(base_url=guarded.url)
    form = client.get("/login")
    assert "mailer_login" in form.headers["set-cookie"]
    nonce = re.search(r'name="login_csrf" value="([^"]+)"', form.text)
    assert nonce
    answer = client.post("/login", data={"login_csrf": nonce.group(1), "token": TOKEN, "next": "/failed"})
    assert answer.status_code == 303
    assert answer.headers["location"] == "/failed"
    cookie = next(c for c in answer.headers.get_list("set-cookie") if c.startswith("mailer_session="))
    assert "HttpOnly" in cookie
    assert "Max-Age=43200" in cookie  # 12 hours
    assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
    assert TOKEN not in cookie  # the cookie holds a signature, never the token
    for path in PAGES:
        page = client.get(path)
        assert page.status_code == 200, (path, page.text)
        assert "default-src 'none'" in page.headers["content-security-policy"]
    assert TOKEN not in guarded.log.read_text()


def test_a_wrong_or_missing_token_gets_no_session(guarded: Service) -> None:
    client = httpx.Client(base_url=guarded.url)
    form = client.get("/login").text
    for token in ("wrong-token", "", TOKEN + "x", TOKEN[:-1]):
        nonce = re.search(r'name="login_csrf" value="([^"]+)"', form)
        assert nonce
        answer = client.post("/login", data={"login_csrf": nonce.group(1), "token": token})
        assert answer.status_code == 401, token
        assert "not accepted" in answer.text
        assert "mailer_session" not in answer.headers.get("set-cookie", "")
        form = answer.text  # each refusal is a fresh form with a fresh nonce
    # A forged cookie is no session either.
    client.cookies.set("mailer_session", "9999999999.abc.0123456789abcdef")
    assert client.get("/", follow_redirects=False).status_code == 303


def test_the_login_form_itself_is_csrf_protected(guarded: Service) -> None:
    """A page elsewhere cannot log a browser in: no nonce cookie, or a cross-site post, is refused."""
    with httpx.Client(base_url=guarded.url) as client:
        assert client.post("/login", data={"login_csrf": "x", "token": TOKEN}).status_code == 403
        nonce = re.search(r'name="login_csrf" value="([^"]+)"', client.get("/login").text)
        assert nonce
        cross = client.post(
            "/login",
            data={"login_csrf": nonce.group(1), "token": TOKEN},
            headers={"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
        )
        assert cross.status_code == 403


def test_posts_without_the_session_csrf_token_or_from_another_site_are_refused(guarded: Service) -> None:
    client = logged_in(guarded)
    token = csrf_of(client.get("/failed").text)
    redo = {"message": "reg-none/confirmation", "back": "/failed"}
    assert client.post("/failed/retry", data=redo).status_code == 403  # no token
    assert client.post("/failed/retry", data=redo | {"csrf": "0" * 64}).status_code == 403  # wrong
    assert (
        client.post(
            "/failed/retry", data=redo | {"csrf": token}, headers={"Origin": "https://evil.example"}
        ).status_code
        == 403
    )
    assert (
        client.post(
            "/failed/retry", data=redo | {"csrf": token}, headers={"Sec-Fetch-Site": "cross-site"}
        ).status_code
        == 403
    )
    # Another session's token is not this session's.
    other = logged_in(guarded)
    assert other.post("/failed/retry", data=redo | {"csrf": token}).status_code == 403
    done = client.post("/failed/retry", data=redo | {"csrf": token})
    assert done.status_code == 303
    assert "left+alone" in done.headers["location"]  # mailer has no such message: nothing sent
    # Logging out needs the token too; afterwards the cookie is gone.
    assert client.post("/logout", data={}).status_code == 403
    assert client.post("/logout", data={"csrf": token}).status_code == 303
    assert client.get("/").status_code == 303


def test_a_session_ends_when_its_token_is_removed_and_holds_across_processes(
    guarded: Service, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Rotating tokens: a service without the old token refuses its sessions; one that still has
    it accepts a cookie another process issued (several serve processes behind a balancer)."""
    client = logged_in(guarded, OTHER_TOKEN)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    rotated = start_service(redis_server.url, tmp_path / "a", MAILER_API_TOKEN=TOKEN)
    same = start_service(redis_server.url, tmp_path / "b", MAILER_API_TOKEN=OTHER_TOKEN)
    try:
        cookies = {"mailer_session": client.cookies["mailer_session"]}
        assert httpx.get(rotated.url + "/", cookies=cookies).status_code == 303
        assert httpx.get(same.url + "/", cookies=cookies).status_code == 200
    finally:
        stop_service(rotated)
        stop_service(same)


def test_no_open_redirect_after_the_login(guarded: Service) -> None:
    with httpx.Client(base_url=guarded.url) as client:
        for target in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
            form = client.get("/login", params={"next": target})
            assert 'name="next" value="/"' in form.text, target


def test_without_a_token_the_dashboard_is_off_unless_bound_to_loopback(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Loopback and no token: no login, but only under the loopback names (a page that points
    a name of its own at 127.0.0.1 gets nothing) and POSTs still carry a CSRF token."""
    service = start_service(redis_server.url, tmp_path)
    try:
        with httpx.Client(base_url=service.url) as client:
            page = client.get("/")
            assert page.status_code == 200
            assert "Log out" not in page.text
            rebound = client.get("/", headers={"Host": f"attacker.example:{service.url.rsplit(':', 1)[1]}"})
            assert rebound.status_code == 403
            assert "only on 127.0.0.1" in rebound.text
            assert client.post("/failed/retry", data={"message": "r/confirmation"}).status_code == 403
            token = csrf_of(client.get("/failed").text)
            assert (
                client.post("/failed/retry", data={"message": "r/confirmation", "csrf": token}).status_code
                == 303
            )
            assert client.get("/login").status_code == 303  # nothing to log in to
    finally:
        stop_service(service)


# --- what the pages show ----------------------------------------------------------------


async def test_the_overview_counts_the_last_hour_day_and_minutes_from_the_lists(redis_url: str) -> None:
    """Entries written an hour, a day and a minute apart land in the right window and bar."""
    now = utc_now()
    async with redis_at(redis_url) as redis:
        for age, status, n in (
            (timedelta(days=2), "sent", 3),
            (timedelta(hours=5), "sent", 4),
            (timedelta(minutes=30), "sent", 2),
            (timedelta(minutes=30), "failed", 1),
            (timedelta(seconds=5), "sent", 1),
        ):
            moment = now - age
            log = DeliveryLog(redis, max_entries=10_000, echo=None, clock=lambda m=moment: m)
            await log.write(
                [
                    LogEntry(ts=moment.isoformat(), status=status, message_id=f"r{i}/confirmation")  # type: ignore[arg-type]
                    for i in range(n)
                ]
            )
        seen = await recent_counts(redis, now=now)
    assert seen.last_hour["sent"] == 3
    assert seen.last_hour["failed"] == 1
    assert seen.last_day["sent"] == 7
    assert seen.per_minute["sent"][-1] == 1
    assert seen.per_minute["sent"][-31] == 2  # 30 minutes before the running minute
    assert seen.per_minute["failed"][-31] == 1
    assert sum(seen.per_minute["sent"]) == 3


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    path=st.sampled_from(["/log", "/failed", "/outbox", "/", "/timeline/", "/outbox/", "/previews/"]),
    value=st.text(max_size=80),
    name=st.sampled_from(["q", "status", "kind", "event", "since", "until", "cursor", "to", "part", "done"]),
)
def test_hostile_queries_never_fail_the_dashboard(guarded: Service, path: str, value: str, name: str) -> None:
    """Arbitrary text in every query field and path: a page or a clear 4xx, never a 5xx."""
    client = _session_for(guarded)
    if path.endswith("/") and path != "/":
        answer = client.get(path + quote(value, safe=""))
    else:
        answer = client.get(path, params={name: value})
    assert answer.status_code < 500, (path, name, value, answer.text[:300])


async def test_the_search_box_finds_a_registration_by_its_reference(guarded: Service, redis_url: str) -> None:
    """Ops staff are given a booking code: the box reads it as a reference (spaces and slashes
    included), lists its entries, and says what else it is not when the log does not know it."""
    at = utc_now().isoformat()
    entries = [
        LogEntry(ts=at, status="sent", message_id=f"reg-{i}/confirmation", reference=f"B 2026/{i}")
        for i in range(3)
    ]
    async with redis_at(redis_url) as redis:
        await DeliveryLog(redis, max_entries=1000, echo=None).write(entries)
    client = _session_for(guarded)
    found = client.get("/log", params={"q": "B 2026/1"})
    assert found.status_code == 200, found.text
    assert "read as reference" in found.text
    assert "reg-1/confirmation" in found.text
    assert "reg-0/confirmation" not in found.text
    unknown = client.get("/log", params={"q": "B 2026/9"})
    assert unknown.status_code == 422
    assert "nor a reference the log knows" in unknown.text


_SESSIONS: dict[str, httpx.Client] = {}


def _session_for(service: Service) -> httpx.Client:
    if service.url not in _SESSIONS:
        _SESSIONS[service.url] = logged_in(service)
    return _SESSIONS[service.url]


def test_every_template_preview_renders(guarded: Service) -> None:
    from mailer.content.render import all_kinds_and_locales
    from mailer.lifecycle.kinds import kind_named

    client = _session_for(guarded)
    for kind, locale in all_kinds_and_locales():
        page = client.get(f"/previews/{kind}/{locale}")
        assert page.status_code == 200, (kind, locale, page.text[:300])
        # The calendar file shown exactly where the kind carries one (a reminder does not).
        assert ("BEGIN:VCALENDAR" in page.text) == (kind_named(kind).calendar is not None), (kind, locale)
        frame = client.get(f"/previews/{kind}/{locale}/html")
        assert frame.status_code == 200
        assert frame.headers["content-security-policy"].startswith("sandbox")
        assert "<html" in frame.text.lower()


# --- in a real browser ------------------------------------------------------------------


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as driver:
        launched = await driver.chromium.launch(
            executable_path=CHROMIUM,
            args=list(CHROMIUM_FLAGS),
        )
        try:
            yield launched
        finally:
            await launched.close()


async def _shots(page: Any, name: str) -> None:
    """A desktop and a phone screenshot of the page, and no sideways scrolling on the phone."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.set_viewport_size({"width": 1280, "height": 900})
    await page.screenshot(path=str(ARTIFACTS / f"{name}-desktop.png"), full_page=True)
    await page.set_viewport_size({"width": 360, "height": 780})
    await page.screenshot(path=str(ARTIFACTS / f"{name}-phone.png"), full_page=True)
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= 360, f"{name}: {width} px wide on a 360 px phone"
    await page.set_viewport_size({"width": 1280, "height": 900})


@needs_chromium
async def test_ops_staff_log_in_find_a_failed_mail_and_redrive_it(
    redis_url: str, smtp_server: SmtpServer, worker_process: Any, tmp_path: Path, browser: Any
) -> None:
    """The 2 a.m. path: Ms X says she got no mail. Log in, search her address, open the
    timeline, see why (the relay said 550), re-drive once the relay is fixed, see it sent."""
    gone = "ms.x@example.org"
    smtp_server.handler.fault = lambda to, n: "550 5.1.1 mailbox unavailable" if to == gone else None
    worker_process(redis_url, smtp_server)
    service = start_service(redis_url, tmp_path, MAILER_API_TOKEN=TOKEN)
    try:
        async with MailerClient(redis_url) as client:
            await client.publish(make_event(event_id="e-ok", registration_id="reg-ok"))
            await client.publish(
                make_event(event_id="e-x", registration_id="reg-x", email=gone, name="Erika X")
            )
        await log_until(redis_url, lambda es: any(e.status == "failed" for e in es), 30)
        page = await browser.new_page()
        await page.goto(service.url + "/")
        assert "/login" in page.url
        await page.fill("input[name=token]", "not-the-token")
        await page.click("button[type=submit]")
        await page.wait_for_selector("text=This token is not accepted.")
        await page.fill("input[name=token]", TOKEN)
        await page.click("form.login button[type=submit]")
        await page.wait_for_selector("#dead .big")
        assert (await page.inner_text("#dead .big")).strip() == "1"
        assert "1" in await page.inner_text("#workers .big")
        await _shots(page, "overview")
        await page.fill("header input[name=q]", gone)
        await page.press("header input[name=q]", "Enter")
        await page.wait_for_selector("#results")
        assert "550" in await page.inner_text("#results")
        await _shots(page, "search")
        await page.click("#results a[href^='/timeline/']")
        await page.wait_for_selector("article.message")
        story = await page.inner_text("main")
        assert "failed" in story
        assert "550 5.1.1 mailbox unavailable" in story
        await _shots(page, "timeline")
        smtp_server.handler.fault = None  # the relay is fixed
        await page.click("button.redrive")
        await page.wait_for_url(re.compile(r"done=re-driven"))
        await wait_for(lambda: bool(smtp_server.handler.to(gone)), 30)
        assert len(smtp_server.handler.to(gone)) == 1
        await page.goto(service.url + "/failed")
        assert "No dead letters" in await page.inner_text("main")
    finally:
        stop_service(service)
    assert "Traceback" not in service.log.read_text()


@needs_chromium
async def test_redrive_all_asks_first_and_then_sends_each_once(
    redis_url: str, smtp_server: SmtpServer, worker_process: Any, tmp_path: Path, browser: Any
) -> None:
    smtp_server.handler.fault = lambda to, n: "550 5.7.1 refused" if to.startswith("bulk") else None
    worker_process(redis_url, smtp_server)
    service = start_service(redis_url, tmp_path)  # loopback, no token: the open mode
    try:
        async with MailerClient(redis_url) as client:
            for i in range(3):
                await client.publish(
                    make_event(event_id=f"e-b{i}", registration_id=f"reg-b{i}", email=f"bulk{i}@example.org")
                )
        await log_until(redis_url, lambda es: sum(e.status == "failed" for e in es) == 3, 30)
        page = await browser.new_page()
        await page.goto(service.url + "/failed")
        assert "3 dead letters" in await page.inner_text("main")
        await page.click("form.redrive-all button")
        await page.wait_for_selector("#confirm")
        assert "Re-drive 3 messages?" in await page.inner_text("h1")
        assert not smtp_server.handler.received  # asking sent nothing
        smtp_server.handler.fault = None
        await page.click("#confirm")
        await page.wait_for_url(re.compile(r"done=re-driven"))
        await wait_for(lambda: len(smtp_server.handler.received) == 3, 30)
        assert sorted(r.rcpt_tos[0] for r in smtp_server.handler.received) == [
            f"bulk{i}@example.org" for i in range(3)
        ]
    finally:
        stop_service(service)


@needs_chromium
async def test_the_outbox_shows_each_mail_as_the_attendee_sees_it(
    redis_url: str, worker_process: Any, smtp_server: SmtpServer, tmp_path: Path, browser: Any
) -> None:
    """On the embedded defaults the worker writes a Maildir; the dashboard shows its mails with
    HTML (sandboxed), text, headers and the calendar file."""
    worker_process(redis_url, smtp_server, MAILER_SMTP_HOST="")
    service = start_service(redis_url, tmp_path)
    try:
        async with MailerClient(redis_url) as client:
            await client.publish(make_event(email="jana.schaefer@example.org", name="Jana Schäfer"))
        outbox = tmp_path / "var" / "outbox" / "new"
        await wait_for(lambda: outbox.is_dir() and any(outbox.iterdir()), 30)
        page = await browser.new_page()
        await page.goto(service.url + "/outbox")
        await page.wait_for_selector("#outbox a")
        assert "jana.schaefer@example.org" in await page.inner_text("#outbox")
        await page.click("#outbox a")
        source = await page.get_attribute("iframe.mail", "src")
        framed = await page.request.get(service.url + str(source))
        assert framed.status == 200, await framed.text()
        body = page.frame_locator("iframe.mail").locator("body")
        await body.wait_for()
        assert "Schäfer" in await body.inner_text()
        await _shots(page, "outbox-mail")
        await page.evaluate("document.querySelectorAll('details.part').forEach(d => { d.open = true; })")
        calendar = page.locator("details.part", has_text="Calendar file").locator("pre.text")
        await calendar.wait_for()
        assert "BEGIN:VCALENDAR" in await calendar.inner_text()
        await page.goto(service.url + "/previews/reminder/en")
        await page.frame_locator("iframe.mail").locator("body").wait_for()
        await _shots(page, "preview")
    finally:
        stop_service(service)


@needs_chromium
async def test_the_overview_refreshes_itself_without_a_reload(
    redis_url: str, smtp_server: SmtpServer, worker_process: Any, tmp_path: Path, browser: Any
) -> None:
    """With the page open, a mail sent meanwhile shows in its counts (the panel's script
    re-reads it every 5 s) while the page itself is not reloaded."""
    service = start_service(redis_url, tmp_path)
    try:
        page = await browser.new_page()
        await page.goto(service.url + "/")
        await page.evaluate("window.__notReloaded = true")
        assert (await page.inner_text("#workers .big")).strip() == "0"
        worker_process(redis_url, smtp_server)
        async with MailerClient(redis_url) as client:
            await client.publish(make_event())
        # Locator waits, not wait_for_function: the page's CSP forbids the eval that needs.
        await page.locator("#workers .big", has_text=re.compile(r"^\s*1\s*$")).wait_for(timeout=30_000)
        await page.locator("#counts .status-sent").wait_for(timeout=30_000)
        assert await page.evaluate("window.__notReloaded === true")
    finally:
        stop_service(service)


def test_timestamps_in_pages_are_utc_and_relative_to_now() -> None:
    from mailer.web.pages import _ago

    now = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    assert _ago(now - timedelta(minutes=3), now) == "3 min ago"
    assert _ago(now + timedelta(hours=2), now) == "in 2 h"
    assert _ago(now - timedelta(seconds=4), now) == "4 s ago"
