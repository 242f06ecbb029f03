"""Look at sockets and processes from the outside: who holds a port, how deep a queue is.

Everything here reads /proc or asks the kernel about a socket; nothing changes state. Costs
per call on Linux 6.18, a 2-core x86_64 VM: queue_depth ~1.6 µs, queue_depth_fd ~3.3 µs,
socket_inode ~0.9 µs, alive ~8 µs, waiting_for_work 25-40 µs, listening_sockets_of ~140 µs,
connections_of 0.2-0.7 ms (one walk of the kernel's connection hash, which grows with the
host's TIME_WAIT sockets; connections_by_pid does one walk for many pids).

What each call decides, and why:

- :func:`queue_depth` raises :class:`NotListening` for anything that is not a listening TCP
  socket (UDP, Unix, an unconnected or connected TCP socket, a listener someone shut down).
  A slot's socket that stops listening is damaged and must be replaced, so the supervisor
  should hear about it, not read a quiet zero.
- :func:`connections_of` returns 0 for a process that has exited (it holds nothing) and never
  raises for that; use :func:`alive` to tell "exited" from "idle". It counts a TCP socket in
  the process's fd table when a peer is, or was until a half-close, on the other end:
  ESTABLISHED, SYN_RECV (a fast-open child), FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT (the client
  half-closed and may still wait for the reply), LAST_ACK and CLOSING. Not counted: LISTEN,
  CLOSE (never connected, or reset), SYN_SENT (no peer yet). TIME_WAIT and NEW_SYN_RECV
  sockets are never in an fd table.
- :func:`waiting_for_work` returns False for a process that has exited or is stopped; the
  notes above ``_Syscalls`` say what it recognises and what it cannot see.
- A process this user may not look into (another user's, without root or CAP_SYS_PTRACE)
  raises :class:`NoAccess` (a PermissionError) rather than answering "no connections" or
  "not waiting": either lie would let a supervisor kill a busy worker or wait for nothing.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import socket
import stat
import struct
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from .address import Proto
from .errors import PortshardError

__all__ = [
    "Holder",
    "InspectError",
    "NoAccess",
    "NotListening",
    "QueueDepth",
    "alive",
    "connections_by_pid",
    "connections_of",
    "listening_sockets_of",
    "pids_by_inode",
    "port_holders",
    "program_name",
    "queue_depth",
    "queue_depth_fd",
    "socket_inode",
    "sockets_of",
    "waiting_for_work",
]

_TCP_LISTEN = "0A"
_UDP_UNCONNECTED = "07"

# include/net/tcp_states.h; /proc/net/tcp prints these as %02X.
_TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
}
_TCP_STATE_LISTEN = 10
# States in which a peer is, or was until a half-close, on the other end (see module doc).
_CONNECTED = frozenset({b"01", b"03", b"04", b"05", b"08", b"09", b"0B"})

_SOCKET_LINK = "socket:["


class InspectError(PortshardError):
    """The kernel would not show us what we asked about a socket or a process."""


class NotListening(InspectError, ValueError):
    """A socket that has no accept queue: not TCP, or not (or no longer) listening."""


class NoAccess(InspectError, PermissionError):
    """This user may not look into that process (its fd table, its threads' syscalls)."""


@dataclass(frozen=True)
class Holder:
    """A socket bound to a port, and the process holding it if we can see it."""

    inode: int
    uid: int
    local: str
    pid: int | None
    program: str | None

    def describe(self) -> str:
        if self.pid is None:
            return (
                f"a socket on {self.local} (inode {self.inode}) of a process this user cannot see"
            )
        return f"pid {self.pid} ({self.program or '?'}) on {self.local}"


@dataclass(frozen=True)
class QueueDepth:
    """The accept queue of a listening TCP socket."""

    queued: int  # connections the handshake completed, waiting for accept()
    backlog: int  # listen() backlog after the kernel capped it at net.core.somaxconn


# ---------------------------------------------------------------------------------------------
# Small readers. os.open/os.read instead of open(): a /proc read is then ~2 µs, not ~6 µs.


def _read(path: str) -> bytes:
    """All of a /proc file (seq_file files hand out at most a page or so per read)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _read_small(path: str) -> bytes:
    """A /proc file known to be short (syscall, stat, wchan): one read."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def _no_access(pid: int, path: str, exc: OSError) -> NoAccess:
    return NoAccess(
        f"cannot read {path}: {exc.strerror or exc}; looking into pid {pid} "
        f"({program_name(pid) or '?'}) needs the rights to ptrace it: run the supervisor as "
        f"root, or as the same user as the process"
    )


# ---------------------------------------------------------------------------------------------
# Who holds a port (used by sockets.py to explain EADDRINUSE).


def _decode_addr(hexaddr: str) -> str:
    host_hex, port_hex = hexaddr.split(":")
    port = int(port_hex, 16)
    raw = bytes.fromhex(host_hex)
    if len(raw) == 4:
        return f"{socket.inet_ntop(socket.AF_INET, raw[::-1])}:{port}"
    # /proc prints IPv6 as four host-order 32-bit words.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return f"[{socket.inet_ntop(socket.AF_INET6, words)}]:{port}"


def _proc_net_rows(proto: Proto) -> Iterator[list[str]]:
    for name in (proto.value, proto.value + "6"):
        try:
            with open(f"/proc/net/{name}") as f:
                next(f, None)
                for line in f:
                    yield line.split()
        except OSError:
            continue


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


def program_name(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def port_holders(proto: Proto, port: int) -> list[Holder]:
    """Sockets bound to ``port`` (TCP: listening; UDP: unconnected), with their owner pids."""
    rows: list[tuple[int, int, str]] = []
    state = _TCP_LISTEN if proto is Proto.TCP else _UDP_UNCONNECTED
    for cols in _proc_net_rows(proto):
        if len(cols) < 10 or cols[3] != state:
            continue
        if int(cols[1].rsplit(":", 1)[1], 16) != port:
            continue
        rows.append((int(cols[9]), int(cols[7]), _decode_addr(cols[1])))
    pids = pids_by_inode({inode for inode, _, _ in rows})
    holders = []
    for inode, uid, local in rows:
        pid = pids.get(inode)
        holders.append(Holder(inode, uid, local, pid, program_name(pid) if pid else None))
    return holders


# ---------------------------------------------------------------------------------------------
# Accept-queue depth: getsockopt(IPPROTO_TCP, TCP_INFO) on a listener.
#
# struct tcp_info (include/uapi/linux/tcp.h) starts with eight u8 fields (tcpi_state first),
# then u32 tcpi_rto, tcpi_ato, tcpi_snd_mss, tcpi_rcv_mss, tcpi_unacked, tcpi_sacked. On a
# LISTEN socket tcp_get_info() reuses the last two: tcpi_unacked = sk_ack_backlog (connections
# waiting for accept), tcpi_sacked = sk_max_ack_backlog (the backlog). We ask for the first
# 32 bytes only; the kernel copies min(len, sizeof) and the layout only ever grows at the end.

_TCPI_STATE_OFFSET = 0
_TCPI_UNACKED_OFFSET = 24  # 8 x u8 + 4 x u32
_TCPI_PREFIX = 32  # through tcpi_sacked
_TCPI_QUEUE = struct.Struct("=II")  # tcpi_unacked, tcpi_sacked, native byte order
_NOT_TCP_ERRNOS = frozenset({errno.EOPNOTSUPP, errno.ENOPROTOOPT, errno.ENOTSOCK})


def _parse_tcp_info(raw: bytes, what: str) -> QueueDepth:
    if len(raw) < _TCPI_PREFIX:
        raise InspectError(
            f"TCP_INFO on {what} returned {len(raw)} bytes, fewer than the {_TCPI_PREFIX} "
            f"every Linux since 2.6 returns; this kernel is not supported by queue_depth"
        )
    state = raw[_TCPI_STATE_OFFSET]
    if state != _TCP_STATE_LISTEN:
        name = _TCP_STATES.get(state, str(state))
        raise NotListening(
            f"{what} is a TCP socket in state {name}, not LISTEN, so it has no accept queue; "
            f"if it is a slot's listener, something called shutdown() or close() on it: "
            f"replace it with a new listening socket"
        )
    queued, backlog = _TCPI_QUEUE.unpack_from(raw, _TCPI_UNACKED_OFFSET)
    return QueueDepth(queued=queued, backlog=backlog)


def _not_tcp(what: str, exc: OSError) -> NotListening:
    return NotListening(
        f"{what} is not a TCP socket (TCP_INFO: {exc.strerror or exc}); only TCP listeners "
        f"have an accept queue, UDP and Unix sockets have none"
    )


def queue_depth(sock: socket.socket) -> QueueDepth:
    """Connections waiting for accept() on a listening TCP socket, and its backlog.

    Raises :class:`NotListening` if ``sock`` is not a TCP socket in LISTEN state.
    """
    what = f"socket fd {sock.fileno()}"
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_PREFIX)
    except OSError as exc:
        if exc.errno in _NOT_TCP_ERRNOS:
            raise _not_tcp(what, exc) from exc
        raise
    return _parse_tcp_info(raw, what)


@functools.cache
def _libc_getsockopt() -> Callable[..., int]:
    fn = ctypes.CDLL(None, use_errno=True).getsockopt
    fn.argtypes = [
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_uint32),
    ]
    fn.restype = ctypes.c_int
    return fn


