"""Readers of a worker's process tree in /proc, for the supervisor's checks.

Kept verbatim from loop.py (the kernel helper's branch moves these five into the Linux package;
the integrator re-points the imports).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .. import inspect

if TYPE_CHECKING:
    from .worker import Slot

__all__ = ["held_connections", "process_tree", "slot_inodes", "tree_stopped", "worker_cpu"]


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (via /proc/PID/task/*/children; cheap, no /proc scan)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{current}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
            except OSError:
                continue
    return tree


def tree_stopped(pid: int) -> bool:
    """Every process of the tree is stopped (state T), or gone."""
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("T", "t", "Z", "X"):
            return False
    return True


def held_connections(pid: int, listeners: set[int], ports: set[int]) -> int:
    """Client connections (local port one of ``ports``) that the process tree holds.

    First the tree's own fd tables (microseconds): no socket besides the listeners means
    nothing is held. Only otherwise walk the socket table (sock_diag, filtered by state in
    the kernel) for live connections on our ports (a DB connection does not count).
    """
    tree = process_tree(pid)
    if not set().union(*(inspect.sockets_of(member) for member in tree)) - listeners:
        return 0
    return sum(inspect.connections_by_pid(tree, ports=ports).values())


def slot_inodes(slot: Slot) -> set[int]:
    return {os.fstat(sock.fileno()).st_ino for sock in slot.socks}


_TICKS = os.sysconf("SC_CLK_TCK")


def worker_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) the process has used, from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS
