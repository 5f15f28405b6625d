"""Pins the mailer code a run measures: a copy of mailer/ and templates/, so later edits don't mix in."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = "MAILER_BENCH_SNAPSHOT"


def reexec_on_snapshot(module: str, argv: list[str]) -> None:
    """Unless this process already runs on one: copy the code, then re-run `python -m module` on it.

    `-P` keeps the checkout off the front of sys.path; PYTHONPATH puts the copy first, and
    worker subprocesses and spawned phase processes inherit it.
    """
    if os.environ.get(ENV):
        return
    snap = Path(tempfile.mkdtemp(prefix="mailer-bench-src-"))
    shutil.copytree(ROOT / "mailer", snap / "mailer", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "templates", snap / "templates")
    paths = [str(snap), str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, **{ENV: str(snap), "PYTHONPATH": os.pathsep.join(paths)})
    sys.stdout.flush()
    # Our own interpreter and module with the user's own arguments: no shell, nothing to inject.
    os.execve(sys.executable, [sys.executable, "-P", "-m", module, *argv], env)  # noqa: S606


def snapshot_dir() -> Path | None:
    """The copy this process runs on (None with --no-snapshot)."""
    value = os.environ.get(ENV)
    return Path(value) if value else None


def remove_snapshot() -> None:
    snap = snapshot_dir()
    if snap is not None and snap.name.startswith("mailer-bench-src-"):
        shutil.rmtree(snap, ignore_errors=True)


def fingerprint(package_dir: Path) -> dict[str, str]:
    """A short hash of every .py file under `package_dir`, and its newest file."""
    files = sorted(package_dir.rglob("*.py"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(package_dir).as_posix().encode() + b"\0" + path.read_bytes())
    newest = max(files, key=lambda p: p.stat().st_mtime)
    stamp = datetime.fromtimestamp(newest.stat().st_mtime, UTC).isoformat(timespec="seconds")
    return {"sha256": digest.hexdigest()[:16], "newest_file": f"{newest.name} ({stamp})"}
