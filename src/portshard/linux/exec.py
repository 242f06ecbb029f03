"""Fork and exec a program, with an error pipe and fd placement that cannot collide.

Design note: we fork and exec by hand rather than use subprocess because callers need code
between fork and exec that subprocess cannot run in order: a seccomp filter installed as
root, joining a cgroup before the program exists, fds placed at fixed numbers, then the uid
change, and the parent-death signal last (a credential change clears it). The supervisor is
single-threaded, so running Python between fork and exec is safe. Anything that fails in the
child before exec comes back over a close-on-exec pipe as ``errno:message`` and is raised
in the parent as :class:`ChildError`; a successful exec closes the pipe (EOF, no bytes).

Placing fds (:func:`place_fds`): the sources are wherever the parent had them, which can be
anywhere, including inside the target range 3..3+N-1 and in any order (a supervisor with 16
slots holds 16+ sockets, pidfds, pipes; slot 9's sockets may sit at fds 3..5). So every fd
we keep is first copied with ``F_DUPFD_CLOEXEC`` at or above 3+N: that call takes the lowest
*free* number, so it never overwrites anything, and no copy lands in the target range. Then
each copy is dup2()ed down to its target (overwriting only originals, which have copies),
and everything else above 2 is closed. The earlier "move above the range, then down" code
picked the high numbers itself and overwrote sources sitting there (EINVAL from dup3 when a
source already was at its chosen number: "Invalid argument" with 16 workers).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import resource
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

from .syscalls import set_parent_death_signal

__all__ = [
    "FIRST_FD",
    "ChildError",
    "Credentials",
    "ExecSpec",
    "fork_call",
    "fork_exec",
    "place_fds",
]

FIRST_FD = 3  # where passed fds start (systemd's SD_LISTEN_FDS_START)
_MAX_REPORT = 4096

_RESET_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGCHLD,
    signal.SIGPIPE,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGQUIT,
    signal.SIGALRM,
)


@dataclass(frozen=True)
class Credentials:
    uid: int
    gid: int
    groups: tuple[int, ...]


@dataclass(frozen=True)
class ExecSpec:
    """What the child becomes; the steps run in this order after ``setup``."""

    argv: Sequence[str]
    env: Mapping[str, str]
    fds: Sequence[int] = ()  # placed at 3, 4, ... in this order, inheritable
    close_others: bool = True  # close every other fd above 2 (False: inherit them all)
    pid_env: Sequence[str] = ()  # environment variables set to the child's own pid
    new_group: bool = False  # setpgid(0, 0)
    reset_signals: bool = False  # default dispositions, empty mask, no wakeup fd
    credentials: Credentials | None = None
    death_signal: int | None = signal.SIGKILL  # sent to the child when we die
    cwd: str | None = None
    soft_nofile: int | None = None  # the soft RLIMIT_NOFILE it starts with (None: ours)


class ChildError(OSError):
    """A step in the child before exec failed (or exec itself): ``errno`` and ``strerror``
    are the child's."""


def place_fds(fds: Sequence[int], keep: Sequence[int] = (), *, start: int = FIRST_FD) -> list[int]:
    """Put ``fds[i]`` at ``start + i`` (inheritable); keep ``keep`` open, close-on-exec, at new
    numbers (returned, in order); close every other fd from ``start`` up. Sources may sit
    anywhere, the target range included, in any order, and may repeat. See the module note
    for why this cannot collide.
    """
    floor = start + len(fds)
    copies = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor) for fd in fds]
    kept = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor) for fd in keep]
    for i, copy in enumerate(copies):
        os.dup2(copy, start + i, inheritable=True)  # copy >= floor > start + i: never equal
    _close_except(floor, set(kept))
    return kept


def _close_except(low: int, keep: set[int]) -> None:
    """Close every fd >= ``low`` except ``keep`` (close_range(2) under os.closerange)."""
    for fd in sorted(keep):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, 1 << 20)


