"""How many cores this process may use: its CPU affinity and its cgroup's CPU limit.

Why: `os.cpu_count()` is the machine's count. The inference pools (Smart Turn, the
offline Whisper and Piper) run one thread per core, and a server in a container with a CPU
limit (a Kubernetes pod's `resources.limits.cpu`, `docker run --cpus`) or pinned with
`taskset` gets fewer cores than the machine has. Sized by the machine, a pod limited to 2
CPUs on a 32-core node would start 32 Smart Turn threads per worker; when many turns end at
once they would run together, spend the pod's CFS quota early in each period (100 ms), and
the kernel would then stop every thread of the pod, the event loops that pace each call's
audio among them, until the next. Sizing the pools to the limit makes that less likely; it
can't rule it out (the pool and the event loops together can still overrun the quota).

Python 3.13's `os.process_cpu_count()` reads the affinity only. joblib's
`loky.cpu_count()` reads both, but importing it costs each server process ~13 MB of RSS and
~70 ms (measured with NumPy already loaded) for these few lines of the kernel's documented
files (cgroup v2 `cpu.max`; v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`).
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

from loguru import logger

__all__ = ["cgroup_cpu_limit", "process_cores", "usable_cores"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


@functools.cache
def process_cores() -> int:
    """`usable_cores()` for this process, read once: the three pools sized at import share
    the one reading (and an unreadable cgroup is warned about once, not per pool)."""
    return usable_cores()


def usable_cores(
    cgroup_root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP
) -> int:
    """The cores this process can keep busy at once: its affinity mask, capped by its
    cgroup's CPU limit rounded up (1.5 CPUs' worth of time needs two threads to use), at
    least 1. Never raises: the pools are sized at import, and an unreadable cgroup (a
    sandbox that denies the files, a name that is not UTF-8) leaves the affinity alone."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no affinity mask, no cgroups
        return os.cpu_count() or 1
    try:
        limit = cgroup_cpu_limit(cgroup_root, proc_self_cgroup)
    except Exception as error:  # noqa: BLE001 - any surprise: the affinity still holds
        logger.warning(f"CPU limit unreadable ({error!r}): sizing pools by CPU affinity")
        limit = None
    if limit is not None:
        cores = min(cores, math.ceil(limit))
    return max(1, cores)


def cgroup_cpu_limit(
    cgroup_root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP
) -> float | None:
    """CPUs' worth of time per period this process's cgroup may use (quota / period), the
    tightest along its path to the root; None when there is no limit or no cgroup found.

    A cgroup's limit binds everything under it, so a limit set on a parent (a systemd
    slice, a pod whose containers sit below it) counts as much as the process's own.
    Inside a container with its own cgroup namespace the path is "/", the container's;
    without one (cgroup v1 Docker) the path is the host's, absent from the container's
    mount, and the walk up ends at the mount's root, which is the container's cgroup.
    cgroups mounted elsewhere than `cgroup_root` are not looked for: no limit is found.
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
        # surrogateescape: a cgroup name that is not UTF-8 still maps to its directory.
        lines = proc_self_cgroup.read_text(errors="surrogateescape").splitlines()
    except OSError:
        return []
    directories = []
    for line in lines:  # "hierarchy-ID:controller-list:cgroup-path"
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        base = _mount_of(hierarchy, controllers, cgroup_root)
        if base is None:
            continue
        directory = base / path.strip("/")
        while base in directory.parents:
            directories.append(directory)
            directory = directory.parent
        directories.append(base)
    return directories


def _mount_of(hierarchy: str, controllers: str, cgroup_root: Path) -> Path | None:
    """Where a /proc/self/cgroup line's hierarchy is mounted: v2 ("0::") at the root, or
    beside v1's at "unified" (systemd's hybrid layout); v1's cpu controller in its own
    directory ("cpu,cpuacct", or "cpu" where that name is a link); None for the others."""
    if hierarchy == "0" and controllers == "":
        unified = (cgroup_root / "cgroup.controllers").exists()
        return cgroup_root if unified else cgroup_root / "unified"
    if "cpu" not in controllers.split(","):
        return None
    joined = cgroup_root / controllers
    return joined if joined.is_dir() else cgroup_root / "cpu"


def _limit_in(directory: Path) -> float | None:
    """The CPU limit set in this one cgroup directory, if any."""
    try:  # cgroup v2: "max 100000" (none) or "200000 100000" (2 CPUs)
        quota, period = (directory / "cpu.max").read_text().split()
        return None if quota == "max" else _ratio(int(quota), int(period))
    except (OSError, ValueError):
        pass
    try:  # cgroup v1: a quota of -1 is none
        quota_us = int((directory / "cpu.cfs_quota_us").read_text())
        period_us = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return _ratio(quota_us, period_us)


def _ratio(quota: int, period: int) -> float | None:
    return quota / period if quota > 0 and period > 0 else None
