"""What this machine, or the container it runs in, lets one process use: memory and cores, cgroup limits included
(a container sees the whole machine's RAM and every core of its node; its cgroup says what it may use).

Example::

    host_memory_bytes()   # RAM, or the container's memory limit where lower
    host_cores()          # CPU affinity, capped by the container's CPU quota (whole CPUs, at least 1)
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # v2, v1


def host_memory_bytes() -> int:
    """The memory this process may use: the machine's RAM, or its cgroup's limit (a container's) where lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in CGROUP_MEMORY_LIMITS:
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


# A container's CPU quota: cgroup v2 ("<quota> <period>" or "max <period>"), v1 (quota -1: none; period beside it)
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"
CGROUP_V1_CPU_QUOTA = ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def host_cores() -> int:
    """The cores this process may use: its CPU affinity (else the machine's count), capped by its container's CPU
    quota in whole CPUs (a Kubernetes CPU limit shows every core of the node to ``sched_getaffinity``; torch
    threads past the quota are throttled, and one throttled thread stalls the others at each barrier). Ray counts a
    container's CPUs the same way (quota, rounded down, at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return cores if quota is None else max(1, min(cores, int(quota)))


def cgroup_cpu_quota() -> float | None:
    """The CPUs this process's container may use per period (e.g. 2.5), or None where no quota is set."""
    try:
        quota, period = Path(CGROUP_CPU_MAX).read_text().split()
    except OSError:  # no cgroup v2 file: v1's pair, or not in a container
        try:
            quota, period = (Path(f).read_text() for f in CGROUP_V1_CPU_QUOTA)
        except OSError:
            return None
    except ValueError:
        return None
    try:
        value = float(quota) / float(period)  # "max" (v2) is no number: no quota
    except (ValueError, ZeroDivisionError):
        return None
    return value if value > 0 else None  # v1 says -1 for none
