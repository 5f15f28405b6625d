"""mailer itself, end to end: publish, real worker processes until the sink has every mail, and latency."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.data import address, registrations
from bench.infra import PhaseTimeout, RedisServer, WorkerProcess, cpu_seconds, vm_hwm_kib, wait_ready
from bench.machine import ForeignLoad
from bench.sink import Record, Sink
from mailer.constants import LOG_STREAM, QUEUE_NAME
from mailer.intake.client import MailerClient

HEALTH_KEY = QUEUE_NAME + ":health-check"


@dataclass
class Workers:
    """Worker processes started one after another, each waited for until it polls the queue."""

    redis: RedisServer
    sink: Sink
    base_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    module: str = "mailer"  # bench.unindexed_worker: the same worker with the log's indexes off
    processes: list[WorkerProcess] = field(default_factory=list)

    def start(self, count: int) -> None:
        r = self.redis.client()
        for i in range(count):
            r.delete(HEALTH_KEY)
            worker = WorkerProcess(
                self.base_dir / f"worker-{i}",
                redis_url=self.redis.url,
                smtp_port=self.sink.port,
                extra=self.extra_env,
                module=self.module,
            )
            self.processes.append(worker)
            wait_ready(r, worker, HEALTH_KEY)

    def cpu(self) -> float:
        return sum(self.cpu_each())

    def cpu_each(self) -> list[float]:
        return [cpu_seconds(w.pid) for w in self.processes]

    def peak_rss_kib(self) -> list[int | None]:
        return [vm_hwm_kib(w.pid) for w in self.processes]

    def stop(self) -> list[int | None]:
        return [w.stop() for w in self.processes]

    def alive(self) -> bool:
        """Every worker and Redis still run (else waiting for mail is pointless)."""
        running = self.redis.process is not None and self.redis.process.poll() is None
        return running and all(w.alive() for w in self.processes)


@contextlib.contextmanager
def running_workers(
    redis: RedisServer, sink: Sink, base_dir: Path, count: int, module: str = "mailer", **env: str
) -> Iterator[Workers]:
    workers = Workers(redis, sink, base_dir, extra_env=env, module=module)
    try:
        workers.start(count)
        yield workers
    finally:
        workers.stop()


async def publish_many(url: str, events: list[dict[str, Any]]) -> tuple[float, float, int]:
    """(start, end, accepted) of one `MailerClient.publish_many` call."""
    async with MailerClient(url) as client:
        started = time.time()
        report = await client.publish_many(events)
        finished = time.time()
    if report.invalid:
        raise RuntimeError(f"{len(report.invalid)} bench events were refused: {report.invalid[0][1]}")
    return started, finished, report.accepted


def wait_drained(redis: RedisServer, timeout: float) -> bool:
    """True once no job is due or running (the per-second cron job, deferred, does not count)."""
    r = redis.client()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        due = r.zcount(QUEUE_NAME, "-inf", int(time.time() * 1000))
        running = [k for k in r.scan_iter("arq:in-progress:*", count=1000) if b"cron:" not in k]
        if not due and not running:
            return True
        time.sleep(0.05)
    return False


def throughput(
    redis: RedisServer,
    sink: Sink,
    base_dir: Path,
    *,
    n: int,
    workers: int,
    run: str,
    timeout: float,
    days_ahead: int = 14,
    module: str = "mailer",
    **env: str,
) -> dict[str, Any]:
    """Publish `n` registrations to idle workers; mails/s from the end of publishing to the n-th 250."""
    r = redis.client()
    r.flushall()
    sink.take()
    memory_before = redis.used_memory()
    events = registrations(n, run=run, days_ahead=days_ahead)
    began = time.monotonic()
    with running_workers(redis, sink, base_dir, workers, module, **env) as procs:
        startup = time.monotonic() - began
        r.config_resetstat()
        foreign = ForeignLoad()
        foreign.start()
        cpu = (procs.cpu(), cpu_seconds(sink.pid), cpu_seconds(redis.process.pid if redis.process else 0))
        baseline = sink.count
        started, published, accepted = asyncio.run(publish_many(redis.url, events))
        done = sink.wait_for(baseline + n, timeout=timeout, alive=procs.alive)
        finished = time.time()
        foreign_cores = foreign.cores()
        cpu_used = (
            procs.cpu() - cpu[0],
            cpu_seconds(sink.pid) - cpu[1],
            cpu_seconds(redis.process.pid if redis.process else 0) - cpu[2],
        )
        records = sink.take()
        drained = wait_drained(redis, 30)
        commands = command_stats(r, n)
        rss = procs.peak_rss_kib()
        began = time.monotonic()
        exits = procs.stop()
        stop = time.monotonic() - began
    if not done:
        raise PhaseTimeout(f"sink had {len(records)} of {n} mails after {timeout:.0f}s")
    left_in_queue = int(r.zcard(QUEUE_NAME))  # the deferred per-second cron job, normally
    log_entries = int(r.xlen(LOG_STREAM))
    r.delete(LOG_STREAM)
    memory_after = redis.used_memory()
    mine = [t for rcpt, t in records if rcpt.endswith(f".{run}@example.org")]
    last = max(mine)
    return {
        "n": n,
        "workers": workers,
        "publish_seconds": published - started,
        "publish_rate": accepted / (published - started),
        "seconds": last - published,
        "rate": n / (last - published),
        "first_accept_after_publish_s": min(mine) - published,
        "distinct_recipients": len(set(rcpt for rcpt, _ in records)),
        "accepted_total": len(records),
        "wall_to_done_s": finished - published,
        "cpu_s": {"workers": cpu_used[0], "sink": cpu_used[1], "redis": cpu_used[2]},
        "foreign_cpu_cores": foreign_cores,
        "worker_cpu_us_per_mail": 1e6 * cpu_used[0] / n,
        "worker_peak_rss_kib": rss,
        "worker_exit_codes": exits,
        "worker_startup_s": startup,
        "worker_stop_s": stop,
        "queue_drained": drained,
        "jobs_left_in_queue": left_in_queue,
        "log_entries": log_entries,
        "redis_commands": commands,
        "redis_used_memory_before": memory_before,
        "redis_used_memory_after": memory_after,
        "redis_bytes_per_registration": (memory_after - memory_before) / n,
    }


def command_stats(r: Any, mails: int) -> dict[str, Any]:
    """Redis commands per mail since the last CONFIG RESETSTAT (calls inside Lua scripts included),
    and round trips per mail (Redis' read events: one per request or pipeline sent)."""
    reads = int(r.info("stats")["total_reads_processed"])
    stats: dict[str, Any] = r.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    top = sorted(calls.items(), key=lambda kv: -kv[1])[:10]
    return {
        "per_mail": sum(calls.values()) / mails,
        "round_trips_per_mail": reads / mails,
        "top_per_mail": {name: round(count / mails, 2) for name, count in top},
    }


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def _paced_publish(url: str, events: list[dict[str, Any]], rate: float) -> dict[str, float]:
    """publish() one event at a time on a fixed schedule; returns registration id -> publish time."""
    sent: dict[str, float] = {}
    async with MailerClient(url) as client:
        start = time.monotonic() + 0.05
        for i, event in enumerate(events):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            sent[event["registration"]["id"]] = time.time()
            await client.publish(event)
    return sent


def _warm_up(redis: RedisServer, sink: Sink, run: str, n: int = 20) -> dict[str, Any]:
    """A fresh worker's first mails pay for compiling templates and opening connections (~0.1 s):
    send `n` first, untimed, so the measurement shows the steady state. Returns the cold latencies."""
    events = registrations(n, run=f"{run}w")
    baseline = sink.count
    published = asyncio.run(_paced_publish(redis.url, events, 50))
    if not sink.wait_for(baseline + n, timeout=60):
        raise PhaseTimeout("the warm-up mails did not arrive within 60 s")
    accepted = dict(sink.take())
    ms = [
        1000 * (accepted[address(f"{run}w", i)] - published[e["registration"]["id"]])
        for i, e in enumerate(events)
    ]
    return {"n": n, "first_ms": ms[0], "max_ms": max(ms)}


def latency(
    redis: RedisServer, sink: Sink, base_dir: Path, *, rate: float, seconds: float, run: str, timeout: float
) -> dict[str, Any]:
    """Publish-to-250 latency per registration at `rate` events/s for `seconds`, one worker."""
    redis.client().flushall()
    sink.take()
    n = max(1, round(rate * seconds))
    events = registrations(n, run=run)
    by_address = {address(run, i): event["registration"]["id"] for i, event in enumerate(events)}
    r = redis.client()
    with running_workers(redis, sink, base_dir, 1) as procs:
        cold = _warm_up(redis, sink, run)
        r.config_resetstat()
        baseline, cpu = sink.count, procs.cpu()
        foreign = ForeignLoad()
        foreign.start()
        began = time.monotonic()
        published = asyncio.run(_paced_publish(redis.url, events, rate))
        publish_span = time.monotonic() - began
        done = sink.wait_for(baseline + n, timeout=timeout, alive=procs.alive)
        cpu = procs.cpu() - cpu
        foreign_cores = foreign.cores()
        records: list[Record] = sink.take()
        commands = command_stats(r, n)
        rss = procs.peak_rss_kib()
    accepted = {by_address[rcpt]: t for rcpt, t in records if rcpt in by_address}
    if not done:
        raise PhaseTimeout(f"sink had {len(accepted)} of {n} mails {timeout:.0f}s after publishing")
    lat = [1000 * (accepted[rid] - t) for rid, t in published.items()]
    busy_span = max(accepted.values()) - min(published.values())
    return {
        "rate": rate,
        "n": n,
        "achieved_publish_rate": n / publish_span,
        "p50_ms": _percentile(lat, 0.50),
        "p90_ms": _percentile(lat, 0.90),
        "p99_ms": _percentile(lat, 0.99),
        "max_ms": max(lat),
        "mean_ms": statistics.fmean(lat),
        "worker_cpu_us_per_mail": 1e6 * cpu / n,
        # Worker CPU over first publish → last 250: above ~0.9 the worker is saturated.
        "worker_busy_share": cpu / busy_span,
        "redis_commands": commands,
        "worker_peak_rss_kib": rss,
        "foreign_cpu_cores": foreign_cores,
        "warm_up": cold,
    }
