"""The processes a benchmark run starts: a private redis-server, mailer workers, and isolated phases."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from mailer.ops.embedded import redis_server_command

SENDER = "Stadt Kaiserslautern <noreply@example.org>"
SENDER_ADDRESS = "noreply@example.org"
LOCAL_HOSTNAME = "bench"


class PhaseTimeout(Exception):
    """A phase did not finish within its time bound; reported as TIMEOUT."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vm_hwm_kib(pid: int) -> int | None:
    """Peak resident set size (VmHWM) of a running process, in KiB."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


def _stop_process(process: subprocess.Popen[bytes], grace: float) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


class RedisServer:
    """A private redis-server on a free loopback port; persistence off unless `appendonly`."""

    def __init__(self, directory: Path, *, appendonly: bool = False) -> None:
        self.directory = directory
        self.port = free_port()
        self.appendonly = appendonly
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def persistence(self) -> str:
        return "appendonly everysec" if self.appendonly else 'off (--save "" --appendonly no)'

    def start(self, timeout: float = 15.0) -> None:
        """Start and wait until it answers (a server loading a large dump.rdb needs a longer `timeout`)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            redis_server_command(
                directory=self.directory,
                listen=["--port", str(self.port), "--bind", "127.0.0.1"],
                appendfsync="everysec" if self.appendonly else None,
                logfile=Path("redis.log"),
            ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):  # BusyLoadingError while it loads a dump
                if self.client().ping():
                    return
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start within {timeout:.0f} s")

    def client(self) -> Any:
        """A sync client, typed Any (redis-py types sync and async clients as one union)."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=30)

    def used_memory(self) -> int:
        info: dict[str, Any] = self.client().info("memory")
        return int(info["used_memory"])

    def stop(self) -> None:
        if self.process is not None:
            _stop_process(self.process, 10)
            self.process = None


class WorkerProcess:
    """`python -m mailer worker` as a separate process, configured through MAILER_ variables."""

    def __init__(
        self,
        data_dir: Path,
        *,
        redis_url: str,
        smtp_port: int,
        extra: dict[str, str] | None = None,
        module: str = "mailer",
    ):
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        env = dict(os.environ)
        env.update(
            MAILER_REDIS_URL=redis_url,
            MAILER_DATA_DIR=str(data_dir),
            MAILER_SMTP_HOST="127.0.0.1",
            MAILER_SMTP_PORT=str(smtp_port),
            MAILER_SMTP_SECURITY="none",
            MAILER_SMTP_LOCAL_HOSTNAME=LOCAL_HOSTNAME,
            MAILER_PRINT_OUTCOMES="false",
            MAILER_FROM=SENDER,
        )
        env.update(extra or {})
        if module.startswith("bench."):
            # cwd is the data dir: the checkout must be on the path for a bench module.
            root = str(Path(__file__).resolve().parent.parent)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        self.log_path = data_dir / "worker.log"
        with self.log_path.open("wb") as log:
            # cwd is the fresh data dir: no stray .env from the checkout is read.
            self.process = subprocess.Popen(
                [sys.executable, "-m", module, "worker"],
                cwd=data_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM (finish sends in flight), then SIGKILL after `grace`; the exit status."""
        _stop_process(self.process, grace)
        return self.process.returncode

    def log_tail(self, chars: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""


def wait_ready(r: Any, worker: WorkerProcess, health_key: str, timeout: float = 60.0) -> None:
    """A worker is ready when it has written arq's health-check key (done on its first poll)."""
    deadline = time.monotonic() + timeout
    while not r.exists(health_key):
        if not worker.alive():
            raise RuntimeError(f"worker exited with {worker.process.returncode}: {worker.log_tail()}")
        if time.monotonic() > deadline:
            raise PhaseTimeout(f"worker not ready within {timeout:.0f}s")
        time.sleep(0.02)


def _child(target: Callable[..., Any], kwargs: dict[str, Any], conn: Any) -> None:
    try:
        conn.send(("ok", target(**kwargs)))
    except KeyboardInterrupt:
        pass
    except BaseException as exc:  # report any failure to the parent rather than dying silently
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def run_isolated(target: Callable[..., Any], *, timeout: float, **kwargs: Any) -> Any:
    """Run `target(**kwargs)` in a fresh (spawned) process, as a worker runs; kill it after `timeout`."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(target, kwargs, child), daemon=True)
    process.start()
    child.close()
    try:
        if not parent.poll(timeout):
            raise PhaseTimeout(f"no result within {timeout:.0f}s")
        status, value = parent.recv()
    except EOFError:
        raise RuntimeError(f"phase process died (exit code {process.exitcode})") from None
    finally:
        if process.is_alive():
            process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)
    if status != "ok":
        raise RuntimeError(value)
    return value
