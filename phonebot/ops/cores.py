"""How many cores this process may use: its CPU affinity and its cgroup's CPU limit.

Why: `os.cpu_count()` is the machine's count. The inference pools (Smart Turn, the
offline Whisper and Piper) run one thread per core, and a server in a container with a CPU
limit (a Kubernetes pod's `resources.limits.cpu`, `docker run --cpus`) or pinned with
`taskset` gets fewer cores than the machine has. On a 32-core node a pod limited to 2 CPUs
started 32 Smart Turn threads per worker: when many turns end at once they run together,
the pod spends its CFS quota early in each period (100 ms), and the kernel then stops every
thread of the pod, the event loops that pace each call's audio among them, until the next.

Python 3.13's `os.process_cpu_count()` reads the affinity only. joblib's
`loky.cpu_count()` reads both, but importing it costs each server process ~13 MB of RSS and
~70 ms (measured with NumPy already loaded) for these few lines of the kernel's documented
files (cgroup v2 `cpu.max`; v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["cgroup_cpu_limit", "usable_cores"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


def usable_cores(
    cgroup_root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP
) -> int:
    """The cores this process can run on at once: its affinity mask, capped by its
    cgroup's CPU limit rounded up (a limit of 1.5 CPUs keeps two threads busy), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no affinity mask, no cgroups
        return os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_root, proc_self_cgroup)
    if limit is not None:
        cores = min(cores, math.ceil(limit))
    return max(1, cores)


def cgroup_cpu_limit(
    cgroup_root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP
) -> float | None:
    """CPUs' worth of time per period this process's cgroup may use (quota / period), the
    tightest along its path to the root; None when there is no limit or no cgroup.

    A cgroup's limit binds everything under it, so a limit set on a parent (a systemd
    slice, a pod whose containers sit below it) counts as much as the process's own.
    Inside a container with its own cgroup namespace the path is "/", the container's.
    """
    limits = [
        limit
        for directory in _own_cgroup_and_parents(cgroup_root, proc_self_cgroup)
        if (limit := _limit_in(directory)) is not None
    ]
    return min(limits, default=None)


def _own_cgroup_and_parents(cgroup_root: Path, proc_self_cgroup: Path) -> list[Path]:
    """The process's cgroup directories (v2, and v1's cpu controller), deepest first."""
    try:
        lines = proc_self_cgroup.read_text().splitlines()
    except OSError:
        return []
    directories = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2: "0::/path"
            # Mounted at the root, or beside v1's at "unified" (systemd's hybrid layout).
            unified = (cgroup_root / "cgroup.controllers").exists()
            base = cgroup_root if unified else cgroup_root / "unified"
        elif "cpu" in controllers.split(","):  # cgroup v1: "4:cpu,cpuacct:/path"
            base = cgroup_root / controllers
            if not base.is_dir():
                base = cgroup_root / "cpu"
        else:
            continue
        directory = base / path.strip("/")
        while True:
            directories.append(directory)
            if directory == base:
                break
            directory = directory.parent
    return directories


def _limit_in(directory: Path) -> float | None:
    """The CPU limit set in this one cgroup directory, if any."""
    try:  # cgroup v2: "max 100000" (none) or "200000 100000" (2 CPUs)
        quota, period = (directory / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1: a quota of -1 is none
        quota_us = int((directory / "cpu.cfs_quota_us").read_text())
        period_us = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None
