"""CPU time and memory of a process tree, read from /proc (Linux only, stdlib only).

A relay under test is one process, or a supervisor with worker processes: every
figure here is the sum over the process and its descendants, so ``workers: 2`` is
charged for all of its processes.
"""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's list, as the kernel keeps them)."""
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                out += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                continue
    except OSError:
        return []
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of one process, in seconds (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    # After the ")" the fields start at number 3 (state): utime is field 14, stime 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_seconds(p) for p in pids)


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def rss_bytes(pid: int) -> int:
    """Resident set size now."""
    return _status_kb(pid, "VmRSS") * 1024


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set size so far (VmHWM)."""
    return _status_kb(pid, "VmHWM") * 1024


def tree_rss_bytes(pids: list[int]) -> int:
    return sum(rss_bytes(p) for p in pids)


def tree_peak_rss_bytes(pids: list[int]) -> int:
    """Sum of each process's own peak: an upper bound of the tree's simultaneous peak."""
    return sum(peak_rss_bytes(p) for p in pids)


def system_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, over all cores (/proc/stat)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0.0, 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return (total - idle) / CLK_TCK, total / CLK_TCK


def system_stall_seconds() -> tuple[float, float]:
    """(iowait, steal) CPU seconds of the whole machine since boot: waiting for the disk,
    and time the hypervisor gave this VM's cores to someone else (/proc/stat)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0.0, 0.0
    return fields[4] / CLK_TCK, (fields[7] if len(fields) > 7 else 0) / CLK_TCK
