"""Where the machine's CPU went during a run: every process, and the kernel's own columns.

Two snapshots (``snapshot()``) at the start and the end of a run's steady state, then
``account(before, after, roles)``: CPU seconds per role (the workers, the supervisor, the
client, the hog: pids given by the caller; ``ksoftirqd`` and everything else by name), each
CPU's columns of /proc/stat (user, system, softirq, idle, steal, ...) and what no process
that lived through both snapshots accounts for (processes that came and went, softirq time
the kernel does not charge to a process). Costs ~10 ms a snapshot (a walk of /proc).
"""

from __future__ import annotations

import os
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")
_COLUMNS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def _slices(pid: str, here: bool) -> int:
    """Times the process was put on a CPU (schedstat's third field): its wake-ups, roughly
    (only for processes of our namespace)."""
    if not here:
        return 0
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[2])
    except (OSError, IndexError, ValueError):
        return 0


def _processes() -> dict[int, tuple[str, int, bool, int]]:
    """pid -> (command name, utime + stime in ticks, in our network namespace) of every
    process now (each run has a namespace of its own: the others are other sessions')."""
    try:
        ours = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        ours = -1
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        try:
            here = os.stat(f"/proc/{entry}/ns/net").st_ino == ours
        except OSError:
            here = False
        found[int(entry)] = (name, int(fields[11]) + int(fields[12]), here, _slices(entry, here))
    return found


def _cpus() -> dict[str, list[int]]:
    with open("/proc/stat") as f:
        return {
            parts[0]: [int(x) for x in parts[1 : 1 + len(_COLUMNS)]]
            for parts in (line.split() for line in f)
            if parts and parts[0].startswith("cpu")
        }


def snapshot() -> dict[str, Any]:
    return {"procs": _processes(), "cpus": _cpus()}


def account(
    before: dict[str, Any], after: dict[str, Any], roles: dict[str, list[int]]
) -> dict[str, Any]:
    """CPU seconds between two snapshots, by role (``roles``: name -> pids; in our network
    namespace also ``client``, the load generator, and ``run``, the rest of ours), ksoftirqd,
    and other sessions' processes, and per CPU by /proc/stat column."""
    by_pid = {pid: role for role, pids in roles.items() for pid in pids}
    out: dict[str, float] = {role: 0.0 for role in roles}
    out.update(client=0.0, run=0.0, ksoftirqd=0.0, other=0.0)
    others: dict[str, float] = {}
    slices: dict[str, int] = {}
    for pid, (name, ticks, here, ran) in after["procs"].items():
        was = before["procs"].get(pid)
        if was is None or was[0] != name:
            continue  # started in between: in "unaccounted"
        seconds = (ticks - was[1]) / _TICK
        role = by_pid.get(pid) or (
            ("client" if name == "steering_load" else "run")
            if here
            else ("ksoftirqd" if name.startswith("ksoftirqd") else "other")
        )
        out[role] += seconds
        if here:
            slices[role] = slices.get(role, 0) + ran - was[3]
        if role == "other" and seconds > 0:
            others[name] = others.get(name, 0.0) + seconds
    cpus = {
        cpu: {
            col: (after["cpus"][cpu][i] - before["cpus"][cpu][i]) / _TICK
            for i, col in enumerate(_COLUMNS)
        }
        for cpu in after["cpus"]
    }
    busy = sum(v for col, v in cpus["cpu"].items() if col not in ("idle", "iowait"))
    top = sorted(others.items(), key=lambda kv: -kv[1])[:6]
    return {
        "seconds": {k: round(v, 3) for k, v in out.items()},
        "slices": slices,  # times on a CPU, by role (our namespace only)
        "busy": round(busy, 3),
        "unaccounted": round(busy - sum(out.values()), 3),
        "cpus": {cpu: {k: round(v, 3) for k, v in cols.items()} for cpu, cols in cpus.items()},
        "top_other": [[name, round(s, 3)] for name, s in top],
    }