def queue_depth_fd(fd: int) -> QueueDepth:
    """:func:`queue_depth` for a bare file descriptor.

    Calls getsockopt(2) through libc rather than wrapping ``fd`` in a socket object: wrapping
    would set O_NONBLOCK on the shared file description whenever socket.setdefaulttimeout()
    is in effect, changing the socket under every process that holds it.
    """
    what = f"fd {fd}"
    buf = ctypes.create_string_buffer(_TCPI_PREFIX)
    length = ctypes.c_uint32(_TCPI_PREFIX)
    if _libc_getsockopt()(fd, socket.IPPROTO_TCP, socket.TCP_INFO, buf, ctypes.byref(length)):
        code = ctypes.get_errno()
        exc = OSError(code, os.strerror(code))
        if code in _NOT_TCP_ERRNOS:
            raise _not_tcp(what, exc) from exc
        raise exc
    return _parse_tcp_info(buf.raw[: length.value], what)


def socket_inode(sock: int | socket.socket) -> int:
    """The inode number of a socket: its name in /proc/*/fd links and /proc/net tables."""
    fd = sock if isinstance(sock, int) else sock.fileno()
    st = os.fstat(fd)
    if not stat.S_ISSOCK(st.st_mode):
        raise InspectError(f"fd {fd} is not a socket (mode {st.st_mode:o}); pass a socket")
    return st.st_ino


