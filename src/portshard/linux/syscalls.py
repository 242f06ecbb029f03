"""System call numbers, ``syscall(2)`` and ``prctl(2)`` from ctypes, and pidfds.

One table per native ABI: what the seccomp trap filters (bind), what portshard calls without
a libc wrapper (seccomp, bpf, the pidfd calls) and what readiness looks for in
/proc/PID/task/TID/syscall (the waits). Every function raises OSError with the kernel's errno.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import signal
from dataclasses import dataclass

__all__ = [
    "ARCHES",
    "NR_PIDFD_GETFD",
    "NR_PIDFD_OPEN",
    "NR_PIDFD_SEND_SIGNAL",
    "Arch",
    "Waits",
    "arch_or_raise",
    "is_dumpable",
    "native_arch",
    "pidfd_getfd",
    "pidfd_open",
    "pidfd_send_signal",
    "prctl",
    "set_child_subreaper",
    "set_no_new_privs",
    "set_parent_death_signal",
    "syscall",
]


@dataclass(frozen=True)
class Waits:
    """System calls in which a thread waits for work, by where the fd is in the arguments."""

    on_fd: frozenset[int]  # ARG0 = the fd waited on
    epoll: frozenset[int]  # ARG0 = epoll fd
    poll: frozenset[int]  # ARG0 = struct pollfd *, ARG1 = nfds
    select: frozenset[int]  # ARG0 = nfds, ARG1 = fd_set *readfds
    restart: int  # restart_syscall
    # Where each poll/select/epoll wait has its timeout: (nr, arg index, kind), kind "ms" (an
    # int, -1 = none), "timespec" or "timeval" (a pointer, NULL = none).
    timeouts: tuple[tuple[int, int, str], ...] = ()


@dataclass(frozen=True)
class Arch:
    """System call numbers and the seccomp arch tag of one native ABI."""

    machine: str  # os.uname().machine
    audit_arch: int  # seccomp_data.arch (AUDIT_ARCH_*)
    nr_bind: int
    nr_seccomp: int
    nr_bpf: int
    waits: Waits


ARCHES: dict[str, Arch] = {
    # AUDIT_ARCH_* = EM_* | __AUDIT_ARCH_64BIT (0x80000000) | __AUDIT_ARCH_LE (0x40000000)
    # arch/x86/entry/syscalls/syscall_64.tbl
    "x86_64": Arch(
        "x86_64",
        0xC000003E,
        nr_bind=49,
        nr_seccomp=317,
        nr_bpf=321,
        waits=Waits(
            # accept accept4 recvfrom recvmsg recvmmsg read readv
            on_fd=frozenset({43, 288, 45, 47, 299, 0, 19}),
            epoll=frozenset({232, 281, 441}),  # epoll_wait epoll_pwait epoll_pwait2
            poll=frozenset({7, 271}),  # poll ppoll
            select=frozenset({23, 270}),  # select pselect6
            restart=219,
            timeouts=(
                (232, 3, "ms"),
                (281, 3, "ms"),
                (441, 3, "timespec"),
                (7, 2, "ms"),
                (271, 2, "timespec"),
                (23, 4, "timeval"),
                (270, 4, "timespec"),
            ),
        ),
    ),
    # include/uapi/asm-generic/unistd.h (arm64 has no epoll_wait, poll or select, only p-forms)
    "aarch64": Arch(
        "aarch64",
        0xC00000B7,
        nr_bind=200,
        nr_seccomp=277,
        nr_bpf=280,
        waits=Waits(
            on_fd=frozenset({202, 242, 207, 212, 243, 63, 65}),
            epoll=frozenset({22, 441}),
            poll=frozenset({73}),
            select=frozenset({72}),
            restart=128,
            timeouts=(
                (22, 3, "ms"),
                (441, 3, "timespec"),
                (73, 2, "timespec"),
                (72, 4, "timespec"),
            ),
        ),
    ),
}
_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}

# Added after the syscall tables were unified (Linux 5.1): the same number on every arch.
NR_PIDFD_SEND_SIGNAL = 424
NR_PIDFD_OPEN = 434
NR_PIDFD_GETFD = 438

PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38


def native_arch() -> Arch | None:
    """The running ABI, or None where portshard has no syscall table for it."""
    machine = os.uname().machine
    return ARCHES.get(_ALIASES.get(machine, machine))


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return ret


def _syscall_name(nr: int) -> str:
    names = {
        NR_PIDFD_OPEN: "pidfd_open",
        NR_PIDFD_GETFD: "pidfd_getfd",
        NR_PIDFD_SEND_SIGNAL: "pidfd_send_signal",
    }
    arch = native_arch()
    if arch is not None:
        names |= {arch.nr_bind: "bind", arch.nr_seccomp: "seccomp", arch.nr_bpf: "bpf"}
    return names.get(nr, f"syscall {nr}")


def syscall(nr: int, *args: int) -> int:
    """syscall(2) with integer (or address) arguments; raises OSError on failure."""
    fn = _libc().syscall
    fn.restype = ctypes.c_long
    ret = int(fn(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args)))
    return _check(ret, _syscall_name(nr))


def arch_or_raise() -> Arch:
    arch = native_arch()
    if arch is None:
        raise OSError(errno.ENOSYS, f"no syscall table for {os.uname().machine}")
    return arch


def prctl(option: int, arg2: int = 0) -> int:
    fn = _libc().prctl
    fn.restype = ctypes.c_int
    zeros = (ctypes.c_ulong(0),) * 3
    return _check(int(fn(ctypes.c_int(option), ctypes.c_ulong(arg2), *zeros)), f"prctl {option}")


def set_parent_death_signal(sig: int) -> None:
    """Get ``sig`` when the parent thread exits (cleared by exec of setuid programs and by
    credential changes: call it last)."""
    prctl(PR_SET_PDEATHSIG, sig)


def set_no_new_privs() -> None:
    """Required before an unprivileged process may install a seccomp filter."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def set_child_subreaper(on: bool = True) -> None:
    """Orphaned descendants are re-parented to us instead of init (Linux 3.4), so that we
    see them in /proc/PID/task/*/children and reap them."""
    prctl(PR_SET_CHILD_SUBREAPER, 1 if on else 0)


