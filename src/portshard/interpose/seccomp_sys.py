"""Seccomp user notification, from Python with ctypes: constants, structs, filter, ioctls.

Linux only, standard library only. This is the plumbing that `portshard doctor` uses to prove the
mechanism works and that the seccomp interposer (`--via seccomp`) builds on:

1. the child, before exec, calls ``install_bind_trap()`` (no_new_privs + ``bind_trap_filter()``
   + ``install_listener()``) and hands the listener fd to the supervisor (SCM_RIGHTS, or the
   supervisor takes it with ``pidfd_getfd()``), then closes its own copy;
2. the supervisor waits for the listener to be readable and calls ``notif_recv()``; it may read
   the sockaddr from /proc/PID/mem, then must recheck ``notif_id_valid()`` before trusting it;
3. ``answer_with_fd()`` puts the supervisor's socket at the program's fd number (ADDFD + SETFD:
   the kernel closes whatever was there, like dup2) and makes bind() return 0. A bind() to an
   address the supervisor does not manage is answered ``notif_send(..., cont=True)``.

Design note: the filter traps only the native ABI's bind(). Other ABIs on the same machine (x32
and i386 on x86_64, arm32 on aarch64) pass through untouched: the interposer is a socket
hand-over for cooperative programs, not a sandbox, and a program that binds through a foreign
ABI simply binds its own socket.

Every function raises OSError with the kernel's errno on failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "ARCHES",
    "Arch",
    "ClassicProgram",
    "SeccompData",
    "SeccompNotif",
    "SeccompNotifAddfd",
    "SeccompNotifResp",
    "SockFilter",
    "SockFprog",
    "answer_with_fd",
    "bind_trap_filter",
    "check_sizes",
    "install_bind_trap",
    "install_listener",
    "is_dumpable",
    "native_arch",
    "notif_addfd",
    "notif_id_valid",
    "notif_recv",
    "notif_send",
    "pidfd_getfd",
    "pidfd_open",
    "set_no_new_privs",
    "set_parent_death_signal",
    "syscall",
]


@dataclass(frozen=True)
class Arch:
    """System call numbers and the seccomp arch tag of one native ABI."""

    machine: str  # os.uname().machine
    audit_arch: int  # seccomp_data.arch (AUDIT_ARCH_*)
    nr_bind: int
    nr_seccomp: int
    nr_bpf: int


ARCHES: dict[str, Arch] = {
    # AUDIT_ARCH_* = EM_* | __AUDIT_ARCH_64BIT (0x80000000) | __AUDIT_ARCH_LE (0x40000000)
    "x86_64": Arch("x86_64", 0xC000003E, nr_bind=49, nr_seccomp=317, nr_bpf=321),
    "aarch64": Arch("aarch64", 0xC00000B7, nr_bind=200, nr_seccomp=277, nr_bpf=280),
}

# Added after the syscall tables were unified (Linux 5.1): the same number on every arch.
NR_PIDFD_OPEN = 434
NR_PIDFD_GETFD = 438

PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3
PR_SET_NO_NEW_PRIVS = 38

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_GET_NOTIF_SIZES = 3
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3  # Linux 5.0
# A notified syscall is then interrupted only by fatal signals (Linux 5.19): Go's preemption
# signals (SIGURG) would otherwise abort and restart a trapped bind() again and again.
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_ALLOW = 0x7FFF0000

SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1 << 0  # let the trapped syscall run as if never trapped
SECCOMP_ADDFD_FLAG_SETFD = 1 << 0  # install at newfd (Linux 5.9, like ADDFD itself)
SECCOMP_ADDFD_FLAG_SEND = 1 << 1  # install and answer with the fd number, atomically (5.14)


def _ioc(direction: int, nr: int, size: int) -> int:
    # asm-generic ioctl encoding (x86_64 and aarch64): dir:2 size:14 type:8 nr:8
    return (direction << 30) | (size << 16) | (ord("!") << 8) | nr


_IOC_WRITE, _IOC_READ = 1, 2


class SeccompData(ctypes.Structure):
    """struct seccomp_data: what the filter (and the supervisor) sees of a syscall."""

    _fields_ = (
        ("nr", ctypes.c_int32),
        ("arch", ctypes.c_uint32),
        ("instruction_pointer", ctypes.c_uint64),
        ("args", ctypes.c_uint64 * 6),
    )


class SeccompNotif(ctypes.Structure):
    """struct seccomp_notif (80 bytes): one trapped syscall. Must be zeroed before NOTIF_RECV."""

    _fields_ = (
        ("id", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),  # in the listener's pid namespace
        ("flags", ctypes.c_uint32),
        ("data", SeccompData),
    )


class SeccompNotifResp(ctypes.Structure):
    """struct seccomp_notif_resp: the trapped syscall returns ``val``, or fails with ``error``."""

    _fields_ = (
        ("id", ctypes.c_uint64),
        ("val", ctypes.c_int64),
        ("error", ctypes.c_int32),  # a negative errno, or 0
        ("flags", ctypes.c_uint32),
    )


class SeccompNotifAddfd(ctypes.Structure):
    """struct seccomp_notif_addfd: copy our ``srcfd`` into the trapped process."""

    _fields_ = (
        ("id", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("srcfd", ctypes.c_uint32),
        ("newfd", ctypes.c_uint32),  # with SECCOMP_ADDFD_FLAG_SETFD
        ("newfd_flags", ctypes.c_uint32),  # O_CLOEXEC or 0
    )


class _NotifSizes(ctypes.Structure):
    _fields_ = (
        ("seccomp_notif", ctypes.c_uint16),
        ("seccomp_notif_resp", ctypes.c_uint16),
        ("seccomp_data", ctypes.c_uint16),
    )


SECCOMP_IOCTL_NOTIF_RECV = _ioc(_IOC_READ | _IOC_WRITE, 0, ctypes.sizeof(SeccompNotif))
SECCOMP_IOCTL_NOTIF_SEND = _ioc(_IOC_READ | _IOC_WRITE, 1, ctypes.sizeof(SeccompNotifResp))
SECCOMP_IOCTL_NOTIF_ID_VALID = _ioc(_IOC_WRITE, 2, ctypes.sizeof(ctypes.c_uint64))
SECCOMP_IOCTL_NOTIF_ADDFD = _ioc(_IOC_WRITE, 3, ctypes.sizeof(SeccompNotifAddfd))

# Classic BPF opcodes (linux/filter.h) used by the filters built here.
BPF_LD_W_ABS = 0x20  # A = *(u32 *)(data + k)
BPF_JMP_JEQ_K = 0x15  # pc += (A == k) ? jt : jf
BPF_RET_K = 0x06  # return k
_OFF_NR = SeccompData.nr.offset
_OFF_ARCH = SeccompData.arch.offset


class SockFilter(ctypes.Structure):
    """struct sock_filter: one classic BPF instruction."""

    _fields_ = (
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    )


class SockFprog(ctypes.Structure):
    """struct sock_fprog: a classic BPF program (seccomp, SO_ATTACH_REUSEPORT_CBPF)."""

    _fields_ = (("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter)))


class ClassicProgram:
    """A classic BPF program and the memory it points to, kept alive together.

    ``insns`` are (code, jt, jf, k) tuples. Pass ``byref()`` to seccomp(2), or ``as_option()``
    as a setsockopt value (the kernel copies the program during the call).
    """

    def __init__(self, insns: Sequence[tuple[int, int, int, int]]) -> None:
        if not 0 < len(insns) <= 4096:
            raise ValueError(f"a classic BPF program has 1 to 4096 instructions, not {len(insns)}")
        self._insns = (SockFilter * len(insns))(*(SockFilter(*i) for i in insns))
        self.fprog = SockFprog(len(insns), ctypes.cast(self._insns, ctypes.POINTER(SockFilter)))

    def __len__(self) -> int:
        return len(self._insns)

    def as_option(self) -> bytes:
        return bytes(self.fprog)


def bind_trap_filter(arch: Arch) -> ClassicProgram:
    """A seccomp filter that sends the native ABI's bind() to the listener, allows the rest."""
    return ClassicProgram(
        [
            (BPF_LD_W_ABS, 0, 0, _OFF_ARCH),
            (BPF_JMP_JEQ_K, 0, 3, arch.audit_arch),  # foreign ABI: allow (see design note)
            (BPF_LD_W_ABS, 0, 0, _OFF_NR),
            (BPF_JMP_JEQ_K, 0, 1, arch.nr_bind),
            (BPF_RET_K, 0, 0, SECCOMP_RET_USER_NOTIF),
            (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
        ]
    )


def native_arch() -> Arch | None:
    """The running ABI, or None where portshard has no syscall table for it."""
    return ARCHES.get(os.uname().machine)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return ret


def _syscall_name(nr: int) -> str:
    names = {NR_PIDFD_OPEN: "pidfd_open", NR_PIDFD_GETFD: "pidfd_getfd"}
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


def _ioctl(fd: int, request: int, arg: ctypes.Structure | ctypes.c_uint64, what: str) -> int:
    fn = _libc().ioctl
    fn.restype = ctypes.c_int
    return _check(int(fn(ctypes.c_int(fd), ctypes.c_ulong(request), ctypes.byref(arg))), what)


def _arch() -> Arch:
    arch = native_arch()
    if arch is None:
        raise OSError(errno.ENOSYS, f"no syscall table for {os.uname().machine}")
    return arch


def _prctl(option: int, arg2: int = 0) -> int:
    fn = _libc().prctl
    fn.restype = ctypes.c_int
    zeros = (ctypes.c_ulong(0),) * 3
    return _check(int(fn(ctypes.c_int(option), ctypes.c_ulong(arg2), *zeros)), f"prctl {option}")


def set_parent_death_signal(sig: int) -> None:
    """Get ``sig`` when the parent thread exits (cleared by exec of setuid programs and by
    credential changes: call it last)."""
    _prctl(PR_SET_PDEATHSIG, sig)


def set_no_new_privs() -> None:
    """Required before an unprivileged process may install a seccomp filter."""
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


def is_dumpable() -> bool:
    """False after a uid change (e.g. root dropping to --user): then, without CAP_SYS_PTRACE,
    even the same user may not pidfd_getfd() this process or its children."""
    return _prctl(PR_GET_DUMPABLE) == 1


def install_listener(prog: ClassicProgram, *, wait_killable: bool = False) -> int:
    """Install ``prog`` on the calling thread; return the notification listener fd (CLOEXEC).

    Needs no_new_privs (or CAP_SYS_ADMIN). EINVAL with ``wait_killable`` means Linux < 5.19.
    """
    flags = SECCOMP_FILTER_FLAG_NEW_LISTENER
    if wait_killable:
        flags |= SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    return syscall(_arch().nr_seccomp, SECCOMP_SET_MODE_FILTER, flags, ctypes.addressof(prog.fprog))


def check_sizes() -> None:
    """Raise OSError if the kernel's notification structs differ from the ones defined here."""
    sizes = _NotifSizes()
    syscall(_arch().nr_seccomp, SECCOMP_GET_NOTIF_SIZES, 0, ctypes.addressof(sizes))
    ours = (ctypes.sizeof(SeccompNotif), ctypes.sizeof(SeccompNotifResp))
    if (sizes.seccomp_notif, sizes.seccomp_notif_resp) != ours:
        raise OSError(
            errno.EPROTO,
            f"kernel seccomp_notif sizes {sizes.seccomp_notif}, "
            f"{sizes.seccomp_notif_resp} differ from ours {ours}",
        )


def install_bind_trap(arch: Arch, *, no_new_privs: bool = True) -> tuple[int, bool]:
    """Set no_new_privs and trap this thread's bind(): (listener fd, wait_killable used).

    Prefers SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV and falls back without it before Linux 5.19.
    Call it in the child, before exec; hand the listener to the supervisor, then close it.
    ``no_new_privs=False`` needs CAP_SYS_ADMIN (root): then setuid programs keep working.
    """
    if no_new_privs:
        set_no_new_privs()
    prog = bind_trap_filter(arch)
    try:
        return install_listener(prog, wait_killable=True), True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    return install_listener(prog), False


def answer_with_fd(listener: int, notif: SeccompNotif, srcfd: int, *, cloexec: bool = False) -> int:
    """Put our ``srcfd`` at the fd number the trapped call got as its first argument (the
    kernel closes what was there, like dup2), and make the call return 0. Returns that number.

    This is the whole hand-over for bind(fd, ...): the program's own socket is replaced by ours.
    If ADDFD fails (Linux < 5.9: EINVAL), the call fails with that errno and OSError is raised.
    """
    newfd = int(notif.data.args[0])
    if not 0 <= newfd < 1 << 31:
        raise OSError(errno.EBADF, f"trapped call's first argument {newfd} is not an fd")
    try:
        notif_addfd(listener, notif.id, srcfd, newfd=newfd, cloexec=cloexec)
    except OSError as exc:
        with contextlib.suppress(OSError):  # don't leave the program waiting: fail its call
            notif_send(listener, notif.id, error=exc.errno or errno.EIO)
        raise
    notif_send(listener, notif.id, val=0)
    return newfd


def notif_recv(listener: int) -> SeccompNotif:
    """Take the next trapped syscall (blocks unless the listener polled readable)."""
    notif = SeccompNotif()
    _ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, notif, "SECCOMP_IOCTL_NOTIF_RECV")
    return notif