# ---------------------------------------------------------------------------------------------
# Sockets and connections of a process, from /proc/PID/fd and /proc/PID/net/*.
# /proc/PID/net shows the process's own network namespace, which need not be ours.


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie. (Pids are reused: prefer a pidfd.)"""
    try:
        raw = _read_small(f"/proc/{pid}/stat")
    except (FileNotFoundError, ProcessLookupError):
        return False
    end = raw.rfind(b")")
    return raw[end + 2 : end + 3] not in (b"Z", b"X", b"")


def sockets_of(pid: int) -> set[int]:
    """Inodes of every socket in ``pid``'s fd table (empty once it has exited)."""
    return set(_socket_fds(pid).values())


def _socket_fds(pid: int) -> dict[int, int]:
    """fd number → socket inode, for every socket in the process's fd table."""
    base = f"/proc/{pid}/fd/"
    try:
        names = os.listdir(base)
    except (FileNotFoundError, ProcessLookupError):
        return {}
    except PermissionError as exc:
        raise _no_access(pid, base.rstrip("/"), exc) from exc
    found: dict[int, int] = {}
    for name in names:
        try:
            target = os.readlink(base + name)
        except OSError:  # closed since listdir
            continue
        if target.startswith(_SOCKET_LINK):
            found[int(name)] = int(target[len(_SOCKET_LINK) : -1])
    return found


