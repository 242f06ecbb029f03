"""Decide, for one spawn, how the worker gets its sockets (``--via``), and what that changes.

``auto``: a dynamically linked program gets the LD_PRELOAD shim, a static or Go one the
seccomp trap (see elf.py). Both are safe for a program that uses LISTEN_FDS: the shim and the
trap act only on a bind() to a managed address, and such a program never makes one (it takes
fd 3), so it runs exactly as with ``fds`` (tested with the cooperative test worker).
"""

from __future__ import annotations

import itertools
import os
import shlex
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from . import elf, shim

__all__ = ["Plan", "plan", "refuse_double_take"]


@dataclass(frozen=True)
class Plan:
    mode: str  # what status shows: fds | preload | seccomp | reuseport+preload|seccomp
    seccomp: bool  # the child traps bind()
    why: str  # for the log
    warn: bool = False  # ``why`` says the mode cannot work for this program (logged WARNING)

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
    if via != "reuseport":  # every other mode passes the sockets with LISTEN_FDS
        refuse_double_take(argv, env)
    if via == "fds":
        return Plan("fds", False, "--via fds")
    program: elf.Program | None = None
    mechanism = via
    if via in ("auto", "reuseport"):
        program = elf.inspect_command(argv, env)
        mechanism = "preload" if program.libc_binds else "seccomp"
    why = program.why if program is not None else f"--via {via}"
    warn = False
    if via == "preload":
        # Asked for by name for a static or Go program: its own bind() never goes through
        # libc, so it got EADDRINUSE and the boot said "run it by hand", where it works.
        found = elf.inspect_command(argv, env)
        if not found.libc_binds:
            warn = True
            why = (
                f"--via preload, but {found.why}: the shim cannot reach a bind() it makes "
                f"itself (EADDRINUSE on the port); use --via seccomp or auto, unless it takes "
                f"its sockets from LISTEN_FDS"
            )
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
    return Plan(mode, mechanism == "seccomp", why, warn)


def _is_gunicorn(argv: Sequence[str]) -> bool:
    """``gunicorn ...``, ``/venv/bin/gunicorn ...`` or ``python3 -m gunicorn ...``."""
    if not argv:
        return False
    if os.path.basename(argv[0]).startswith("gunicorn"):
        return True
    return any(a == "-m" and b == "gunicorn" for a, b in itertools.pairwise(argv))


def _fd_binds(args: Sequence[str]) -> list[str]:
    """The ``fd://N`` addresses among gunicorn's -b/--bind options."""
    found: list[str] = []
    for i, arg in enumerate(args):
        value = None
        if arg in ("-b", "--bind") and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--bind="):
            value = arg[len("--bind=") :]
        elif arg.startswith("-b") and len(arg) > 2:
            value = arg[2:]
        if value is not None and value.startswith("fd://"):
            found.append(value)
    return found


_UWSGI_HTTP = ("--http-socket", "--http11-socket", "--https-socket")


def _refuse_uwsgi_two_protocols(argv: Sequence[str]) -> None:
    """uWSGI attaches the sockets in LISTEN_FDS as sockets of its own, speaking its default
    protocol (uwsgi's binary one, unless --protocol says otherwise), and binds --http-socket
    as well, which the shim or a --via fds mapping makes the same slot socket: one listening
    socket served in two protocols. Measured here (uWSGI 2.0.21, 2 slots, 3 reloads): every
    answer after the first reload empty, the log full of "invalid request block size"."""
    if not argv or not os.path.basename(argv[0]).startswith("uwsgi"):
        return
    args = list(argv[1:])
    names = {a.split("=", 1)[0] for a in args}
    http = next((a for a in args if a.split("=", 1)[0] in _UWSGI_HTTP), None)
    if http is None or names & {"--protocol", "--socket-protocol"}:
        return
    raise ConfigError(
        f"uwsgi {http.split('=', 1)[0]}: uWSGI serves the slot's socket from LISTEN_FDS "
        f"(which portshard always sets) with its default protocol, uwsgi's binary one, and "
        f"the same socket again for {http.split('=', 1)[0]}: most HTTP requests would get an "
        f"empty reply. Drop {http.split('=', 1)[0]} and add --protocol http, e.g. portshard "
        f"run -w 2 --listen tcp://:8000 --via fds -- uwsgi --protocol http --master "
        f"--hook-master-start 'unix_signal:15 gracefully_kill_them_all' --wsgi-file app.py "
        f"(README, Recipes)"
    )


def refuse_double_take(argv: Sequence[str], env: Mapping[str, str]) -> None:
    """gunicorn takes the sockets in LISTEN_FDS (which portshard always sets) *and* each
    ``--bind fd://N``: with both it wraps fd 3 twice, closes it once and crashes with EBADF.
    Refuse that before spawning, naming the form that works (no --bind at all). uWSGI's
    --http-socket beside LISTEN_FDS: :func:`_refuse_uwsgi_two_protocols`."""
    _refuse_uwsgi_two_protocols(argv)
    if not _is_gunicorn(argv):
        return
    try:
        extra = shlex.split(env.get("GUNICORN_CMD_ARGS", ""))
    except ValueError:
        extra = []
    binds = _fd_binds(list(argv[1:])) + _fd_binds(extra)
    if binds:
        raise ConfigError(
            f"gunicorn --bind {binds[0]}: portshard already hands gunicorn its sockets through "
            f"LISTEN_FDS, which gunicorn reads as well, so it would take the same fd twice and "
            f"crash with EBADF. Drop --bind {binds[0]}: gunicorn then serves the slot's socket "
            f"from LISTEN_FDS, e.g. portshard run -w 2 --listen tcp://:8000 --ready notify "
            f"--drain signal -- gunicorn app:app (README, Recipes)"
        )