def is_dumpable() -> bool:
    """False after a uid change (e.g. root dropping to --user): then, without CAP_SYS_PTRACE,
    even the same user may not pidfd_getfd() this process or its children."""
    return prctl(PR_GET_DUMPABLE) == 1


def pidfd_open(pid: int) -> int:
    """A pidfd for ``pid`` (Linux 5.3): readable when the process exits."""
    opener = getattr(os, "pidfd_open", None)
    if opener is not None:
        return int(opener(pid))
    return syscall(NR_PIDFD_OPEN, pid, 0)


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    """Duplicate fd ``targetfd`` of the process behind ``pidfd`` into ours (Linux 5.6, CLOEXEC).

    Needs ptrace access to that process (same user and not restricted by Yama, or root).
    """
    return syscall(NR_PIDFD_GETFD, pidfd, targetfd, 0)


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    """Send ``sig`` to the process behind ``pidfd`` (Linux 5.1): never a reused pid."""
    if hasattr(signal, "pidfd_send_signal"):
        signal.pidfd_send_signal(pidfd, sig)
        return
    syscall(NR_PIDFD_SEND_SIGNAL, pidfd, sig, 0, 0)


def tgkill(tgid: int, tid: int, sig: int) -> None:
    """Send ``sig`` to thread ``tid`` of process ``tgid`` alone (glibc >= 2.30, musl): a
    thread-directed signal, which only that thread can take."""
    fn = _libc().tgkill
    fn.restype = ctypes.c_int
    _check(int(fn(ctypes.c_int(tgid), ctypes.c_int(tid), ctypes.c_int(sig))), "tgkill")
