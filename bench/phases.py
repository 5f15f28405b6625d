"""The benchmark's phases: each takes the run's Context and returns a dict of what it measured."""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import burst, ceilings, intake_phase, lifecycle, log_phase, mailer_phases
from bench.data import SampleMessage
from bench.infra import PhaseTimeout, RedisServer, run_isolated
from bench.machine import wait_for_quiet
from bench.sink import Sink
from mailer.settings import Settings

LIGHT_RATE = 50.0  # events/s for the light-load latency reference
PHASES = (
    "protocol",
    "transport",
    "queue",
    "naive",
    "naive-default",
    "mailer",
    "latency",
    "memory",
    "reschedule",
    "enqueue",
    "aof",
    "log",
    "log-cost",
    "intake",
    "burst",
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

    def quiet(self) -> float:
        """Wait (bounded) until other processes leave the 2 cores alone; their last load."""
        return wait_for_quiet(threshold=self.args.quiet_threshold, timeout=self.args.quiet_timeout)

    def timeout(self, n: int, min_rate: float, base: float = 120.0) -> float:
        """Generous: `base` seconds plus `n` at a rate far below anything measured here."""
        return base + n / min_rate


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


def phase_transport(ctx: Context) -> dict[str, Any]:
    n = ctx.args.n
    settings = ctx.settings.model_copy(update={"smtp_port": ctx.sink.port})
    result: dict[str, Any] = run_isolated(
        ceilings.transport_phase, timeout=ctx.timeout(n, 50), settings=settings, n=n, data=ctx.message.data
    )
    result["connections"] = settings.smtp_max_connections
    return _rate(result, ctx)  # sink_accepted includes one warm-up mail per connection


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
        ctx.quiet()
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
        progress(f"  {count} worker(s): {short(runs[str(count)])}")
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
        ctx.quiet()
        result[label] = lifecycle.memory(
            ctx.redis, ctx.sink, ctx.tmp / f"memory-{n}", n=n, run=f"mem{n}", timeout=ctx.timeout(n, 20)
        )
        progress(f"  N={n}: {result[label]['bytes_per_registration']:,.0f} B/registration")
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


def phase_log(ctx: Context) -> dict[str, Any]:
    result = log_phase.log_phase(ctx.redis, ctx.tmp / "log", sizes=ctx.args.log_sizes)
    for size, figures in result["sizes"].items():
        slowest = max(q["ms"] for q in figures["queries"].values())
        progress(
            f"  {int(size):,} entries: {figures['bytes_per_entry']:,.0f} B/entry, slowest query {slowest} ms"
        )
    return result


def phase_log_cost(ctx: Context) -> dict[str, Any]:
    """The send path with the log's indexes off and on, alternating in one run: what indexing costs."""
    rates: dict[str, list[float]] = {"off": [], "on": []}
    for round_ in range(4):
        indexed = "on" if round_ % 2 else "off"
        ctx.quiet()
        one = mailer_phases.throughput(
            ctx.redis,
            ctx.sink,
            ctx.tmp / f"log-cost-{round_}",
            n=ctx.args.n,
            workers=1,
            run=f"lc{round_}",
            timeout=ctx.timeout(ctx.args.n, 20),
            module="mailer" if indexed == "on" else "bench.unindexed_worker",
        )
        rates[indexed].append(one["rate"])
        progress(f"  indexes {indexed}: {one['rate']:,.0f} mails/s")
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    return {"rates": rates, "median_off": off, "median_on": on, "on_over_off": on / off}


def phase_intake(ctx: Context) -> dict[str, Any]:
    ctx.quiet()
    result = intake_phase.intake_phase(ctx.redis, ctx.tmp / "intake")
    progress(
        f"  batches: {result['batch_events_per_s']:,} events/s; singles: {result['singles_per_s']:,}/s, "
        f"p99 {result['single_p99_ms']} ms"
    )
    return result


def phase_burst(ctx: Context) -> dict[str, Any]:
    sizes = ctx.args.burst_sizes or sorted({10_000, ctx.args.n})
    return burst.burst_phase(
        ctx.sink,
        ctx.tmp / "burst",
        sizes=sizes,
        workers=ctx.args.burst_workers,
        quiet=ctx.quiet,
        timeout=lambda n: ctx.timeout(n, 20),
        retries=ctx.args.retries,
        threshold=ctx.args.quiet_threshold,
        progress=progress,
    )


RUNNERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "protocol": phase_protocol,
    "transport": phase_transport,
    "queue": phase_queue,
    "naive": phase_naive,
    "naive-default": phase_naive_default,
    "mailer": phase_mailer,
    "latency": phase_latency,
    "memory": phase_memory,
    "reschedule": phase_reschedule,
    "enqueue": phase_enqueue,
    "aof": phase_aof,
    "log": phase_log,
    "log-cost": phase_log_cost,
    "intake": phase_intake,
    "burst": phase_burst,
}


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def short(result: dict[str, Any]) -> str:
    if result.get("status", "ok") != "ok":
        return f"{result.get('status')}: {result.get('error', '')}"
    for key, unit in (("p50_ms", "ms p50"), ("rate", "mails/s"), ("max_s", "s max"), ("seconds", "s")):
        if key in result:
            return f"{result[key]:,.1f} {unit}"
    return "done"
