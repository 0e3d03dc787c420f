"""The cores a server process may use (phonebot.ops.cores): affinity and cgroup CPU limits.

The cgroup trees are written by hand in a temporary folder in the kernel's documented
formats (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), so every layout
is tested whatever this machine's own is; the pools' sizes are checked in a child process
whose affinity is set to one core.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from phonebot.ops import cores
from phonebot.ops.cores import cgroup_cpu_limit, usable_cores

ROOT = Path(__file__).resolve().parents[1]


def cgroup_file(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def self_cgroup(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proc-self-cgroup"
    path.write_text(text)
    return path


V2 = {"cgroup.controllers": "cpu memory\n"}  # cgroup v2 mounted at the root

# (files under the cgroup mount, /proc/self/cgroup, the limit expected)
LAYOUTS = {
    "v2: quota over period": (
        {**V2, "kubepods/pod1/app/cpu.max": "150000 100000\n"},
        "0::/kubepods/pod1/app\n",
        1.5,
    ),
    # A pod's limit sits on the pod's cgroup, above its containers'.
    "v2: a parent's tighter limit binds": (
        {
            **V2,
            "kubepods/pod1/cpu.max": "200000 100000\n",
            "kubepods/pod1/app/cpu.max": "400000 100000\n",
        },
        "0::/kubepods/pod1/app\n",
        2.0,
    ),
    "v2: max is no limit": (
        {**V2, "system.slice/cpu.max": "max 100000\n"},
        "0::/system.slice\n",
        None,
    ),
    "v2: a zero period is no limit": ({**V2, "pod/cpu.max": "100000 0\n"}, "0::/pod\n", None),
    "v2: a garbled file is no limit": ({**V2, "pod/cpu.max": "lots\n"}, "0::/pod\n", None),
    "v1: the cpu controller's quota": (
        {
            "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n",
            "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
            "cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
            "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        },
        "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n",
        0.5,
    ),
    "v1: a quota of -1 is no limit": (
        {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
        "4:cpu,cpuacct:/\n",
        None,
    ),
    # Docker on cgroup v1: /proc/self/cgroup names the host's path, which the container's
    # mount does not have; its root is the container's cgroup.
    "v1: no cgroup namespace": (
        {"cpu,cpuacct/cpu.cfs_quota_us": "150000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
        "4:cpu,cpuacct:/kubepods/burstable/pod1/abc\n",
        1.5,
    ),
    # Some systems mount "cpu,cpuacct" and link "cpu" to it; others only have "cpu".
    "v1: the controller list under cpu": (
        {"cpu/x/cpu.cfs_quota_us": "300000\n", "cpu/x/cpu.cfs_period_us": "100000\n"},
        "4:cpu,cpuacct:/x\n",
        3.0,
    ),
    "hybrid: v2 under unified": (
        {
            "unified/user.slice/cpu.max": "300000 100000\n",
            "cpu/cpu.cfs_quota_us": "-1\n",
            "cpu/cpu.cfs_period_us": "100000\n",
        },
        "1:cpu:/\n0::/user.slice\n",
        3.0,
    ),
}


@pytest.mark.parametrize("files, proc_text, limit", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_the_cgroup_cpu_limit_in_each_layout(tmp_path, files, proc_text, limit):
    root = tmp_path / "fs"
    for relative, text in files.items():
        cgroup_file(root, relative, text)
    assert cgroup_cpu_limit(root, self_cgroup(tmp_path, proc_text)) == limit


def test_no_proc_self_cgroup_is_no_limit(tmp_path):
    assert cgroup_cpu_limit(tmp_path, tmp_path / "no-such-file") is None


def test_a_cgroup_name_that_is_not_utf8_is_still_found(tmp_path):
    root = tmp_path / "fs"
    cgroup_file(root, "cgroup.controllers", "cpu\n")
    name = b"caf\xe9".decode(errors="surrogateescape")
    cgroup_file(root, f"{name}/cpu.max", "100000 100000\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_bytes(b"0::/caf\xe9\n")
    assert cgroup_cpu_limit(root, proc) == 1.0


def test_an_unreadable_cgroup_leaves_the_affinity(tmp_path, monkeypatch):
    """usable_cores runs at import: whatever the cgroup files do, it answers."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cores, "cgroup_cpu_limit", denied)
    assert usable_cores(tmp_path, tmp_path / "proc-self-cgroup") == 3


def test_usable_cores_is_the_affinity_capped_by_the_limit_rounded_up(tmp_path, monkeypatch):
    root = tmp_path / "fs"
    cgroup_file(root, "cgroup.controllers", "cpu\n")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    proc = self_cgroup(tmp_path, "0::/pod\n")
    cgroup_file(root, "pod/cpu.max", "150000 100000\n")
    assert usable_cores(root, proc) == 2
    cgroup_file(root, "pod/cpu.max", "20000 100000\n")  # a fifth of a CPU: still one thread
    assert usable_cores(root, proc) == 1
    cgroup_file(root, "pod/cpu.max", "max 100000\n")
    assert usable_cores(root, proc) == 32
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert usable_cores(root, proc) == 1


def test_this_machines_reading_is_no_more_than_its_cores():
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux and at least two cores to tell one from the machine's count",
)
def test_a_process_pinned_to_one_core_sizes_every_inference_pool_to_one():
    """What `taskset -c 0 python server.py` (or a pod with a 1-CPU limit) gets: one thread
    per pool, where `os.cpu_count()` would have given the machine's count."""
    script = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "from phonebot.ai.inference.turn import SMART_TURN_THREADS\n"
        "from phonebot.ai.offline.piper_voice import SYNTHESIS_THREADS\n"
        "from phonebot.ai.offline.whisper import DECODE_THREADS\n"
        "print(SMART_TURN_THREADS, SYNTHESIS_THREADS, DECODE_THREADS, os.cpu_count())\n"
    )
    child = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert child.returncode == 0, child.stderr[-2000:]
    out = child.stdout.split()
    assert out[:3] == ["1", "1", "1"] and int(out[3]) >= 2


def test_the_pools_share_one_reading(monkeypatch):
    """Smart Turn, Whisper and Piper are sized at import from one reading of the cgroup."""
    readings = []
    reading = cores.cgroup_cpu_limit
    monkeypatch.setattr(cores, "cgroup_cpu_limit", lambda *a: readings.append(a) or reading(*a))
    cores.process_cores.cache_clear()
    try:
        assert cores.process_cores() == cores.process_cores() == usable_cores()
        assert len(readings) == 2  # one for both process_cores() calls, one for usable_cores()
    finally:
        cores.process_cores.cache_clear()
