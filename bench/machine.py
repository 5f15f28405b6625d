"""Other processes' CPU use while a phase runs: the machine is shared, and 2 cores are easily disturbed."""

from __future__ import annotations

import os
import time
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _machine_busy() -> float:
    """CPU seconds all cores have spent busy since boot (idle and iowait excluded)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / _TICK


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _process_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _own_tree() -> float:
    """CPU seconds of this process, its reaped children, and its live descendants."""
    times = os.times()
    live = sum(_process_cpu(pid) for pid in _descendants(os.getpid()))
    return times.user + times.system + times.children_user + times.children_system + live


class ForeignLoad:
    """Measures how many cores processes outside this benchmark used between start() and stop()."""

    def __init__(self) -> None:
        self._start = (0.0, 0.0, 0.0)

    def start(self) -> None:
        self._start = (time.monotonic(), _machine_busy(), _own_tree())

    def cores(self) -> float:
        wall = time.monotonic() - self._start[0]
        if wall <= 0:
            return 0.0
        foreign = (_machine_busy() - self._start[1]) - (_own_tree() - self._start[2])
        return max(0.0, foreign / wall)


def wait_for_quiet(*, threshold: float, timeout: float, sample: float = 1.0) -> float:
    """Wait (at most `timeout` s) until other processes use under `threshold` cores; the last sample."""
    deadline = time.monotonic() + timeout
    meter = ForeignLoad()
    while True:
        meter.start()
        time.sleep(sample)
        load = meter.cores()
        if load < threshold or time.monotonic() > deadline:
            return load