# Socket tables. sock_diag netlink (what ss(8) uses) filters by state in the kernel, and a
# LISTEN-only dump skips the connection hash altogether (~25 µs). /proc/PID/net/tcp formats
# every socket of the namespace under a lock per bucket: ~7 ms on the same idle VM, ~16 ms
# with 5,000 TIME_WAIT sockets. We fall back to it only for a process in another network
# namespace (a netlink socket sees its creator's) or where AF_NETLINK is not allowed.

_NETLINK_SOCK_DIAG = 4
_TCPDIAG_GETSOCK = 18
_SOCK_DIAG_BY_FAMILY = 20
_NLM_DUMP = 0x001 | 0x300  # NLM_F_REQUEST | NLM_F_DUMP
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# struct inet_diag_req_v2: family, protocol, ext, pad, states, then a zeroed inet_diag_sockid
_DIAG_REQ = struct.Struct("=BBBxI48x")
# struct inet_diag_req (v1): family (0: both), src_len, dst_len, ext, sockid, states, dbs
_DIAG_REQ_V1 = struct.Struct("=B3x48xI4x")
# struct inet_diag_msg: family, state, timer, retrans, then the sockid (sport in network
# order at 4), expires, rqueue, wqueue, uid, inode (at 68)
_DIAG_MSG_MIN = 72
_DIAG_INODE = struct.Struct("=I")
_DIAG_INODE_OFFSET = 68
_TCPF_LISTEN = 1 << 10
_TCPF_CONNECTED = sum(1 << int(st, 16) for st in _CONNECTED)
_TCPF_CLOSE = 1 << 7  # an unconnected UDP socket

_Row = tuple[int, int, int]  # state, local port, inode


class _NoDiag(Exception):
    """sock_diag is not usable here; read /proc instead."""


def _diag_requests(proto: int, states: int) -> list[bytes]:
    if proto == socket.IPPROTO_TCP:
        # One walk of the connection hash for both families: the old TCPDIAG_GETSOCK request
        # dumps AF_INET and AF_INET6 together. A walk costs ~150 µs on an idle 2-core VM
        # (262,144 buckets) plus ~35 ns per TIME_WAIT socket, so walking once matters.
        body = _DIAG_REQ_V1.pack(0, states)
        return [
            _NLMSG_HDR.pack(_NLMSG_HDR.size + len(body), _TCPDIAG_GETSOCK, _NLM_DUMP, 1, 0) + body
        ]
    requests = []
    for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), 1):
        body = _DIAG_REQ.pack(family, proto, 0, states)
        head = _NLMSG_HDR.pack(_NLMSG_HDR.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_DUMP, seq, 0)
        requests.append(head + body)
    return requests


def _diag_dump(proto: int, states: int) -> Iterator[_Row]:
    """(state, local port, inode) of every socket of our namespace in ``states`` (a bitmask)."""
    try:
        nl = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG
        )
    except OSError as exc:
        raise _NoDiag from exc
    with nl:
        for request in _diag_requests(proto, states):
            nl.send(request)
            yield from _diag_replies(nl, _NLMSG_HDR.unpack_from(request)[1])


def _diag_replies(nl: socket.socket, kind_wanted: int) -> Iterator[_Row]:
    while True:
        data = nl.recv(1 << 16)
        at = 0
        while at + _NLMSG_HDR.size <= len(data):
            length, kind, _, _, _ = _NLMSG_HDR.unpack_from(data, at)
            if length < _NLMSG_HDR.size:
                raise _NoDiag("malformed netlink reply")
            if kind == _NLMSG_DONE:
                return
            if kind == _NLMSG_ERROR:  # e.g. no udp_diag in this kernel
                (code,) = struct.unpack_from("=i", data, at + _NLMSG_HDR.size)
                raise _NoDiag(os.strerror(-code))
            msg = at + _NLMSG_HDR.size
            if kind == kind_wanted and length >= _NLMSG_HDR.size + _DIAG_MSG_MIN:
                state = data[msg + 1]
                port = int.from_bytes(data[msg + 4 : msg + 6], "big")
                (inode,) = _DIAG_INODE.unpack_from(data, msg + _DIAG_INODE_OFFSET)
                yield state, port, inode
            at += (length + 3) & ~3
        if not data:
            raise _NoDiag("netlink socket closed")


