"""Readers of /proc/PID: stat (parsed here and nowhere else), the process tree, fd tables.

os.open/os.read instead of open(): a /proc read is then ~2 µs, not ~6 µs. Nothing here changes
state. A process that has exited reads as absent (None, empty, False), never as an error; a
process this user may not look into raises :class:`~portshard.errors.NoAccess`.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from ..errors import NoAccess

if TYPE_CHECKING:  # no runtime import: `import portshard` stays light
    from .cgroup import Cgroup

__all__ = [
    "ProcStat",
    "RunQueueWaits",
    "Sched",
    "alive",
    "blocks",
    "capabilities",
    "catches",
    "cpu_seconds",
    "dying",
    "env_values",
    "fd_cloexec",
    "netstat",
    "no_access",
    "parse_stat",
    "pids_by_inode",
    "process_tree",
    "program_name",
    "read",
    "read_memory",
    "read_small",
    "socket_fds",
    "sockets_of",
    "stat",
    "tgid",
    "tree_stopped",
    "udp_delivered",
]

SOCKET_LINK = "socket:["
_TICKS = os.sysconf("SC_CLK_TCK")
_O_CLOEXEC = 0o2000000
_PF_EXITING = 0x4  # a task flag: do_exit() has begun
# State letters of a process that is not running code: stopped, traced, zombie, dead.
_HALTED = frozenset("TtZX")


def read(path: str) -> bytes:
    """All of a /proc file (seq_file files hand out at most a page or so per read)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_small(path: str) -> bytes:
    """A /proc file known to be short (syscall, stat, wchan): one read."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


class Sched(NamedTuple):
    """One read of a process's main thread for the steering's looks (:class:`RunQueueWaits`)."""

    ran: int  # nanoseconds on a CPU so far
    waited: int  # nanoseconds runnable but waiting for a CPU so far, counted when it gets one
    runnable: bool  # running or waiting for a CPU now (state R), not asleep


class RunQueueWaits:
    """How long the same few pids' main threads ran and waited for a CPU (the first two fields
    of /proc/PID/schedstat), read at every look (steering): each /proc/PID/schedstat (and
    /proc/PID/stat, for the state) stays open and is read again with
    pread (a seq_file makes its text afresh at offset 0), 2-3 µs a read where open, read and
    close took ~11 µs idle and 40-90 µs under load. An fd names the process it was opened
    for: once that one has gone the read fails (ESRCH), even if its pid was given to another.

    The kernel adds a wait to schedstat's second field only when the thread gets a CPU: a
    worker still waiting shows none of it (4 equal workers, a burst of 200 connections at
    load 4-7: 3 of them starved for a whole 20 ms look showed 0). Its state says it: R and
    hardly on a CPU since the last read is waiting now."""

    def __init__(self) -> None:
        self._fds: dict[int, tuple[int, int]] = {}

    def read(self, pid: int) -> Sched | None:
        """``pid``'s main thread now; None if it is gone."""
        fds = self._fds.get(pid)
        if fds is None:
            try:
                sched = os.open(f"/proc/{pid}/schedstat", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None
            try:
                stat = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                os.close(sched)
                return None
            self._fds[pid] = fds = (sched, stat)
        try:
            ran, waited = os.pread(fds[0], 128, 0).split()[:2]
            line = os.pread(fds[1], 128, 0)
            state = line[line.rindex(b")") + 2 : line.rindex(b")") + 3]
            return Sched(int(ran), int(waited), state == b"R")
        except (OSError, IndexError, ValueError):
            self._forget(pid)
            return None

    def _forget(self, pid: int) -> None:
        for fd in self._fds.pop(pid):
            os.close(fd)

    def keep(self, pids: set[int]) -> None:
        """Close what is open for any other pid (a worker replaced or gone)."""
        for pid in [p for p in self._fds if p not in pids]:
            self._forget(pid)

    def close(self) -> None:
        self.keep(set())


def read_memory(pid: int, addr: int, size: int) -> bytes:
    """``size`` bytes of the process's memory at ``addr`` (/proc/PID/mem: ptrace rights
    needed); fewer if the range ends early. Raises OSError."""
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, size, addr)
    finally:
        os.close(fd)


def program_name(pid: int) -> str | None:
    try:
        return read_small(f"/proc/{pid}/comm").decode(errors="replace").strip()
    except OSError:
        return None


