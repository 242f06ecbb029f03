"""The supervisor's file descriptor limit (RLIMIT_NOFILE): raised for itself, kept for workers.

The supervisor holds a socket per slot and listen address, a pidfd per worker (two per slot
during a reload), its BPF maps and programs, the warden's channel, the control and health
sockets: 27 at rest plus 2 per slot (one listen address). A shell's soft limit is often 1024
(16 workers fit, 1,024 do not) and a container's or a test's can be far lower; the first
descriptor over the limit failed with EMFILE somewhere in the set-up, a traceback. So:

- ``raise_soft()`` at start: the soft limit goes up to the hard one, as Go's runtime does
  for every Go program (since 1.19). Only the supervisor (and the warden it forks, which holds
  a copy of every fd) runs with it;
- a worker gets the soft limit the operator set (``ExecSpec.soft_nofile`` = :func:`original`,
  set between fork and exec: a select()-based program breaks above 1024), as Go's os/exec
  does; the warden keeps the raised one;
- :func:`refusal`: what is left still too low for ``--workers`` is refused up front, with
  what is needed and how to raise it; ``portshard scale`` is refused the same way.

An upgrade's new image inherits the raised limit: the operator's soft limit goes with it in
``PORTSHARD_NOFILE_SOFT`` (:func:`successor_env`).
"""

from __future__ import annotations

import os
import resource
from collections.abc import MutableMapping

__all__ = [
    "ENV",
    "limit",
    "needed",
    "original",
    "raise_soft",
    "refusal",
    "successor_env",
]

ENV = "PORTSHARD_NOFILE_SOFT"
FIXED = 27 + 64 + 32  # at rest, the control endpoint's reserve, transient (spawns, /proc, diag)
PER_SLOT = 2  # a pidfd for each of a slot's two workers during a reload
PER_CAPTURED = 2  # a worker's stdout and stderr pipes (JSON logs)

_original: int | None = None  # the soft limit the operator set; None until raise_soft()


def raise_soft() -> tuple[int, int]:
    """Raise the soft limit to the hard one; returns (the operator's soft limit, the new
    soft limit). Nothing changes if the kernel refuses."""
    global _original
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    inherited = os.environ.pop(ENV, "")
    _original = int(inherited) if inherited.isdigit() else soft
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):
            return _original, soft
        return _original, hard
    return _original, soft


def original() -> int | None:
    """The soft limit the operator set, if raise_soft() raised it (for the workers)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return _original if _original is not None and _original < soft else None


def successor_env(env: MutableMapping[str, str]) -> None:
    """An upgrade's new image keeps the operator's soft limit for its workers."""
    if _original is not None:
        env[ENV] = str(_original)


def limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def needed(workers: int, addresses: int, *, captured: bool = False) -> int:
    """Descriptors the supervisor needs for ``workers`` slots of ``addresses`` sockets each."""
    per_slot = addresses + PER_SLOT + (PER_CAPTURED * 2 if captured else 0)
    return FIXED + workers * per_slot


def refusal(workers: int, addresses: int, *, captured: bool = False) -> str | None:
    """Why ``workers`` slots do not fit under the limit (with the fix), or None if they do."""
    need, have = needed(workers, addresses, captured=captured), limit()
    if need <= have:
        return None
    fit = max(0, (have - FIXED) // (needed(1, addresses, captured=captured) - FIXED))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    room = f"enough for {fit} worker(s)" if fit else "too few for one worker"
    return (
        f"{workers} workers need about {need} file descriptors in the supervisor, and its "
        f"limit is {have} (RLIMIT_NOFILE, hard limit {hard}: {room}); raise it with "
        f"`ulimit -n {need}` before portshard run (above the hard limit needs root) or "
        f"LimitNOFILE={need} in its systemd unit, or run fewer workers"
    )
