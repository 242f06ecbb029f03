"""What the bench ran on, and how much of the CPU was really ours during each run.

On a shared 2-vCPU machine two things distort a run: the hypervisor stealing time (``steal``
in /proc/stat) and other people's processes on the same vCPUs. Each run takes a `CpuSample`
before and after; `CpuUse` says how much of the machine was stolen, used by our own process
tree (the bench, its servers and load generators, reaped children included), and used by
everything else ("foreign").
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field

TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcCpu:
    ppid: int
    own: float  # seconds of user + system time
    reaped: float  # seconds of user + system time of its waited-for children


def scan_procs() -> dict[int, ProcCpu]:
    """Every process's parent and CPU time, from one pass over /proc/*/stat."""
    procs: dict[int, ProcCpu] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue  # exited meanwhile
        # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
        fields = raw[raw.rindex(b")") + 2 :].split()
        ppid = int(fields[1])
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
        procs[int(name)] = ProcCpu(ppid, (utime + stime) / TICK, (cutime + cstime) / TICK)
    return procs


def tree_cpu(procs: dict[int, ProcCpu], root: int) -> float:
    """CPU seconds used by ``root`` and all its descendants, the exited (reaped) ones included.

    A reaped process's time is in its parent's ``reaped``; a live one's is its ``own``; the two
    never overlap, so the sum counts each process once."""
    children: dict[int, list[int]] = {}
    for pid, p in procs.items():
        children.setdefault(p.ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        proc = procs.get(pid)
        if proc is None:
            continue
        total += proc.own + proc.reaped
        todo.extend(children.get(pid, []))
    return total


def read_stat() -> list[int]:
    """The aggregate ``cpu`` line of /proc/stat, in ticks: user nice system idle iowait irq
    softirq steal (guest time is already counted in user)."""
    with open("/proc/stat") as f:
        line = f.readline().split()
    return [int(x) for x in line[1:9]]


@dataclass(frozen=True)
class CpuSample:
    when: float
    stat: list[int]
    ours: float
    roots: dict[int, float] = field(default_factory=dict)  # whole trees
    alone: dict[int, float] = field(default_factory=dict)  # single processes (a supervisor)

    @classmethod
    def take(cls, roots: tuple[int, ...] = (), alone: tuple[int, ...] = ()) -> CpuSample:
        procs = scan_procs()
        return cls(
            time.monotonic(),
            read_stat(),
            tree_cpu(procs, os.getpid()),
            {r: tree_cpu(procs, r) for r in roots},
            {p: procs[p].own for p in alone if p in procs},
        )


@dataclass(frozen=True)
class CpuUse:
    """Shares of the whole machine (1.0 = every CPU for the whole interval), except
    ``roots`` and ``alone``: CPU seconds per second (1.0 = one CPU) for each process tree, and
    each single process, asked for."""

    wall: float
    steal: float
    busy: float
    ours: float
    foreign: float
    roots: dict[int, float]
    alone: dict[int, float]

    def as_dict(self) -> dict[str, float]:
        return {
            "wall_s": round(self.wall, 3),
            "steal": round(self.steal, 4),
            "busy": round(self.busy, 4),
            "ours": round(self.ours, 4),
            "foreign": round(self.foreign, 4),
        }


def cpu_use(a: CpuSample, b: CpuSample) -> CpuUse:
    delta = [y - x for x, y in zip(a.stat, b.stat, strict=True)]
    total = sum(delta) or 1
    idle = delta[3] + delta[4]
    steal = delta[7]
    wall = max(b.when - a.when, 1e-6)
    ncpu = os.cpu_count() or 1
    busy = (total - idle - steal) / total
    ours = min((b.ours - a.ours) / (wall * ncpu), 1.0)
    return CpuUse(
        wall=wall,
        steal=steal / total,
        busy=busy,
        ours=ours,
        foreign=max(busy - ours, 0.0),
        roots={r: (b.roots.get(r, 0.0) - a.roots.get(r, 0.0)) / wall for r in a.roots},
        alone={p: (b.alone.get(p, 0.0) - a.alone.get(p, 0.0)) / wall for p in a.alone},
    )


def _version(cmd: list[str], pattern: str) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(pattern, res.stdout + res.stderr)
    return m.group(1) if m else None


def machine_info() -> dict[str, object]:
    """The machine, the kernel and the tools, for the report's header."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    distro = ""
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    distro = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    before = read_stat()
    time.sleep(0.5)
    after = read_stat()
    delta = [y - x for x, y in zip(before, after, strict=True)]
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory_mib": mem,
        "kernel": platform.release(),
        "os": distro,
        "python": platform.python_version(),
        "wrk": _version(["wrk", "-v"], r"wrk (?:debian/)?([\w.+\-]+)"),
        "nginx": _version(["nginx", "-v"], r"nginx/([\w.\-]+)"),
        "haproxy": _version(["haproxy", "-v"], r"version ([\w.+\-]+)"),
        "steal_at_start": round(delta[7] / (sum(delta) or 1), 4),
        "busy_at_start": round(1 - (delta[3] + delta[4] + delta[7]) / (sum(delta) or 1), 4),
        "somaxconn": _read_int("/proc/sys/net/core/somaxconn"),
        "tcp_migrate_req_host": _read_int("/proc/sys/net/ipv4/tcp_migrate_req"),
    }


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None
