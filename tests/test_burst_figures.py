"""The README's burst figures (Performance, issue 13) are the bench/results files it names.

No timing is measured here: the figures come from `python -m bench.run --only burst`; this only
checks that the README quotes those files and not something else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MILLION = "20261207T233938Z"  # 10 000, 100 000, 1 000 000 with one worker
WORKERS = "20261207T232202Z"  # 10 000 and 100 000, 100 000 also with 2 and 3 workers


def spaced(number: float) -> str:
    """1118.4 -> "1 118", as the README writes numbers."""
    return f"{round(number):,}".replace(",", " ")


def burst(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((ROOT / "bench" / "results" / f"{name}.json").read_text())
    phase: dict[str, Any] = data["phases"]["burst"]
    assert phase["status"] == "ok"
    return phase


def test_readme_burst_figures_are_the_bench_results() -> None:
    text = " ".join((ROOT / "README.md").read_text().split())
    million = burst(MILLION)
    sizes = million["sizes"]
    one = sizes["1000000"]["runs"]["1"]
    seeded = sizes["1000000"]["seed"]
    per_registration = (one["used_memory_peak"] - seeded["used_memory_empty"]) / 1_000_000
    redis_us = [sizes[n]["runs"]["1"]["redis_cpu_us_per_mail"] for n in ("10000", "100000", "1000000")]
    small, large = sizes["10000"]["seed"]["stages"], sizes["1000000"]["seed"]["stages"]
    growth = million["growth"]["1000000"]
    runs = burst(WORKERS)["sizes"]["100000"]["runs"]
    workers = [runs[k] for k in ("1", "2", "3")]
    three = workers[2]
    three_busy = sum(seconds / three["due_to_last_s"] for seconds in three["cpu_s"]["workers"])
    figures = [
        f"{one['due_to_last_s']:.1f} s, {spaced(one['rate'])} mails/s (first `250` after "
        f"{one['first_after_due_s']:.2f} s; others used {one['foreign_cpu_cores']:.2f} cores)",
        " / ".join(f"{w['due_to_last_s']:.1f}" for w in workers)
        + " s ("
        + " / ".join(spaced(w["rate"]) for w in workers)
        + " mails/s)",
        f"{one['used_memory_peak'] / 1e9:.2f} GB ({spaced(per_registration)} B/registration) | ≤ 1 GB | miss",
        " / ".join(spaced(us) for us in redis_us) + " µs",
        f"{small['pages_us_per_registration']:.2f} → {large['pages_us_per_registration']:.2f} µs; "
        f"{small['send_jobs_us_per_registration']:.2f} → {large['send_jobs_us_per_registration']:.2f} µs",
        f"the log's stream {spaced(one['breakdown_bytes']['log stream'] / 1e6)} B",
        f"indexes and counters {spaced(one['breakdown_bytes']['log indexes and counters'] / 1e6)} B",
        f"registration hash {spaced(one['breakdown_bytes']['registration hashes'] / 1e6)} B",
        f"seen-event key {spaced(one['breakdown_bytes']['seen event ids'] / 1e6)} B",
        f"registration set {spaced(one['breakdown_bytes']['event registration set'] / 1e6)} B",
        f"never held more than {one['queue_peak_jobs']} jobs",
        f"SSCAN {small['sscan_in_redis_us_per_registration']:.2f} → "
        f"{large['sscan_in_redis_us_per_registration']:.2f} µs per member",
        f"{small['smembers_in_redis_us_per_registration']:.2f} → "
        f"{large['smembers_in_redis_us_per_registration']:.2f} µs",
        f"pages {growth['pages']:.2f}×, send jobs {growth['send jobs']:.2f}×, "
        f"sends {growth['sends']:.2f}×, Redis CPU {growth['Redis CPU']:.2f}×, "
        f"worker CPU {growth['worker CPU']:.2f}×",
        f"with 3 workers they used {three_busy:.2f} cores",
    ]
    for figure in figures:
        assert figure in text, figure


def test_deploy_readme_sizes_redis_from_the_million() -> None:
    """deploy/README.md's "A million registrations": the peak and Redis CPU per mail of that run,
    and the mails/s one Redis core carries at that CPU per mail (arithmetic, said as such)."""
    text = " ".join((ROOT / "deploy" / "README.md").read_text().split())
    sizes = burst(MILLION)["sizes"]
    one = sizes["1000000"]["runs"]["1"]
    small = sizes["10000"]["runs"]["1"]
    assert f"Redis peaked at {one['used_memory_peak'] / 1e9:.2f} GB" in text
    assert f"Redis needed {spaced(one['redis_cpu_us_per_mail'])} µs of CPU a mail" in text
    assert f"against {spaced(small['redis_cpu_us_per_mail'])} µs at 10 000" in text
    carried = 1e6 / one["redis_cpu_us_per_mail"]
    assert 3500 < carried < 4500, carried  # "about 4 000 mails/s"
    assert f"`bench/results/{MILLION}.json`" in text
