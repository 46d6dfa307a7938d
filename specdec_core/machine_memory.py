"""The default cache budget, from the machine: the memory left after the loaded weights, less a
margin for the OS and other processes. No MLX here.

    budget = physical memory - the process's memory after loading - max(2 GiB, 20% of physical)

The process's memory is the larger of its resident set and its weights' bytes (on a Mac, MLX's
GPU buffers may not all show as resident). Physical memory is the container's limit where one
is set (cgroup v2 or v1). A tensor-parallel target whose ranks share the machine splits what is
left between them (each holds its share of every session's heads).
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

from .sizes import GIB, format_bytes

MARGIN_FLOOR = 2 * GIB
MARGIN_SHARE = 0.20
_CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def physical_bytes() -> int:
    """The machine's memory, or the container's limit where that is lower."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for path in _CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))  # v1 writes a huge number for "no limit": min keeps total
    return total


def resident_bytes() -> int:
    """This process's resident memory now (on macOS its peak so far, which the kernel reports)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, others KiB


@dataclass(frozen=True)
class MachineBudget:
    """The default ``--cache-memory`` and the figures it came from."""

    physical: int
    in_use: int  # this process after loading (resident, or its weights' bytes if more)
    margin: int
    ranks: int = 1  # tensor-parallel ranks on this machine, each as big as this one

    @property
    def bytes(self) -> int:
        return (self.physical - self.ranks * self.in_use - self.margin) // self.ranks

    def describe(self) -> str:
        ranks = f"{self.ranks} ranks x " if self.ranks > 1 else ""
        share = f", split over {self.ranks} ranks" if self.ranks > 1 else ""
        return (f"{format_bytes(self.physical)} physical - {ranks}{format_bytes(self.in_use)} in use after "
                f"loading - {format_bytes(self.margin)} margin (max(2 GiB, 20% of physical)){share}")


def margin_for(physical: int) -> int:
    """What the default budget leaves to the OS and other processes: max(2 GiB, 20%)."""
    return max(MARGIN_FLOOR, int(MARGIN_SHARE * physical))


def machine_budget(weight_bytes: int = 0, ranks: int = 1) -> MachineBudget:
    """The default cache budget of a process that has loaded ``weight_bytes`` of weights."""
    physical = physical_bytes()
    return MachineBudget(physical, max(resident_bytes(), weight_bytes), margin_for(physical), ranks)
