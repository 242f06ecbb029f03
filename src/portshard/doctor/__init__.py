"""`portshard doctor`: what this machine supports, probed for real, and what each feature enables.

Design note: every probe exercises its feature on the running kernel (binds sockets, attaches
programs, steers real connections, forks a child and traps its bind()) instead of trusting the
kernel version: backports, kernel configs, seccomp profiles and container sandboxes all change the
answer. A probe reports its own failure as ok=False with the reason, so doctor never raises for a
missing feature. It never writes a sysctl, and leaves no process or fd behind: every child is
bounded by a deadline, killed if it overruns, and always reaped.
"""

from __future__ import annotations

from . import net, procs  # noqa: F401  (importing them registers their probes)
from .registry import Check, probe_all, render, to_json

__all__ = ["Check", "probe_all", "render", "to_json"]