class _Report:
    """The child's end of the error pipe (its number changes when fds are placed), and the
    parent's pid taken before fork (getppid() after it may already be 1)."""

    def __init__(self, fd: int, parent: int) -> None:
        self.fd = fd
        self.parent = parent

    def fail(self, exc: BaseException) -> NoReturn:
        try:
            if isinstance(exc, OSError):
                code = exc.errno or errno.EINVAL
                text = f"{code}:{exc.strerror or exc}"
            else:
                text = f"{errno.EINVAL}:{type(exc).__name__}: {exc}"
            os.write(self.fd, text.encode(errors="replace")[:_MAX_REPORT])
        finally:
            os._exit(127)


def _fork(child: Callable[[_Report], NoReturn]) -> int:
    """Fork; run ``child`` in the child; in the parent, wait until the child closed the error
    pipe (exec, or ``child`` said it is running) and raise what it reported, if anything."""
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError:
        os.close(err_r)
        os.close(err_w)
        raise
    if pid == 0:  # pragma: no cover - the child execs or exits
        report = _Report(err_w, parent)
        try:
            os.close(err_r)
            child(report)
        except BaseException as exc:
            report.fail(exc)
    os.close(err_w)
    try:
        chunks = []
        while chunk := os.read(err_r, _MAX_REPORT):
            chunks.append(chunk)
    finally:
        os.close(err_r)
    if chunks:
        os.waitpid(pid, 0)
        code_text, _, message = b"".join(chunks).decode(errors="replace").partition(":")
        code = int(code_text) if code_text.isdigit() else errno.EINVAL
        raise ChildError(code, message)
    return pid


def _become(spec: ExecSpec, setup: Callable[[], None] | None, report: _Report) -> NoReturn:
    if setup is not None:
        setup()
    if spec.reset_signals:
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(-1)
        for sig in _RESET_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
    if spec.new_group:
        os.setpgid(0, 0)
    if spec.close_others:
        (report.fd,) = place_fds(spec.fds, [report.fd])
    elif spec.fds:
        raise OSError(errno.EINVAL, "placing fds needs close_others")
    if spec.soft_nofile is not None:  # after place_fds: it may need fds above this limit
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (spec.soft_nofile, hard))
    if spec.credentials is not None:
        creds = spec.credentials
        os.setgroups(list(creds.groups))
        os.setresgid(creds.gid, creds.gid, creds.gid)
        os.setresuid(creds.uid, creds.uid, creds.uid)
    if spec.death_signal is not None:
        # After the uid change: a credential change clears the parent-death signal.
        set_parent_death_signal(spec.death_signal)
        if os.getppid() != report.parent:  # it died before that: we would be orphaned
            os._exit(1)
    env = dict(spec.env)
    for name in spec.pid_env:
        env[name] = str(os.getpid())
    if spec.cwd is not None:
        os.chdir(spec.cwd)
    os.execvpe(spec.argv[0], list(spec.argv), env)


def fork_exec(spec: ExecSpec, *, setup: Callable[[], None] | None = None) -> int:
    """Fork and exec ``spec``; return the pid once the program runs.

    ``setup`` runs first in the child, with the parent's credentials (install a seccomp
    filter, join a cgroup); an OSError it raises is reported like any other step's. Raises
    :class:`ChildError` if a step or the exec failed (the child has then been reaped).
    """
    return _fork(lambda report: _become(spec, setup, report))


def fork_call(body: Callable[[], int], *, death_signal: int | None = signal.SIGKILL) -> int:
    """Fork and run ``body()`` in the child, which exits with what it returns (1 if it
    raises). Returns the pid once the child runs ``body`` (its parent-death signal set)."""

    def child(report: _Report) -> NoReturn:
        if death_signal is not None:
            set_parent_death_signal(death_signal)
            if os.getppid() != report.parent:
                os._exit(1)
        os.close(report.fd)  # EOF: the parent returns
        code = 1
        try:
            code = body()
        finally:
            os._exit(code)

    return _fork(child)
