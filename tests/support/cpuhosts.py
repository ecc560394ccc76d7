"""Slower emulated hosts: a core of their own (``taskset``) and a share of it (a cgroup v1 CPU
quota), on top of a network namespace each (``tests.support.netns``).

    with Hosts(2) as hosts, CpuLimits([1.0, 0.5]) as cpu:
        cmd = cpu.wrap(1, hosts.wrappers[1] + [sys.executable, "-m", "mesh.stage.cli", ...])
"""

from __future__ import annotations

import os
from pathlib import Path

CPU_ROOT = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000


def available() -> bool:
    return os.geteuid() == 0 and (CPU_ROOT / "cpu.cfs_quota_us").exists()


class CpuLimits:
    """Host ``i`` runs on core ``i % cores`` with ``shares[i]`` of it (1.0: the whole core)."""

    def __init__(self, shares: list[float]):
        self.shares = shares
        tag = os.getpid() % 100000
        self.groups = [CPU_ROOT / f"mesh{tag}-host{i}" for i in range(len(shares))]
        self._cores = os.cpu_count() or 1

    def __enter__(self) -> CpuLimits:
        for group, share in zip(self.groups, self.shares, strict=True):
            group.mkdir(exist_ok=True)
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            quota = -1 if share >= 1.0 else max(1000, int(PERIOD_US * share))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        return self

    def wrap(self, i: int, command: list[str]) -> list[str]:
        """``command`` run inside host ``i``'s cgroup, on its core."""
        procs = self.groups[i] / "cgroup.procs"
        core = str(i % self._cores)
        return ["sh", "-c", f'echo $$ > {procs} && exec taskset -c {core} "$@"', "sh",
                *command]

    def __exit__(self, *exc) -> None:
        for group in self.groups:
            try:
                for pid in (group / "cgroup.procs").read_text().split():
                    (CPU_ROOT / "cgroup.procs").write_text(pid)
                group.rmdir()
            except OSError:
                pass