def no_access(pid: int, path: str, exc: OSError) -> NoAccess:
    return NoAccess(
        f"cannot read {path}: {exc.strerror or exc}; looking into pid {pid} "
        f"({program_name(pid) or '?'}) needs the rights to ptrace it: run the supervisor as "
        f"root, or as the same user as the process"
    )


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/PID/stat (or /proc/PID/task/TID/stat) portshard uses."""

    state: str  # R S D T t Z X I ...
    ppid: int
    pgrp: int
    session: int
    utime: int  # clock ticks
    stime: int
    start: int = 0  # clock ticks after boot it started: with the pid, it names one process
    flags: int = 0  # the kernel's PF_* task flags

    @property
    def cpu_seconds(self) -> float:
        return (self.utime + self.stime) / _TICKS


def parse_stat(raw: bytes) -> ProcStat | None:
    """/proc/.../stat's text; the command name may hold spaces and ')', so split after the last
    ')'. None if the text is cut short."""
    end = raw.rfind(b")")
    fields = raw[end + 2 :].split()
    if end < 0 or len(fields) < 13:
        return None
    return ProcStat(
        state=fields[0].decode(),
        ppid=int(fields[1]),
        pgrp=int(fields[2]),
        session=int(fields[3]),
        utime=int(fields[11]),
        stime=int(fields[12]),
        start=int(fields[19]) if len(fields) > 19 else 0,
        flags=int(fields[6]),
    )


def stat(pid: int, tid: int | None = None) -> ProcStat | None:
    """/proc/PID/stat (or a thread's), None once it has gone."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        return parse_stat(read_small(path))
    except OSError:
        return None


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie. (Pids are reused: prefer a pidfd.)"""
    st = stat(pid)
    return st is not None and st.state not in ("Z", "X")


def cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user + system) the process has used; None once it has gone."""
    st = stat(pid)
    return st.cpu_seconds if st is not None else None


def _each(name: str) -> Iterator[tuple[int, list[bytes]]]:
    """(pid, its /proc/PID/``name`` split at NULs) for every process we may read it of."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            yield int(entry), read(f"/proc/{entry}/{name}").split(b"\0")
        except OSError:  # gone, a kernel thread, or another user's
            continue


def env_values(name: str, prefix: str) -> dict[int, str]:
    """pid -> the value of ``name`` in its environment, for every process we may read whose
    value starts with ``prefix`` (/proc/PID/environ: the environment it was started with)."""
    want = f"{name}={prefix}".encode()
    found: dict[int, str] = {}
    for pid, environ in _each("environ"):
        for item in environ:
            if item.startswith(want):
                found[pid] = item[len(name) + 1 :].decode(errors="replace")
                break
    return found


def running_with_args(*args: str) -> bool:
    """A process runs whose command line holds every one of ``args`` (as whole arguments)."""
    want = [os.fsencode(a) for a in args]
    return any(all(w in argv for w in want) for _pid, argv in _each("cmdline"))


def _children(pid: int) -> Iterator[int]:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tasks:
        try:
            yield from (int(c) for c in read(f"/proc/{pid}/task/{tid}/children").split())
        except OSError:
            continue


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (via /proc/PID/task/*/children; cheap, no /proc scan).

    A descendant whose parent exited is re-parented (to init, or to a subreaper) and is no
    longer found here: a cgroup (linux/cgroup.py) keeps the whole tree.
    """
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(_children(current))
    return tree


def tree_stopped(pid: int, group: Cgroup | None = None) -> bool:
    """Every process of the tree is stopped (state T), or gone. With the worker's ``group``:
    the group is frozen (cgroup.freeze; stopped tasks count as frozen), or empty."""
    if group is not None and os.path.isdir(group.path):
        return group.frozen() or not group.populated()
    for member in process_tree(pid):
        st = stat(member)
        if st is not None and st.state not in _HALTED:
            return False
    return True


def socket_fds(pid: int) -> dict[int, int]:
    """fd number -> socket inode, for every socket in the process's fd table (empty once it
    has exited)."""
    base = f"/proc/{pid}/fd/"
    try:
        names = os.listdir(base)
    except (FileNotFoundError, ProcessLookupError):
        return {}
    except PermissionError as exc:
        # A zombie's fd/ and syscall files are root's (its memory is gone, the kernel hands
        # them to root), so another user gets EACCES there; it holds no fd. Before, a zombie
        # left by a server that never reaps a helper (`sh -c 'helper & exec server'`) made
        # every retirement by a non-root supervisor "assume it holds a connection" until
        # --grace, a warning a look.
        if not alive(pid):
            return {}
        raise no_access(pid, base.rstrip("/"), exc) from exc
    found: dict[int, int] = {}
    for name in names:
        try:
            target = os.readlink(base + name)
        except OSError:  # closed since listdir
            continue
        if target.startswith(SOCKET_LINK):
            found[int(name)] = int(target[len(SOCKET_LINK) : -1])
    return found


def sockets_of(pid: int) -> set[int]:
    """Inodes of every socket in ``pid``'s fd table (empty once it has exited)."""
    return set(socket_fds(pid).values())


def pids_by_inode(inodes: set[int]) -> dict[int, int]:
    """Map socket inodes to the first pid found holding each (scans /proc/*/fd)."""
    found: dict[int, int] = {}
    if not inodes:
        return found
    wanted = {f"socket:[{i}]": i for i in inodes}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.scandir(f"/proc/{entry.name}/fd")
        except OSError:
            continue
        with fds:
            for fd in fds:
                try:
                    target = os.readlink(fd.path)
                except OSError:
                    continue
                inode = wanted.get(target)
                if inode is not None and inode not in found:
                    found[inode] = int(entry.name)
        if len(found) == len(wanted):
            break
    return found


def _status_field(pid: int | str, name: bytes) -> bytes | None:
    for line in read(f"/proc/{pid}/status").split(b"\n"):
        if line.startswith(name):
            return line[len(name) :].strip()
    return None


def tgid(tid: int) -> int:
    """The process (thread group) a thread id belongs to; OSError once it has gone."""
    value = _status_field(tid, b"Tgid:")
    if value is None:
        raise OSError(errno.ESRCH, f"no Tgid for thread {tid}")
    return int(value)


def catches(pid: int, sig: int) -> bool:
    """Whether ``pid`` has a handler of its own for signal ``sig`` (SigCgt in
    /proc/PID/status: neither its default action nor ignored); False once it has gone."""
    return _signal_set_has(pid, b"SigCgt:", sig)


def dying(pid: int) -> bool:
    """Whether ``pid`` is on its way out (or gone): exiting, a zombie, or SIGKILL pending (a
    signal whose default action kills, sent while frozen, is one until the task runs)."""
    st = stat(pid)
    if st is None or st.state in ("Z", "X") or st.flags & _PF_EXITING:
        return True
    return _signal_set_has(pid, b"SigPnd:", signal.SIGKILL)


def blocks(pid: int, sig: int) -> bool:
    """Whether the main thread of ``pid`` blocks signal ``sig`` (SigBlk in /proc/PID/status:
    a program that takes its signals in another thread with sigwait() blocks them in all);
    False once it has gone."""
    return _signal_set_has(pid, b"SigBlk:", sig)


def _signal_set_has(pid: int, name: bytes, sig: int) -> bool:
    """Whether signal set ``name`` of /proc/PID/status (a hex mask) has ``sig``."""
    try:
        value = _status_field(pid, name)
    except OSError:
        return False
    return value is not None and bool(int(value, 16) >> (sig - 1) & 1)


def fd_cloexec(pid: int, fd: int) -> bool:
    """Whether fd ``fd`` of ``pid`` is close-on-exec (from /proc/PID/fdinfo/FD)."""
    for line in read(f"/proc/{pid}/fdinfo/{fd}").split(b"\n"):
        if line.startswith(b"flags:"):
            return bool(int(line.split()[1], 8) & _O_CLOEXEC)
    return False


_CAPS = {"SETGID": 6, "SETUID": 7, "NET_BIND_SERVICE": 10, "NET_ADMIN": 12, "BPF": 39}


def capabilities(pid: int | str = "self") -> list[str]:
    """The effective capabilities portshard cares about (names without CAP_)."""
    try:
        value = _status_field(pid, b"CapEff:")
    except OSError:
        return []
    if value is None:
        return []
    mask = int(value, 16)
    return [name for name, bit in _CAPS.items() if mask >> bit & 1]


def netstat(group: str, names: tuple[str, ...]) -> dict[str, int]:
    """Counters of one group of /proc/net/netstat (e.g. TcpExt), by name; absent ones omitted."""
    try:
        lines = read("/proc/net/netstat").decode().splitlines()
    except OSError:
        return {}
    found: dict[str, int] = {}
    prefix = group + ":"
    rows = [line.split()[1:] for line in lines if line.startswith(prefix)]
    for head, values in zip(rows[::2], rows[1::2], strict=False):
        for key, value in zip(head, values, strict=False):
            if key in names:
                found[key] = int(value)
    return found


def udp_delivered(pid: int) -> int | None:
    """Datagrams handed to a program by a receive call in ``pid``'s network namespace (Udp
    and Udp6 InDatagrams of /proc/PID/net/snmp and snmp6: the kernel counts them in
    udp_recvmsg, at the dequeue, not at arrival); None once it has gone or when unreadable."""
    try:
        lines = read(f"/proc/{pid}/net/snmp").decode().splitlines()
        six = read(f"/proc/{pid}/net/snmp6").decode().split()
    except OSError:
        return None
    rows = [line.split()[1:] for line in lines if line.startswith("Udp:")]
    total = 0
    for head, values in zip(rows[::2], rows[1::2], strict=False):
        total += int(values[head.index("InDatagrams")]) if "InDatagrams" in head else 0
    for key, value in zip(six[::2], six[1::2], strict=False):
        if key == "Udp6InDatagrams":
            total += int(value)
    return total
