"""Is a process (or any process of a tree) waiting for work on these sockets? From /proc.

No cooperation from the program is needed: /proc/PID/task/TID/syscall says what each thread
is blocked in. Costs 25-40 µs a process. False for a process that has exited or is stopped;
raises :class:`~portshard.errors.NoAccess` when this user may not look into the process.
"""

from __future__ import annotations

import functools
import os
import socket
import struct
from collections.abc import Iterable
from collections.abc import Set as AbstractSet

from ..errors import InspectError, NoAccess
from .proc import SOCKET_LINK, no_access, process_tree, read, read_small, socket_fds, stat
from .sockdiag import held_by_members
from .syscalls import Waits, native_arch

__all__ = [
    "tree_idle_for_datagrams",
    "tree_waiting_for_work",
    "tree_waits_in_epoll",
    "waiting_for_work",
]

# Is the process waiting for work? Read from /proc/PID/task/TID/syscall, no cooperation needed.
#
# A thread blocked in a system call shows "NR ARG0 ... ARG5 SP PC" there ("running" when on a
# CPU, "-1 SP PC" when blocked outside a syscall). We recognise four kinds of waits:
#   - accept/recv/read with ARG0 = an fd whose /proc/PID/fd link is one of our sockets;
#   - epoll_wait & co. on an epoll fd whose /proc/PID/fdinfo lists one of our sockets with
#     EPOLLIN enabled (the "ino:" of each "tfd:" entry names the file itself, so a target fd
#     number closed or reused since epoll_ctl cannot fool us; nested epoll fds are followed);
#   - poll/ppoll and select/pselect6: ARG0/ARG1 point into the process's memory. We read the
#     pollfd array or the read fd_set from /proc/PID/mem (the same rights as the syscall file)
#     and look for one of our sockets; if that memory cannot be read we fall back to "the
#     process holds one of the sockets";
#   - restart_syscall whose kernel wait channel is poll's: a poll(2) with a timeout that a
#     SIGSTOP/SIGCONT interrupted; x86_64 and arm64 keep the original arguments in registers.
# A thread of a stopped (SIGSTOP, ptrace) process still shows the syscall it was stopped in;
# it is not waiting for anything, so a candidate thread's state must be S, D, R or I.
#
# What this cannot see: io_uring (IORING_OP_ACCEPT/POLL_ADD; the thread shows io_uring_enter
# or nothing), a thread busy-polling without blocking, 32-bit
# (compat) processes on a 64-bit kernel (different syscall numbers), a process that is
# between two waits at the instant we look (busy, so "not waiting" is then the truth: sample
# again), and interest in a socket that the program is not going to act on.


_POLLIN = 0x001 | 0x040  # POLLIN | POLLRDNORM (EPOLLIN and EPOLLRDNORM have the same values)
_POLLFD = struct.Struct("=ihh")  # struct pollfd: int fd; short events; short revents
_MAX_PEEK = 1 << 16  # bytes of pollfd array / fd_set we are willing to read
_WAITING_STATES = frozenset("SDRI")
_TIMESPEC = struct.Struct("=qq")  # struct timespec / timeval on a 64-bit ABI: sec, nsec|usec
DUE_SOON = 1.0  # s: a wait with a timer due sooner may hold a datagram it answers then
_EPOLL_LINK = "anon_inode:[eventpoll]"


@functools.cache
def _waits() -> Waits:
    arch = native_arch()
    if arch is None:
        raise InspectError(
            f"waiting_for_work knows the syscall numbers of x86_64 and aarch64, not "
            f"{os.uname().machine}; use another readiness source (sd_notify READY=1, an "
            f"HTTP probe or a delay)"
        )
    return arch.waits