def notif_id_valid(listener: int, notif_id: int) -> bool:
    """Whether the trapped process still waits for this answer (it may have died meanwhile)."""
    try:
        _ioctl(listener, SECCOMP_IOCTL_NOTIF_ID_VALID, ctypes.c_uint64(notif_id), "ID_VALID")
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def notif_addfd(
    listener: int, notif_id: int, srcfd: int, *, newfd: int | None = None, cloexec: bool = False
) -> int:
    """Copy ``srcfd`` into the trapped process, at ``newfd`` if given; return its fd number."""
    addfd = SeccompNotifAddfd(
        id=notif_id,
        flags=SECCOMP_ADDFD_FLAG_SETFD if newfd is not None else 0,
        srcfd=srcfd,
        newfd=newfd or 0,
        newfd_flags=os.O_CLOEXEC if cloexec else 0,
    )
    return _ioctl(listener, SECCOMP_IOCTL_NOTIF_ADDFD, addfd, "SECCOMP_IOCTL_NOTIF_ADDFD")


def notif_send(
    listener: int, notif_id: int, *, val: int = 0, error: int = 0, cont: bool = False
) -> None:
    """Answer a trapped syscall: return ``val``, fail with errno ``error``, or ``cont``inue it."""
    resp = SeccompNotifResp(
        id=notif_id,
        val=val,
        error=-abs(error),
        flags=SECCOMP_USER_NOTIF_FLAG_CONTINUE if cont else 0,
    )
    _ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, resp, "SECCOMP_IOCTL_NOTIF_SEND")


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
