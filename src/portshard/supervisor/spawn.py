"""Start one worker process with its slot's sockets, the systemd way.

Design note: we fork and exec ourselves rather than use subprocess, because LISTEN_PID must be
the child's own pid (known only after fork), the parent-death signal must be set after the
uid change (changing credentials clears it), and the sockets must land on fds 3, 4, ... in order.
The supervisor is single-threaded, so running Python between fork and exec is safe. An exec
failure is reported through a close-on-exec pipe, as subprocess does.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..activation import LISTEN_FDS_START
from ..errors import SupervisorError
from ..interpose.seccomp import child_install, receive_listener

__all__ = ["Credentials", "SpawnSpec", "Spawned", "spawn"]

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Credentials:
    uid: int
    gid: int
    groups: tuple[int, ...]


@dataclass(frozen=True)
class SpawnSpec:
    argv: Sequence[str]
    env: Mapping[str, str]  # without LISTEN_* (added here)
    fds: Sequence[int]  # the slot's sockets, in LISTEN_FDS order
    names: Sequence[str]
    credentials: Credentials | None = None
    cwd: str | None = None
    seccomp: bool = False  # trap bind() (--via seccomp); the listener comes back in Spawned


@dataclass(frozen=True)
class Spawned:
    pid: int
    pidfd: int
    listener: int | None = None  # the seccomp notification fd, with SpawnSpec.seccomp


def _child(spec: SpawnSpec, err_w: int, parent: int, channel: int | None) -> None:
    """Runs in the forked child; never returns."""
    try:
        if channel is not None:
            # First, while still root if we are: then no no_new_privs is needed.
            child_install(channel, as_root=os.geteuid() == 0)
        signal.set_wakeup_fd(-1)
        for sig in (
            signal.SIGINT,
            signal.SIGTERM,
            signal.SIGHUP,
            signal.SIGCHLD,
            signal.SIGPIPE,
            signal.SIGUSR1,
            signal.SIGUSR2,
            signal.SIGQUIT,
        ):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.setpgid(0, 0)  # its own group, so a stop reaches the worker's children too
        # Move everything we keep above the target range first, then down into place.
        # Above every fd we hold, so that no move lands on a socket not moved yet (and dup3
        # never gets the same fd twice, EINVAL): steering's BPF fds pushed sockets up to it.
        count = len(spec.fds)
        high = max(LISTEN_FDS_START + count, err_w, *spec.fds) + 1
        err_w = os.dup2(err_w, high + count, inheritable=False)
        moved = [os.dup2(fd, high + i, inheritable=False) for i, fd in enumerate(spec.fds)]
        for i, fd in enumerate(moved):
            os.dup2(fd, LISTEN_FDS_START + i, inheritable=True)
        os.closerange(LISTEN_FDS_START + count, err_w)
        os.closerange(err_w + 1, 1 << 20)
        if spec.credentials is not None:
            creds = spec.credentials
            os.setgroups(list(creds.groups))
            os.setresgid(creds.gid, creds.gid, creds.gid)
            os.setresuid(creds.uid, creds.uid, creds.uid)
        # After the uid change: a credential change clears the parent-death signal.
        if _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(1)
        env = dict(spec.env)
        if count:
            env["LISTEN_PID"] = str(os.getpid())
            env["LISTEN_FDS"] = str(count)
            env["LISTEN_FDNAMES"] = ":".join(spec.names)
        else:  # --via reuseport: the program binds its own socket
            for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                env.pop(key, None)
        if spec.cwd is not None:
            os.chdir(spec.cwd)
        os.execvpe(spec.argv[0], list(spec.argv), env)
    except OSError as exc:
        code = exc.errno or errno.EINVAL
        try:
            os.write(err_w, f"{code}:{exc.strerror or exc}".encode())
        finally:
            os._exit(127)
    except BaseException:
        os._exit(127)


def spawn(spec: SpawnSpec) -> Spawned:
    """Fork and exec a worker; raise SupervisorError if the program cannot be executed."""
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    ours, theirs = socket.socketpair() if spec.seccomp else (None, None)
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(err_r)
        os.close(err_w)
        for end in (ours, theirs):
            if end is not None:
                end.close()
        raise SupervisorError(f"cannot fork a worker: {exc.strerror}") from None
    if pid == 0:  # pragma: no cover - the child execs or exits
        os.close(err_r)
        _child(spec, err_w, parent, theirs.fileno() if theirs is not None else None)
    os.close(err_w)
    if theirs is not None:
        theirs.close()
    try:
        chunks = []
        while chunk := os.read(err_r, 1024):
            chunks.append(chunk)
    finally:
        os.close(err_r)
    listener = None
    if ours is not None:
        with ours:
            try:
                listener = receive_listener(ours)
            except OSError:
                if not chunks:  # exec'd without a trap: never let it run so
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    raise SupervisorError(
                        f"worker command {spec.argv[0]!r}: the seccomp bind() trap did not "
                        f"reach the supervisor; use --via preload or fds"
                    ) from None
    if chunks:
        if listener is not None:
            os.close(listener)
        os.waitpid(pid, 0)
        code_text, _, message = b"".join(chunks).decode(errors="replace").partition(":")
        hint = ""
        if code_text == str(errno.ENOENT):
            hint = "; check the path, or that it is on PATH"
        elif code_text == str(errno.EACCES):
            hint = "; check that it is executable (chmod +x) by the worker's user"
        raise SupervisorError(f"cannot run worker command {spec.argv[0]!r}: {message}{hint}")
    return Spawned(pid, os.pidfd_open(pid), listener)
