"""Seccomp user notification, from Python with ctypes: constants, structs, filter, ioctls.

Linux only, standard library only (system call numbers, prctl and pidfds are in
linux/syscalls.py, the classic BPF encoder in linux/bpf.py). This is the plumbing that
`portshard doctor` uses to prove the mechanism works and that the seccomp interposer
(`--via seccomp`) builds on:

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

from ..linux import bpf
from ..linux.bpf import ClassicProgram
from ..linux.syscalls import Arch, arch_or_raise, set_no_new_privs, syscall

__all__ = [
    "SeccompData",
    "SeccompNotif",
    "SeccompNotifAddfd",
    "SeccompNotifResp",
    "answer_with_fd",
    "bind_trap_filter",
    "check_sizes",
    "install_bind_trap",
    "install_listener",
    "notif_addfd",
    "notif_id_valid",
    "notif_recv",
    "notif_send",
]


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

_OFF_NR = SeccompData.nr.offset
_OFF_ARCH = SeccompData.arch.offset


def bind_trap_filter(arch: Arch) -> ClassicProgram:
    """A seccomp filter that sends the native ABI's bind() to the listener, allows the rest."""
    return ClassicProgram(
        [
            (bpf.LD_W_ABS, 0, 0, _OFF_ARCH),
            (bpf.JEQ_K, 0, 3, arch.audit_arch),  # foreign ABI: allow (see design note)
            (bpf.LD_W_ABS, 0, 0, _OFF_NR),
            (bpf.JEQ_K, 0, 1, arch.nr_bind),
            (bpf.RET_K, 0, 0, SECCOMP_RET_USER_NOTIF),
            (bpf.RET_K, 0, 0, SECCOMP_RET_ALLOW),
        ]
    )


def _ioctl(fd: int, request: int, arg: ctypes.Structure | ctypes.c_uint64, what: str) -> int:
    fn = _libc().ioctl
    fn.restype = ctypes.c_int
    ret = int(fn(ctypes.c_int(fd), ctypes.c_ulong(request), ctypes.byref(arg)))
    if ret < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return ret


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def install_listener(prog: ClassicProgram, *, wait_killable: bool = False) -> int:
    """Install ``prog`` on the calling thread; return the notification listener fd (CLOEXEC).

    Needs no_new_privs (or CAP_SYS_ADMIN). EINVAL with ``wait_killable`` means Linux < 5.19.
    """
    flags = SECCOMP_FILTER_FLAG_NEW_LISTENER
    if wait_killable:
        flags |= SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    return syscall(
        arch_or_raise().nr_seccomp, SECCOMP_SET_MODE_FILTER, flags, ctypes.addressof(prog.fprog)
    )


def check_sizes() -> None:
    """Raise OSError if the kernel's notification structs differ from the ones defined here."""
    sizes = _NotifSizes()
    syscall(arch_or_raise().nr_seccomp, SECCOMP_GET_NOTIF_SIZES, 0, ctypes.addressof(sizes))
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