def _same_netns(pid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return False


def _proc_net(pid: int, proto: int, states: int) -> Iterator[_Row]:
    """Like _diag_dump, from /proc/PID/net/{tcp,udp}{,6}: the process's own namespace."""
    name = "tcp" if proto == socket.IPPROTO_TCP else "udp"
    for table in (name, name + "6"):
        try:
            data = _read(f"/proc/{pid}/net/{table}")
        except (FileNotFoundError, ProcessLookupError):  # exited, or no IPv6
            continue
        for line in data.split(b"\n")[1:]:
            cols = line.split()
            if len(cols) < 10:
                continue
            state = int(cols[3], 16)
            if states & (1 << state):
                local = cols[1]
                yield state, int(local[local.rindex(b":") + 1 :], 16), int(cols[9])


def _tables(held: dict[int, set[int]], proto: int, states: int) -> dict[int, list[_Row]]:
    """For each pid, the rows in ``states`` of the sockets among its ``held`` inodes.

    One sock_diag dump serves every pid in our network namespace; a pid in another namespace
    (or any pid, where AF_NETLINK is not allowed) costs a read of its /proc/PID/net tables.
    """
    found: dict[int, list[_Row]] = {pid: [] for pid in held}
    wanted: dict[int, list[int]] = {}  # inode → pids in our namespace (a socket may be shared)
    elsewhere = []
    for pid, inodes in held.items():
        if not inodes:
            continue
        if _same_netns(pid):
            for inode in inodes:
                wanted.setdefault(inode, []).append(pid)
        else:
            elsewhere.append(pid)
    if wanted:
        try:
            for row in list(_diag_dump(proto, states)):
                for pid in wanted.get(row[2], ()):
                    found[pid].append(row)
        except _NoDiag:
            elsewhere.extend({pid for pids in wanted.values() for pid in pids})
    for pid in elsewhere:
        found[pid] = [row for row in _proc_net(pid, proto, states) if row[2] in held[pid]]
    return found


def connections_by_pid(
    pids: Iterable[int], *, ports: AbstractSet[int] | None = None
) -> dict[int, int]:
    """:func:`connections_of` for several processes, with a single walk of the socket table."""
    held = {pid: set(_socket_fds(pid).values()) for pid in pids}
    tables = _tables(held, socket.IPPROTO_TCP, _TCPF_CONNECTED)
    return {
        pid: sum(1 for _, port, _ in rows if ports is None or port in ports)
        for pid, rows in tables.items()
    }


def connections_of(pid: int, *, ports: AbstractSet[int] | None = None) -> int:
    """How many TCP connections ``pid`` holds in its fd table (0 once it has exited).

    Counts the states listed in the module doc. ``ports`` restricts the count to connections
    whose local port is one of them (the served ports), so that a worker's own outgoing
    connections (to a database, say) do not keep it from being stopped. Sockets held only by
    the process's children are not counted: ask about each pid.
    """
    return connections_by_pid([pid], ports=ports)[pid]


def listening_sockets_of(pid: int, *, ports: AbstractSet[int] | None = None) -> set[int]:
    """Inodes of the LISTEN TCP sockets and bound, unconnected UDP sockets in ``pid``'s fds
    (only those on one of ``ports`` if given)."""
    held = {pid: set(_socket_fds(pid).values())}
    tcp = _tables(held, socket.IPPROTO_TCP, _TCPF_LISTEN)[pid]
    found = {inode for _, port, inode in tcp if ports is None or port in ports}
    udp = _tables(held, socket.IPPROTO_UDP, _TCPF_CLOSE)[pid]
    found.update(inode for _, port, inode in udp if port and (ports is None or port in ports))
    return found


# ---------------------------------------------------------------------------------------------
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
# or nothing), a thread busy-polling without blocking, waits in a child process, 32-bit
# (compat) processes on a 64-bit kernel (different syscall numbers), a process that is
# between two waits at the instant we look (busy, so "not waiting" is then the truth: sample
# again), and interest in a socket that the program is not going to act on.


@dataclass(frozen=True)
class _Syscalls:
    on_fd: frozenset[int]  # ARG0 = the fd waited on
    epoll: frozenset[int]  # ARG0 = epoll fd
    poll: frozenset[int]  # ARG0 = struct pollfd *, ARG1 = nfds
    select: frozenset[int]  # ARG0 = nfds, ARG1 = fd_set *readfds
    restart: int


_SYSCALLS = {
    # arch/x86/entry/syscalls/syscall_64.tbl
    "x86_64": _Syscalls(
        # accept accept4 recvfrom recvmsg recvmmsg read readv
        on_fd=frozenset({43, 288, 45, 47, 299, 0, 19}),
        epoll=frozenset({232, 281, 441}),  # epoll_wait epoll_pwait epoll_pwait2
        poll=frozenset({7, 271}),  # poll ppoll
        select=frozenset({23, 270}),  # select pselect6
        restart=219,
    ),
    # include/uapi/asm-generic/unistd.h (arm64 has no epoll_wait, poll or select, only the p-forms)
    "aarch64": _Syscalls(
        on_fd=frozenset({202, 242, 207, 212, 243, 63, 65}),
        epoll=frozenset({22, 441}),
        poll=frozenset({73}),
        select=frozenset({72}),
        restart=128,
    ),
}
_SYSCALLS["amd64"] = _SYSCALLS["x86_64"]
_SYSCALLS["arm64"] = _SYSCALLS["aarch64"]

_POLLIN = 0x001 | 0x040  # POLLIN | POLLRDNORM (EPOLLIN and EPOLLRDNORM have the same values)
_POLLFD = struct.Struct("=ihh")  # struct pollfd: int fd; short events; short revents
_MAX_PEEK = 1 << 16  # bytes of pollfd array / fd_set we are willing to read
_WAITING_STATES = frozenset(b"SDRI")
_EPOLL_LINK = "anon_inode:[eventpoll]"


@functools.cache
def _syscalls() -> _Syscalls:
    machine = os.uname().machine
    table = _SYSCALLS.get(machine)
    if table is None:
        raise InspectError(
            f"waiting_for_work knows the syscall numbers of x86_64 and aarch64, not {machine}; "
            f"use another readiness source (sd_notify READY=1, an HTTP probe or a delay)"
        )
    return table


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
        if target is None or not target.startswith(_SOCKET_LINK):
            return False
        return int(target[len(_SOCKET_LINK) : -1]) in self.inodes

    def holds_any(self) -> bool:
        return not self.inodes.isdisjoint(_socket_fds(self.pid).values())

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
            info = _read(f"/proc/{self.pid}/fdinfo/{epfd}")
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

    def thread_waits(self, table: _Syscalls, tid: str) -> bool:
        task = f"/proc/{self.pid}/task/{tid}/"
        try:
            fields = _read_small(task + "syscall").split()
        except (FileNotFoundError, ProcessLookupError):  # thread gone
            return False
        except PermissionError as exc:
            raise _no_access(self.pid, task + "syscall", exc) from exc
        if len(fields) < 7 or fields[0] == b"running":
            return False
        nr = int(fields[0])
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
                wchan = _read_small(task + "wchan")
            except OSError:
                return False
            found = b"poll" in wchan and self.poll_watches(args[0], args[1])
        else:
            return False
        return found and self.thread_state(task) in _WAITING_STATES

    @staticmethod
    def thread_state(task: str) -> int:
        try:
            raw = _read_small(task + "stat")
        except OSError:
            return ord("X")
        end = raw.rfind(b")")
        return raw[end + 2] if end + 2 < len(raw) else ord("X")


def waiting_for_work(pid: int, inodes: AbstractSet[int]) -> bool:
    """True when a thread of ``pid`` is blocked waiting for work on one of these sockets.

    ``inodes`` are socket inodes (:func:`socket_inode`). Looks only at /proc: the program
    needs no cooperation. See the notes above ``_Syscalls`` for what it recognises and what
    it cannot see. False for a process that has exited or is stopped; raises
    :class:`NoAccess` when this user may not look into the process.
    """
    if not inodes:
        return False
    table = _syscalls()
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
