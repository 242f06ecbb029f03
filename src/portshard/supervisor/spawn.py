"""Start one worker process with its slot's sockets, the systemd way.

Design note: fork and exec go through ``linux.exec.fork_exec`` (an error pipe, fds placed on
3, 4, ... in order with no possible collision, the uid change, then the parent-death signal);
this module says what a worker needs: LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES, its own process
group (a stop reaches its children), default signal dispositions, optionally its own cgroup
(joined before exec, so nothing it starts escapes) and a seccomp bind() trap whose listener
comes back to the supervisor.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import SupervisorError
from ..interpose.seccomp import child_install, receive_listener
from ..linux import fdlimit
from ..linux.cgroup import Cgroup
from ..linux.exec import ChildError, Credentials, ExecSpec, fork_exec
from ..linux.syscalls import pidfd_open

__all__ = ["Credentials", "SpawnSpec", "Spawned", "spawn"]

_LISTEN_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


@dataclass(frozen=True)
class SpawnSpec:
    argv: Sequence[str]
    env: Mapping[str, str]  # without LISTEN_* (added here)
    fds: Sequence[int]  # the slot's sockets, in LISTEN_FDS order
    names: Sequence[str]
    credentials: Credentials | None = None
    cwd: str | None = None
    seccomp: bool = False  # trap bind() (--via seccomp); the listener comes back in Spawned
    cgroup: Cgroup | None = None  # the worker's own group, joined before exec
    stdio: tuple[int, int] | None = None  # fds placed on its stdout and stderr (else ours)
    orphan: bool = False  # it outlives the supervisor (a warden stops it): no death signal


@dataclass(frozen=True)
class Spawned:
    pid: int
    pidfd: int
    listener: int | None = None  # the seccomp notification fd, with SpawnSpec.seccomp


def _exec_spec(spec: SpawnSpec) -> ExecSpec:
    env = {k: v for k, v in spec.env.items() if k not in _LISTEN_ENV}
    if spec.fds:
        env["LISTEN_FDS"] = str(len(spec.fds))
        env["LISTEN_FDNAMES"] = ":".join(spec.names)
    # else --via reuseport: the program binds its own socket
    return ExecSpec(
        argv=spec.argv,
        env=env,
        fds=spec.fds,
        pid_env=("LISTEN_PID",) if spec.fds else (),
        new_group=True,  # its own group, so a stop reaches the worker's children too
        reset_signals=True,
        credentials=spec.credentials,
        death_signal=None if spec.orphan else signal.SIGKILL,
        cwd=spec.cwd,
        soft_nofile=fdlimit.original(),  # the operator's, not the supervisor's raised one
    )


def program_problem(argv0: str, path: str | None = None) -> str | None:
    """Why exec would refuse the program ``argv0`` (found on ``path``, else $PATH), in words
    that end with the fix; None if it looks runnable. `run --check` said the settings were
    fine for a directory and for a script whose '#!' interpreter is missing."""
    import shutil

    found = argv0 if os.sep in argv0 else shutil.which(argv0, mode=os.F_OK, path=path)
    where = "" if os.sep in argv0 else " on PATH"
    if not argv0.strip() or found is None or not os.path.exists(found):
        return f"the command {argv0!r} is not an executable file{where}; check the path"
    if os.path.isdir(found):
        return f"the command {argv0!r} is a directory, not a program; give the program's path"
    if not os.access(found, os.X_OK):
        return f"the command {argv0!r} is not executable; chmod +x it, or check the path"
    interpreter = _missing_interpreter(found)
    if interpreter is not None:
        return (
            f"the command {argv0!r} is a script for {interpreter!r} (its '#!' line), which "
            f"does not exist; install it, or fix the script's first line"
        )
    return None


def _missing_interpreter(program: str) -> str | None:
    """The '#!' interpreter of ``program`` if it has one that does not exist: exec then fails
    with ENOENT, which said "check the path" of a program that was there."""
    try:
        with open(program, "rb") as f:
            head = f.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].split()
    if not words:
        return None
    interpreter = os.fsdecode(words[0])
    return None if os.path.exists(interpreter) else interpreter


def _explain(argv0: str, exc: ChildError) -> SupervisorError:
    hint = ""
    found = argv0 if os.sep in argv0 else None
    if exc.errno == errno.ENOENT and found and (interpreter := _missing_interpreter(found)):
        hint = (
            f" (the interpreter {interpreter!r} of its '#!' line); install it, or fix the "
            f"script's first line"
        )
    elif exc.errno == errno.ENOENT:
        hint = "; check the path, or that it is on PATH"
    elif exc.errno == errno.ENOEXEC:
        hint = (
            "; it is not a program this machine can run (a script without a '#!' line, or a "
            "binary for another machine): add the '#!' line, or run it through its interpreter"
        )
    elif exc.errno == errno.E2BIG:  # each string is checked by config.load: all of them
        hint = (
            "; its arguments and environment (portshard's own, [env] and LISTEN_*) are "
            "more than the kernel takes together (a quarter of the stack size limit, "
            "`ulimit -s`): pass large values in a file"
        )
    elif exc.errno == errno.EACCES:
        closed = _closed_directory(argv0)
        hint = (
            f"; {closed} is closed to other users (mode {os.stat(closed).st_mode & 0o777:o}): "
            f"the worker's user cannot reach the program there (a virtualenv's python may "
            f"link into it); install it where that user can, or run without --user"
            if closed is not None
            else "; check that it is executable (chmod +x) by the worker's user"
        )
    return SupervisorError(f"cannot run worker command {argv0!r}: {exc.strerror}{hint}")


def _closed_directory(argv0: str) -> str | None:
    """The first directory on the way to the program, its links followed one by one, that
    other users cannot search: `--user nobody` with a virtualenv whose python links under
    /root (0700) was told to chmod +x a program that was executable."""
    import shutil

    found = argv0 if os.sep in argv0 else shutil.which(argv0)
    if found is None:
        return None
    path = os.path.abspath(found)
    for _ in range(40):  # the kernel's own limit on links followed
        chain = []
        directory = os.path.dirname(path)
        while directory not in chain:
            chain.append(directory)
            directory = os.path.dirname(directory)
        for directory in reversed(chain):
            try:
                if not os.stat(directory).st_mode & 0o001:
                    return directory
            except OSError:
                return None
        if not os.path.islink(path):
            return None
        path = os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(path)))
    return None


def spawn(spec: SpawnSpec) -> Spawned:
    """Fork and exec a worker; raise SupervisorError if the program cannot be executed."""
    ours, theirs = socket.socketpair() if spec.seccomp else (None, None)

    def setup() -> None:
        if spec.stdio is not None:  # --log-format json: the supervisor reads its output
            os.dup2(spec.stdio[0], 1)
            os.dup2(spec.stdio[1], 2)
        if spec.cgroup is not None:  # first: everything the worker ever starts stays in it
            spec.cgroup.join_self()
        if theirs is not None:
            # First, while still root if we are: then no no_new_privs is needed.
            child_install(theirs.fileno(), as_root=os.geteuid() == 0)

    try:
        pid = fork_exec(_exec_spec(spec), setup=setup)
    except OSError as exc:
        if ours is not None:
            ours.close()
        if isinstance(exc, ChildError):
            raise _explain(spec.argv[0], exc) from None
        raise SupervisorError(f"cannot fork a worker: {exc.strerror}") from None
    finally:
        if theirs is not None:
            theirs.close()
    listener = None
    if ours is not None:
        with ours:
            try:
                listener = receive_listener(ours)
            except OSError:  # exec'd without a trap: never let it run so
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise SupervisorError(
                    f"worker command {spec.argv[0]!r}: the seccomp bind() trap did not "
                    f"reach the supervisor; use --via preload or fds"
                ) from None
    return Spawned(pid, pidfd_open(pid), listener)
