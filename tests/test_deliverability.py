"""Every kind and locale scores below 1.0 in SpamAssassin's local rules (`make check-deliverability`).

The same check runs as `python -m tests.test_deliverability`: it renders each kind x locale with
`mailer render KIND --event FILE --locale L --out DIR` and feeds the .eml files to Debian's
`spamassassin -L -t` (local tests only: no DNS, no network), printing the score of each.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mailer.content.render import all_kinds_and_locales
from mailer.ops.preview import sample_event, sample_event_with_everything, sample_previous

LIMIT = 1.0
SPAMASSASSIN = shutil.which("spamassassin")
_SEPARATOR = re.compile(r"^From mailer-check-(?P<name>[\w.]+)@localhost ", re.MULTILINE)
_SCORE = re.compile(
    r"^X-Spam-Status: \w+, score=(?P<score>-?[\d.]+)[^\n]*\n(?P<more>(?:[ \t][^\n]*\n)*)", re.M
)


# Two runs: the plain sample, and every optional field with the operator footer set.
FOOTER_ENV = {
    "MAILER_FOOTER_ADDRESS": "Stadtverwaltung Kaiserslautern; Willy-Brandt-Platz 1; 67657 Kaiserslautern",
    "MAILER_PRIVACY_URL": "https://www.kaiserslautern.de/datenschutz",
    "MAILER_IMPRINT_URL": "https://www.kaiserslautern.de/impressum",
}
VARIANTS: dict[str, tuple[Callable[[], dict[str, Any]], dict[str, str]]] = {
    "plain": (sample_event, {}),
    "everything": (sample_event_with_everything, FOOTER_ENV),
}


def render_all(out: Path) -> dict[str, Path]:
    """Each kind x locale x variant as an .eml written by the `mailer render` command."""
    files = {}
    for variant in VARIANTS:
        (out / variant).mkdir()
        for name, path in _render_variant(out / variant, variant).items():
            files[f"{name}.{variant}"] = path
    return files


def _render_variant(out: Path, variant: str) -> dict[str, Path]:
    make_event, footer = VARIANTS[variant]
    event = out / "event.json"
    event.write_text(json.dumps(make_event()), encoding="utf-8")
    before = out / "before.json"  # the event as it was, for the change notice
    before.write_text(json.dumps(sample_previous(make_event())), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    env["MAILER_DATA_DIR"] = str(out / "var")
    env.update(footer)
    files = {}
    for kind, locale in all_kinds_and_locales():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mailer",
                "render",
                kind,
                "--event",
                str(event),
                "--locale",
                locale,
                "--out",
                str(out),
                *(["--previous", str(before)] if kind == "event_changed" else []),
            ],
            check=True,
            cwd=out,  # no stray .env from the developer's checkout
            env=env,
            stdout=subprocess.DEVNULL,
        )
        files[f"{kind}.{locale}"] = out / f"{kind}.{locale}.eml"
    return files


def spam_scores(files: dict[str, Path], spamassassin: str) -> dict[str, tuple[float, str]]:
    """(score, rules hit) per message: all messages go through one `spamassassin -L -t --mbox`
    run, since loading the rules costs two seconds and scoring a message a few milliseconds."""
    mbox = bytearray()
    for name, path in files.items():
        mbox += f"From mailer-check-{name}@localhost Thu Jan  1 00:00:00 2026\n".encode()
        for line in path.read_bytes().replace(b"\r\n", b"\n").splitlines(keepends=True):
            mbox += b">" + line if line.startswith(b"From ") else line
        mbox += b"\n"
    report = subprocess.run(
        [spamassassin, "-L", "-t", "--mbox"], input=bytes(mbox), capture_output=True, check=True
    ).stdout.decode("utf-8", "replace")
    found: dict[str, tuple[float, str]] = {}
    pieces = _SEPARATOR.split(report)[1:]
    for name, body in zip(pieces[::2], pieces[1::2], strict=True):
        status = _SCORE.search(body)
        assert status is not None, f"no X-Spam-Status for {name}"
        rules = re.search(r"tests=(\S*)", status.group(0).replace("\n", "").replace("\t", ""))
        found[name] = (float(status.group("score")), rules.group(1) if rules else "")
    missing = set(files) - set(found)
    assert not missing, f"spamassassin reported nothing for {sorted(missing)}"
    return found


def check(out: Path, spamassassin: str) -> list[str]:
    """Print one line per kind and locale; return the names that score LIMIT or more."""
    files = render_all(out)
    scores = spam_scores(files, spamassassin)
    for name in files:
        score, rules = scores[name]
        print(f"{'FAIL' if score >= LIMIT else 'ok  '} {name:39} {score:5.1f}  {rules}")
    return [name for name, (score, _) in scores.items() if score >= LIMIT]


@pytest.mark.skipif(SPAMASSASSIN is None, reason="needs Debian's spamassassin (make system-deps)")
def test_every_kind_and_locale_scores_below_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SpamAssassin's local rules give every kind x locale less than 1.0 (no low-contrast or
    invisible-font text: the preheader is hidden with display:none alone), also with every
    optional field and the operator footer set."""
    assert SPAMASSASSIN is not None
    failed = check(tmp_path, SPAMASSASSIN)
    with capsys.disabled():
        print("\n" + capsys.readouterr().out, end="")
    assert not failed, f"score >= {LIMIT}: {failed}"


COUNT = len(all_kinds_and_locales()) * len(VARIANTS)


def main() -> int:
    if SPAMASSASSIN is None:
        print("spamassassin is not installed: run `make system-deps` as root", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="mailer-deliverability-") as out:
        failed = check(Path(out), SPAMASSASSIN)
    if failed:
        print(f"{len(failed)} of {COUNT} score {LIMIT} or more", file=sys.stderr)
        return 1
    print(f"all {COUNT} below {LIMIT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
