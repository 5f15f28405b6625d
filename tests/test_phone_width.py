"""Every kind and locale fits a 320 px phone in a real headless Chromium, with long German words."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailer.content.render import all_kinds_and_locales
from mailer.ops.preview import SAMPLE_OPTIONAL, preview, sample_event, sample_previous
from mailer.settings import Settings
from tests.conftest import CHROMIUM_FLAGS

CHROMIUM = shutil.which("chromium")
ARTIFACTS = Path(__file__).parent.parent / "test-artifacts" / "phone-width"
PHONE, DESKTOP = 320, 600
LONG_TITLE = "Bürgerbeteiligungsveranstaltungsreihe"
LONG_PLACE = "Stadtteilbegegnungszentrum Erfenbach, Bürgerbeteiligungsversammlungsraum"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium (make system-deps installs it)"
)


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4).

    Headless Chromium has no window narrower than 500 px, so `--window-size=320,...` would
    measure a 500 px page; device-metrics emulation gives a true 320 px phone viewport. The
    pipe transport needs no websocket client, only the standard library.
    """

    def __init__(self, binary: str) -> None:
        self.profile = tempfile.mkdtemp(prefix="mailer-chromium-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def wire_pipes() -> None:  # runs in the child: the protocol lives on fds 3 and 4
            read_end, write_end = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self.process = subprocess.Popen(
            [
                binary,
                "--headless",
                *CHROMIUM_FLAGS,
                "--hide-scrollbars",
                f"--user-data-dir={self.profile}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            preexec_fn=wire_pipes,
            close_fds=False,  # else fds 3 and 4 are closed again after wire_pipes ran
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable", session=self.session)

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium did not answer within 30 s")
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        found: dict[str, Any] = json.loads(message)
        return found

    def call(self, method: str, *, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        request: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            request["sessionId"] = session
        os.write(self._to_chrome, json.dumps(request).encode() + b"\0")
        deadline = time.monotonic() + 30
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply["result"]
                return result

    def open(self, page: Path, width: int) -> None:
        """Load `page` in a phone-like viewport `width` px wide and wait for its load event."""
        self.call(
            "Emulation.setDeviceMetricsOverride",
            session=self.session,
            width=width,
            height=900,
            deviceScaleFactor=1,
            mobile=True,
        )
        self.call("Page.navigate", session=self.session, url=page.resolve().as_uri())
        deadline = time.monotonic() + 30
        while self._receive(deadline).get("method") != "Page.loadEventFired":
            pass

    def document_width(self) -> int:
        found = self.call(
            "Runtime.evaluate",
            session=self.session,
            expression="document.documentElement.scrollWidth",
            returnByValue=True,
        )
        return int(found["result"]["value"])

    def text_right_edge(self) -> int:
        """The right edge of the rightmost line of text: unlike the document width it is not
        floored at the viewport (boxes of width 100% always reach it), and it sees text that
        overflows its box without widening the page."""
        found = self.call(
            "Runtime.evaluate",
            session=self.session,
            expression=_RIGHT_EDGE,
            returnByValue=True,
        )
        return int(found["result"]["value"])

    def screenshot(self, path: Path) -> None:
        shot = self.call(
            "Page.captureScreenshot", session=self.session, format="png", captureBeyondViewport=True
        )
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        with_timeout = time.monotonic() + 10
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.call("Browser.close")
        try:
            self.process.wait(max(0.1, with_timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)
        shutil.rmtree(self.profile, ignore_errors=True)


_RIGHT_EDGE = """(() => {
  let right = 0;
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const range = document.createRange();
  while (walker.nextNode()) {
    range.selectNodeContents(walker.currentNode);
    for (const box of range.getClientRects()) right = Math.max(right, box.right);
  }
  return Math.ceil(right);
})()"""


@pytest.fixture(scope="module")
def chromium() -> Iterator[Chromium]:
    assert CHROMIUM is not None
    browser = Chromium(CHROMIUM)
    try:
        yield browser
    finally:
        browser.close()


def long_event() -> dict[str, Any]:
    """The sample dialog evening with a one-word German title and a long place, dated from today."""
    event = sample_event()
    event["event"]["title"] = LONG_TITLE
    event["event"]["location"] = LONG_PLACE
    event["event"]["description"] = f"{LONG_TITLE}: Auftaktveranstaltung im {LONG_PLACE}."
    event["registration"]["attendee"]["name"] = "Maria Mustermann-Schnarrenberger"
    event["registration"]["attendee"]["email"] = "maria.mustermann-schnarrenberger@example.org"
    return event


def everything_event() -> dict[str, Any]:
    """The long event with every optional field of the contract, long where a field can be."""
    event = long_event()
    event["registration"].update(SAMPLE_OPTIONAL["registration"])
    event["event"].update({**SAMPLE_OPTIONAL["event"], "description": event["event"]["description"]})
    event["event"]["title_i18n"] = {"en": LONG_TITLE}
    event["event"]["contact"] = {**SAMPLE_OPTIONAL["event"]["contact"], "name": LONG_PLACE}
    event["event"]["access_info"] = {**SAMPLE_OPTIONAL["event"]["access_info"], "platform": LONG_TITLE}
    return event


FOOTER = {
    "footer_address": "Stadtverwaltung Kaiserslautern; Referat Bürgerbeteiligungsangelegenheiten; "
    "Willy-Brandt-Platz 1; 67657 Kaiserslautern",
    "privacy_url": "https://www.kaiserslautern.de/datenschutzerklaerung-buergerbeteiligungsplattform",
    "imprint_url": "https://www.kaiserslautern.de/impressum",
}
VARIANTS = {"plain": (long_event, {}), "everything": (everything_event, FOOTER)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_kind_is_wider_than_a_320px_phone(chromium: Chromium, tmp_path: Path, variant: str) -> None:
    """With a long one-word title and a long place, no kind x locale document is wider than
    320 px, also with every optional field and the operator footer set ("everything");
    screenshots at 320 and 600 px are kept under test-artifacts/phone-width/."""
    make_event, footer = VARIANTS[variant]
    settings = Settings(data_dir=tmp_path / "var", **footer)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots and rendered HTML: {ARTIFACTS}")
    widths = {}
    suffix = "" if variant == "plain" else f".{variant}"
    for kind, locale in all_kinds_and_locales():
        registration = make_event()
        previous = sample_previous(registration) if kind == "event_changed" else None
        built, _ = preview(settings, kind, registration, locale, previous=previous)
        page = ARTIFACTS / f"{kind}.{locale}{suffix}.html"
        page.write_text(built.html, encoding="utf-8")
        for width in (DESKTOP, PHONE):
            chromium.open(page, width)
            chromium.screenshot(ARTIFACTS / f"{kind}.{locale}{suffix}.{width}px.png")
        widths[f"{kind}/{locale}"] = (chromium.document_width(), chromium.text_right_edge())
    print(
        f"at 320 px ({variant}), document width / right edge of the text: "
        + ", ".join(f"{k} {w}/{edge}" for k, (w, edge) in widths.items())
    )
    too_wide = {name: width for name, width in widths.items() if max(width) > PHONE}
    assert not too_wide, f"wider than {PHONE} px: {too_wide}"
