"""Decide, for one spawn, how the worker gets its sockets (``--via``), and what that changes.

``auto``: a dynamically linked program gets the LD_PRELOAD shim, a static or Go one the
seccomp trap (see elf.py). Both are safe for a program that uses LISTEN_FDS: the shim and the
trap act only on a bind() to a managed address, and such a program never makes one (it takes
fd 3), so it runs exactly as with ``fds`` (tested with the cooperative test worker).
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from . import elf, shim

__all__ = ["Plan", "plan"]


@dataclass(frozen=True)
class Plan:
    mode: str  # what status shows: fds | preload | seccomp | reuseport+preload|seccomp
    seccomp: bool  # the child traps bind()
    why: str  # for the log

    @property
    def reuseport(self) -> bool:
        """The program binds its own socket; portshard only sets SO_REUSEPORT on it."""
        return self.mode.startswith("reuseport")


def plan(
    via: str,
    argv: Sequence[str],
    env: MutableMapping[str, str],
    *,
    inodes: Sequence[int],
    ports: Sequence[int],
    uid: int | None,
) -> Plan:
    """Pick the mode and edit ``env`` (the worker's environment) for it.

    ``inodes``: the slot's sockets (passed at fds 3...; none with ``reuseport``); ``ports``:
    the served ports (``reuseport`` sets SO_REUSEPORT for those only); ``uid``: the worker's
    user if it differs from ours (the shim must be readable by it).
    """
    shim.remove_shim(env)
    if via == "fds":
        return Plan("fds", False, "--via fds")
    program: elf.Program | None = None
    mechanism = via
    if via in ("auto", "reuseport"):
        program = elf.inspect_command(argv, env)
        mechanism = "preload" if program.libc_binds else "seccomp"
    why = program.why if program is not None else f"--via {via}"
    if mechanism == "preload":
        try:
            path = shim.shim_for(uid)
        except ConfigError as exc:
            if via != "auto":
                raise
            # auto must never break a program that takes LISTEN_FDS: fall back to fds.
            return Plan("fds", False, f"{why}, but {exc}")
        shim.add_shim(env, path)
        if via == "reuseport":
            env.update(shim.reuseport_env(ports))
        else:
            env.update(shim.inherit_env(inodes))
    mode = f"reuseport+{mechanism}" if via == "reuseport" else mechanism
    return Plan(mode, mechanism == "seccomp", why)
