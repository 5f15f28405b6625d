"""The `burst` phase: N registrations for one event, and a reminder for all of them due in one second.

The registrations are seeded once per N (bench.burst_seed: through the real Planner, their
confirmations recorded as sent, saved as a dump.rdb; the fan-out's first stages timed alone).

Each run starts a fresh redis-server from a copy of that dump (so `used_memory_peak` is this
run's own, and every run starts from the same state), starts the workers and waits until each
polls the queue, then applies one `event.updated` (the real Planner again) that gives the event
a single reminder offset falling due three seconds later: a change no attendee sees, so no change
notice goes out, only the reminder is (re)scheduled. From the due second the workers' per-second
tick finds the entry, the fan-out slices page through the event's registrations and enqueue send
jobs, and the send jobs deliver; the run ends at the N-th `250` at the sink.

Every size runs with one worker, for each stage's cost per registration across sizes (pages,
send jobs, the sends, the whole burst, worker and Redis CPU per mail): a stage that grew
faster than linearly would cost more per registration at the larger N.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.burst_seed import event_id, seed, seeded_settings
from bench.data import registrations
from bench.infra import PhaseTimeout, RedisServer, cpu_seconds
from bench.machine import ForeignLoad
from bench.mailer_phases import command_stats, running_workers, wait_drained
from bench.sink import Sink
from mailer.clock import ms, utc_now
from mailer.constants import (
    LOG_STREAM,
    QUEUE_NAME,
    REGISTRATION_KEY,
    SCHEDULE_KEY,
    SEEN_KEY,
)
from mailer.durations import Offset
from mailer.events import parse_event
from mailer.lifecycle.planner import Planner
from mailer.settings import Settings
from mailer.state.deliverylog import DeliveryLog
from mailer.state.queue import connect_client
from mailer.state.store import registrations_key, schedule_member

LEAD_S = 3  # the reminder falls due this many whole seconds after it is scheduled
SAMPLE_S = 0.1  # how often the queue, the schedule entry and the sink are looked at
LOADING_TIMEOUT_S = 600.0
# Not a stage of the fan-out: how a read linear by construction grows on this machine.
REFERENCE = "reference: SMEMBERS in Redis"


# --- one burst ----------------------------------------------------------------------------


async def _schedule_reminder(
    url: str, settings: Settings, *, run: str, today: datetime, due: datetime
) -> str:
    """event.updated through the Planner: the seeded event (as of `today`) with one reminder,
    falling due at `due`, and nothing else changed; returns its schedule member."""
    event = registrations(1, run=run, days_ahead=10, today=today)[0]["event"]
    starts_at = datetime.fromisoformat(event["starts_at"])
    offset = Offset.parse(f"PT{int((starts_at - due).total_seconds())}S")
    event["reminder_offsets"] = [offset.iso]
    update = {
        "type": "event.updated",
        "id": f"burst-{run}-{ms(due)}",
        "occurred_at": utc_now().isoformat(),
        "event": event,
    }
    member = schedule_member(event["id"], "reminder", offset.iso)
    redis = await connect_client(url)
    try:
        planner = Planner(redis, default_offsets=settings.reminder_offsets, worker="bench")
        plan = await planner.apply([parse_event(update)])
        # As the ingest job does: the note says no attendee sees this change (none is sent).
        log = DeliveryLog(redis, max_entries=settings.log_max_entries, echo=None, worker="bench")
        await log.write(plan.notes)
        scheduled = await redis.zscore(SCHEDULE_KEY, member)
    finally:
        await redis.aclose()
    if not any(note.status == "ignored" for note in plan.notes):
        # The Planner saw a change attendees see: change notices are going out to all of them.
        raise RuntimeError("the event.updated changed what attendees see; the burst would not be a reminder")
    if scheduled != ms(due):
        raise RuntimeError(f"the reminder was not rescheduled: {[n.detail for n in plan.notes]}")
    return member


def breakdown(r: Any, *, n: int, run: str, sample: int = 100) -> dict[str, int]:
    """Where the bytes are after a burst: MEMORY USAGE of the log's stream, of its indexes and
    counters (SCAN), of the event's registration set, and of one registration's own keys
    (a sample's mean, times N)."""
    usage: dict[str, int] = {
        "log stream": int(r.memory_usage(LOG_STREAM, samples=0) or 0),
        "event registration set": int(r.memory_usage(registrations_key(event_id(run)), samples=0) or 0),
    }
    pipe = r.pipeline(transaction=False)
    for key in r.scan_iter("mailer:log:*", count=10_000):
        pipe.memory_usage(key, samples=0)
    usage["log indexes and counters"] = sum(int(v or 0) for v in pipe.execute())
    for label, key in (
        ("registration hashes", REGISTRATION_KEY.format(registration_id=f"r-{run}-{{i}}")),
        ("seen event ids", SEEN_KEY.format(event_id=f"e-{run}-{{i}}")),
    ):
        pipe = r.pipeline(transaction=False)
        for i in range(min(sample, n)):
            pipe.memory_usage(key.format(i=i), samples=0)
        sizes = [int(v or 0) for v in pipe.execute()]
        usage[label] = round(n * sum(sizes) / len(sizes))
    return usage


def _command_time(r: Any, mails: int, top: int = 8) -> dict[str, dict[str, float]]:
    """Where Redis spent its time since CONFIG RESETSTAT: the commands with the most µs, with
    calls and µs per mail and µs per call (script bodies count both in EVALSHA and per command)."""
    stats: dict[str, Any] = r.info("commandstats")
    rows = sorted(stats.items(), key=lambda kv: -float(kv[1]["usec"]))[:top]
    return {
        name.removeprefix("cmdstat_"): {
            "calls_per_mail": round(int(v["calls"]) / mails, 2),
            "us_per_mail": round(float(v["usec"]) / mails, 1),
            "us_per_call": round(float(v["usec_per_call"]), 2),
        }
        for name, v in rows
    }


def _redis_cpu(r: Any) -> float:
    info: dict[str, Any] = r.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _follow(r: Any, sink: Sink, member: str, target: int, timeout: float, alive: Any) -> dict[str, Any]:
    """Wait for the sink's `target`-th mail, looking at the schedule entry and the queue meanwhile."""
    deadline = time.monotonic() + timeout
    tick_at: float | None = None
    queue_peak, queue_peak_at = 0, 0.0
    while sink.count < target:
        if time.monotonic() > deadline or not alive():
            return {"done": False}
        now = time.time()
        if tick_at is None and r.zscore(SCHEDULE_KEY, member) is None:
            tick_at = now
        queued = int(r.zcard(QUEUE_NAME))
        if queued > queue_peak:
            queue_peak, queue_peak_at = queued, now
        time.sleep(SAMPLE_S)
    return {"done": True, "tick_at": tick_at, "queue_peak": queue_peak, "queue_peak_at": queue_peak_at}


def burst(
    rdb: Path,
    today: datetime,
    sink: Sink,
    base_dir: Path,
    *,
    n: int,
    run: str,
    workers: int,
    timeout: float,
    where_bytes_are: bool = False,
) -> dict[str, Any]:
    """One burst from the seeded dump with `workers` worker processes: due second → N-th 250."""
    settings = seeded_settings(n, sink)
    shutil.rmtree(base_dir, ignore_errors=True)  # an attempt before this one may have left it
    redis = RedisServer(base_dir / "redis")
    redis.directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(rdb, redis.directory / "dump.rdb")
    try:
        began = time.monotonic()
        redis.start(timeout=LOADING_TIMEOUT_S)
        load_s = time.monotonic() - began
        r = redis.client()
        loaded = redis.used_memory()
        sink.take()
        env = {"MAILER_LOG_MAX_ENTRIES": str(settings.log_max_entries)}
        with running_workers(redis, sink, base_dir, workers, **env) as procs:
            r.config_resetstat()
            cpu = [procs.cpu_each(), cpu_seconds(sink.pid), _redis_cpu(r)]
            foreign = ForeignLoad()
            foreign.start()
            baseline = sink.count
            due_s = math.ceil(time.time()) + LEAD_S
            member = asyncio.run(
                _schedule_reminder(
                    redis.url, settings, run=run, today=today, due=datetime.fromtimestamp(due_s, UTC)
                )
            )
            seen = _follow(r, sink, member, baseline + n, timeout, procs.alive)
            foreign_cores = foreign.cores()
            cpu_used = {
                "workers": [b - a for a, b in zip(cpu[0], procs.cpu_each(), strict=True)],
                "sink": cpu_seconds(sink.pid) - cpu[1],
                "redis": _redis_cpu(r) - cpu[2],
            }
            records = sink.take()
            drained = wait_drained(redis, 30)
            commands = command_stats(r, n)
            command_time = _command_time(r, n)
            rss = procs.peak_rss_kib()
            exits = procs.stop()
        if not seen["done"]:
            raise PhaseTimeout(f"sink had {len(records)} of {n} reminders after {timeout:.0f}s")
        memory: dict[str, Any] = r.info("memory")
        log_entries = int(r.xlen(LOG_STREAM))
        bytes_at = breakdown(r, n=n, run=run) if where_bytes_are else {}
    finally:
        redis.stop()
    mine = [t for rcpt, t in records if rcpt.endswith(f".{run}@example.org")]
    distinct = len({rcpt for rcpt, _ in records})
    # Each registration: its confirmation (seeded) and its reminder; and the update's one note.
    if len(mine) != n or distinct != n or log_entries != 2 * n + 1:
        raise RuntimeError(
            f"expected {n} reminders to {n} addresses and {2 * n + 1} log entries, "
            f"got {len(mine)} to {distinct} and {log_entries}"
        )
    first, last = min(mine), max(mine)
    peak = int(memory["used_memory_peak"])
    return {
        "n": n,
        "workers": workers,
        "load_seconds": load_s,
        "due_to_last_s": last - due_s,
        "rate": n / (last - due_s),
        "tick_after_due_s": seen["tick_at"] - due_s if seen["tick_at"] else None,
        "first_after_due_s": first - due_s,
        "send_seconds": last - first,
        "send_rate": n / (last - first),
        "queue_peak_jobs": seen["queue_peak"],
        "queue_peak_after_due_s": seen["queue_peak_at"] - due_s,
        "reminders": len(mine),
        "distinct_recipients": distinct,
        "cpu_s": cpu_used,
        "worker_cpu_us_per_mail": 1e6 * sum(cpu_used["workers"]) / n,
        "redis_cpu_us_per_mail": 1e6 * cpu_used["redis"] / n,
        "foreign_cpu_cores": foreign_cores,
        "worker_peak_rss_kib": rss,
        "worker_exit_codes": exits,
        "queue_drained": drained,
        "redis_commands": commands,
        "redis_command_time": command_time,
        "log_entries": log_entries,
        "used_memory_loaded": loaded,
        "used_memory_after": int(memory["used_memory"]),
        "used_memory_peak": peak,
        "breakdown_bytes": bytes_at,
    }


# --- the phase ----------------------------------------------------------------------------


def _growth(small: dict[str, Any], large: dict[str, Any]) -> dict[str, float]:
    """Per-registration cost at the larger N over the smaller, stage by stage (1.0: linear).

    The wall-time stages move with other processes' load; the CPU ones (worker and Redis CPU
    per mail) much less, so a wall-time ratio that the CPU ones do not share is the machine."""
    s_stages, l_stages = small["seed"]["stages"], large["seed"]["stages"]
    s_run, l_run = small["runs"]["1"], large["runs"]["1"]

    def stage(name: str) -> float:
        return float(l_stages[f"{name}_us_per_registration"] / s_stages[f"{name}_us_per_registration"])

    return {
        "pages": stage("pages"),
        "SSCAN in Redis": stage("sscan_in_redis"),
        REFERENCE: stage("smembers_in_redis"),
        "send jobs": stage("send_jobs"),
        "sends": (l_run["send_seconds"] / l_run["n"]) / (s_run["send_seconds"] / s_run["n"]),
        "due → last 250": (l_run["due_to_last_s"] / l_run["n"]) / (s_run["due_to_last_s"] / s_run["n"]),
        "worker CPU": l_run["worker_cpu_us_per_mail"] / s_run["worker_cpu_us_per_mail"],
        "Redis CPU": l_run["redis_cpu_us_per_mail"] / s_run["redis_cpu_us_per_mail"],
    }


def _least_disturbed(
    attempt: Any, *, quiet: Any, retries: int, threshold: float, progress: Any
) -> dict[str, Any]:
    """Run `attempt()` (after waiting for a quiet machine), again (at most `retries` times) while
    other processes took more than `threshold` cores meanwhile; the least disturbed result."""
    quiet()
    results = [attempt()]
    while results[-1]["foreign_cpu_cores"] > threshold and len(results) <= retries:
        progress(f"    other processes used {results[-1]['foreign_cpu_cores']:.2f} cores: again")
        quiet()
        results.append(attempt())
    best: dict[str, Any] = min(results, key=lambda r: r["foreign_cpu_cores"])
    best["attempts_foreign_cpu_cores"] = [round(r["foreign_cpu_cores"], 3) for r in results]
    return best


def burst_phase(
    sink: Sink,
    directory: Path,
    *,
    sizes: list[int],
    workers: list[int],
    quiet: Any,
    timeout: Any,
    retries: int,
    threshold: float,
    progress: Any,
) -> dict[str, Any]:
    """Every size with one worker (for the growth per stage); the largest also with `workers`.

    Each run that other processes disturbed runs again (`retries`), not the whole phase: at a
    million registrations a phase runs for an hour."""
    result: dict[str, Any] = {"sizes": {}, "workers": workers, "cpus": os.cpu_count()}
    ordered = sorted(set(sizes))
    for n in ordered:
        run = f"b{n}"
        rdb, seeded = seed(directory / run, sink, n=n, run=run)
        stages = seeded["stages"]
        progress(
            f"  N={n:,}: seeded in {seeded['seconds']:.1f} s, {seeded['bytes_per_registration']:,.0f} B/"
            f"registration; pages {stages['pages_us_per_registration']:.2f} µs, send jobs "
            f"{stages['send_jobs_us_per_registration']:.2f} µs per registration"
        )
        runs: dict[str, Any] = {}
        for count in sorted({1, *workers}) if n == ordered[-1] else [1]:
            attempt = functools.partial(
                burst,
                rdb,
                datetime.fromisoformat(seeded["today"]),
                sink,
                directory / run / f"{count}w",
                n=n,
                run=run,
                workers=count,
                timeout=timeout(n),
                where_bytes_are=count == 1,
            )
            one = runs[str(count)] = _least_disturbed(
                attempt, quiet=quiet, retries=retries, threshold=threshold, progress=progress
            )
            progress(
                f"  N={n:,}, {count} worker(s): due → last 250 {one['due_to_last_s']:.1f} s "
                f"({one['rate']:,.0f} mails/s), Redis peak {one['used_memory_peak'] / 2**20:,.0f} MiB, "
                f"Redis CPU {one['redis_cpu_us_per_mail']:.0f} µs/mail, other processes "
                f"{one['foreign_cpu_cores']:.2f} cores"
            )
        rdb.unlink()
        result["sizes"][str(n)] = {"seed": seeded, "runs": runs}
    result["largest"] = ordered[-1]
    result["rate"] = result["sizes"][str(ordered[-1])]["runs"]["1"]["rate"]
    if len(ordered) > 1:
        smallest = result["sizes"][str(ordered[0])]
        result["growth"] = {str(n): _growth(smallest, result["sizes"][str(n)]) for n in ordered[1:]}
    # The runs above were each repeated as needed: bench.run must not repeat the whole phase.
    result["retried_per_run"] = True
    return result