@functools.cache
def _sockfs_sdev() -> int:
    """The device of sockfs as the kernel prints it in fdinfo ("sdev:%x", MKDEV layout)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        dev = os.fstat(probe.fileno()).st_dev
    return (os.major(dev) << 20) | os.minor(dev)


class _Looker:
    """What one waiting_for_work() call has read of one process (fd links, memory)."""

    def __init__(self, pid: int, inodes: AbstractSet[int]) -> None:
        self.pid = pid
        self.inodes = inodes
        self.links: dict[int, str | None] = {}
        self.mem: int | None = None  # fd of /proc/PID/mem, -1 once it failed

    def close(self) -> None:
        if self.mem is not None and self.mem >= 0:
            os.close(self.mem)
        self.mem = None

    def link(self, fd: int) -> str | None:
        if fd not in self.links:
            try:
                self.links[fd] = os.readlink(f"/proc/{self.pid}/fd/{fd}")
            except OSError:
                self.links[fd] = None
        return self.links[fd]

    def ours(self, fd: int) -> bool:
        if not 0 <= fd < 1 << 31:
            return False
        target = self.link(fd)
        if target is None or not target.startswith(SOCKET_LINK):
            return False
        return int(target[len(SOCKET_LINK) : -1]) in self.inodes

    def holds_any(self) -> bool:
        return not self.inodes.isdisjoint(socket_fds(self.pid).values())

    def peek(self, addr: int, size: int) -> bytes | None:
        if self.mem is None:
            try:
                self.mem = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self.mem = -1
        if self.mem < 0:
            return None
        try:
            data = os.pread(self.mem, size, addr)
        except (OSError, OverflowError):
            return None
        return data if len(data) == size else None

    def epoll_watches(self, epfd: int, seen: set[int]) -> bool:
        if epfd in seen or not 0 <= epfd < 1 << 31:
            return False
        seen.add(epfd)
        try:
            info = read(f"/proc/{self.pid}/fdinfo/{epfd}")
        except OSError:
            return False
        own_ino = -1
        sockfs = _sockfs_sdev()
        for line in info.split(b"\n"):
            if line.startswith(b"ino:"):
                own_ino = int(line[4:])  # decimal here, hex in the tfd lines
            if not line.startswith(b"tfd:"):
                continue
            fields = line.split()
            tfd, events = int(fields[1]), int(fields[3], 16)
            if not events & _POLLIN:
                continue
            ino = sdev = None
            for field in fields[4:]:
                if field.startswith(b"ino:"):
                    ino = int(field[4:], 16)
                elif field.startswith(b"sdev:"):
                    sdev = int(field[5:], 16)
            if ino is None:  # kernels before 3.8 print no ino: trust the fd number
                if self.ours(tfd):
                    return True
            elif ino in self.inodes and (sdev is None or sdev == sockfs):
                return True
            # Every epoll fd shares one anonymous inode (with eventfds, timerfds...).
            nested = ino is None or ino == own_ino
            if nested and self.link(tfd) == _EPOLL_LINK and self.epoll_watches(tfd, seen):
                return True
        return False

    def poll_watches(self, addr: int, nfds: int) -> bool:
        if nfds == 0:
            return False
        size = nfds * _POLLFD.size
        data = self.peek(addr, size) if size <= _MAX_PEEK else None
        if data is None:
            return self.holds_any()
        for fd, events, _ in _POLLFD.iter_unpack(data):
            if events & _POLLIN and self.ours(fd):
                return True
        return False

    def select_watches(self, nfds: int, readfds: int) -> bool:
        if nfds == 0 or readfds == 0:
            return False
        size = (nfds + 63) // 64 * 8  # fd_set is an array of longs
        data = self.peek(readfds, size) if size <= _MAX_PEEK else None
        if data is None:
            return self.holds_any()
        bits = int.from_bytes(data, "little")  # x86_64 and aarch64 are little-endian
        fd = 0
        while bits and fd < nfds:
            if bits & 1 and self.ours(fd):
                return True
            bits >>= 1
            fd += 1
        return False

    def due_soon(self, table: Waits, nr: int, args: list[int]) -> bool:
        """The wait ``nr`` has a timeout under DUE_SOON s (or one we cannot read)."""
        for number, index, kind in table.timeouts:
            if number != nr:
                continue
            if kind == "ms":
                ms = args[index] & 0xFFFFFFFF  # an int in a 64-bit register
                ms -= 1 << 32 if ms >= 1 << 31 else 0
                return 0 <= ms < DUE_SOON * 1000
            if args[index] == 0:
                return False  # NULL: no timeout
            data = self.peek(args[index], _TIMESPEC.size)
            if data is None:
                return True
            sec, frac = _TIMESPEC.unpack(data)
            return bool(sec + frac / (1e9 if kind == "timespec" else 1e6) < DUE_SOON)
        return False

    def thread_idle_for_datagrams(self, table: Waits, tid: str) -> bool:
        """A thread of a frozen process was stopped in a wait for one of our sockets with no
        timer due soon (see :func:`tree_idle_for_datagrams`); an exiting thread holds nothing."""
        task = f"/proc/{self.pid}/task/{tid}/"
        st = stat(self.pid, int(tid))
        if st is None or st.state in "ZX":
            return True
        try:
            fields = read_small(task + "syscall").split()
        except (FileNotFoundError, ProcessLookupError):
            return True  # thread gone
        except PermissionError as exc:
            raise no_access(self.pid, task + "syscall", exc) from exc
        if len(fields) < 7 or fields[0] == b"running":
            return False
        nr = int(fields[0])
        args = [int(a, 16) for a in fields[1:7]]
        if nr in table.on_fd:
            return self.ours(args[0])
        if nr in table.epoll:
            return self.epoll_watches(args[0], set()) and not self.due_soon(table, nr, args)
        if nr in table.poll:
            return self.poll_watches(args[0], args[1]) and not self.due_soon(table, nr, args)
        if nr in table.select:
            return self.select_watches(args[0], args[1]) and not self.due_soon(table, nr, args)
        return False  # computing, sleeping, sending, restarting a timed wait, ...

    def thread_waits(self, table: Waits, tid: str, *, only: frozenset[int] | None = None) -> bool:
        task = f"/proc/{self.pid}/task/{tid}/"
        try:
            fields = read_small(task + "syscall").split()
        except (FileNotFoundError, ProcessLookupError):  # thread gone
            return False
        except PermissionError as exc:
            st = stat(self.pid, int(tid))
            if st is None or st.state in "ZX":
                return False  # a zombie's files are root's (proc.socket_fds)
            raise no_access(self.pid, task + "syscall", exc) from exc
        if len(fields) < 7 or fields[0] == b"running":
            return False
        nr = int(fields[0])
        if only is not None and nr not in only:
            return False
        args = [int(a, 16) for a in fields[1:7]]
        if nr in table.on_fd:
            found = self.ours(args[0])
        elif nr in table.epoll:
            found = self.epoll_watches(args[0], set())
        elif nr in table.poll:
            found = self.poll_watches(args[0], args[1])
        elif nr in table.select:
            found = self.select_watches(args[0], args[1])
        elif nr == table.restart:
            try:
                wchan = read_small(task + "wchan")
            except OSError:
                return False
            found = b"poll" in wchan and self.poll_watches(args[0], args[1])
        else:
            return False
        st = stat(self.pid, int(tid))
        return found and st is not None and st.state in _WAITING_STATES


def waiting_for_work(pid: int, inodes: AbstractSet[int]) -> bool:
    """True when a thread of ``pid`` is blocked waiting for work on one of these sockets.

    ``inodes`` are socket inodes (:func:`~portshard.linux.tcpinfo.socket_inode`). Looks only
    at /proc: the program needs no cooperation. See the notes at the top of this module for
    what it recognises and what it cannot see. False for a process that has exited or is
    stopped; raises :class:`NoAccess` when this user may not look into the process.
    """
    if not inodes:
        return False
    table = _waits()
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return False
    tids.sort(key=lambda tid: tid != str(pid))  # the main thread is the likeliest waiter
    looker = _Looker(pid, inodes)
    try:
        return any(looker.thread_waits(table, tid) for tid in tids)
    finally:
        looker.close()


def tree_waiting_for_work(
    pid: int,
    inodes: AbstractSet[int],
    *,
    ports: AbstractSet[int] = frozenset(),
    members: Iterable[int] | None = None,
    seen: set[int] | None = None,
) -> bool:
    """True when any process of the worker's tree waits for work on one of these sockets, or
    (with ``ports``) holds a client connection on one of those local ports (``seen``: the
    worker's sockets known not to be one, kept between looks: ``sockdiag.held_by_members``).

    Pre-fork servers (gunicorn, nginx, a plain bind-fork-accept server): the master binds or
    inherits the socket and never waits on it; its children do. And under a saturating load a
    worker that accepts at once never waits, but holds what it accepted. ``members`` are the
    processes of the tree when they are known (a cgroup's: they include descendants that
    escaped with setsid or whose parent exited); else the tree is walked from ``pid``.
    """
    if not inodes:
        return False
    tree = list(members) if members is not None else process_tree(pid)
    if pid in tree:  # the worker itself first: the likeliest waiter
        tree.remove(pid)
        tree.insert(0, pid)
    for member in tree:
        try:
            if waiting_for_work(member, inodes):
                return True
        except NoAccess:
            if member == pid:
                raise
            # A descendant that changed uid (an nginx worker as www-data under a root
            # master run by an unprivileged supervisor): its siblings may still answer.
    return bool(ports) and held_by_members(tree, inodes, ports, seen=seen) > 0


def tree_waits_in_epoll(
    pid: int, inodes: AbstractSet[int], *, members: Iterable[int] | None = None
) -> bool:
    """True when a thread of the worker's tree waits in epoll_wait (& co.) on one of these
    sockets: an event loop, which accepts (or reads) until EAGAIN. On a blocking socket the
    call that should say EAGAIN blocks instead, and the loop stops (tornado or gevent given
    fd 3 as it is: 16 requests over 4 workers, then none). Processes this user may not look
    into are skipped."""
    if not inodes:
        return False
    table = _waits()
    for member in list(members) if members is not None else process_tree(pid):
        try:
            tids = os.listdir(f"/proc/{member}/task")
        except OSError:
            continue
        looker = _Looker(member, inodes)
        try:
            if any(looker.thread_waits(table, tid, only=table.epoll) for tid in tids):
                return True
        except NoAccess:
            continue
        finally:
            looker.close()
    return False


def tree_idle_for_datagrams(
    pid: int, inodes: AbstractSet[int], *, members: Iterable[int] | None = None
) -> bool:
    """True when every thread of every live process of a *frozen* tree was stopped waiting
    for a datagram on one of these sockets (recvfrom & co. on one; poll, select or epoll_wait
    watching one), with no timer due within DUE_SOON s: then it holds no datagram it has read
    and not answered, and killing it loses nothing.

    A UDP server's datagram in hand is in the program's memory, not in the kernel: only where
    its threads are tells. A blocking recvfrom/sendto loop holds one unless it is back in
    recvfrom; an asyncio DatagramProtocol that answers from a task waits in epoll_wait with
    that task's timer as its timeout (none, -1, when nothing is pending); a server that forks
    a child per datagram (socat's RECVFROM,fork) has that child in its tree, which waits for
    nothing on the socket. A thread doing anything else (computing, sleeping, sending,
    waiting on a lock) may hold one. Costs the same as :func:`waiting_for_work`, per thread.

    What it cannot tell: a thread stopped on its way out of a recvfrom that had just taken a
    datagram shows the same line as one stopped in the wait (its return value is not in
    /proc); a program that keeps a datagram while waiting for something else with no timer.
    """
    if not inodes:
        return False
    table = _waits()
    for member in list(members) if members is not None else process_tree(pid):
        st = stat(member)
        if st is None or st.state in "ZX":
            continue  # gone or a zombie: holds nothing
        try:
            tids = os.listdir(f"/proc/{member}/task")
        except (FileNotFoundError, ProcessLookupError):
            continue
        looker = _Looker(member, inodes)
        try:
            if not all(looker.thread_idle_for_datagrams(table, tid) for tid in tids):
                return False
        finally:
            looker.close()
    return True
