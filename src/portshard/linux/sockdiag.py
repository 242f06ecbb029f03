"""Socket tables: who holds a port, and the connections and listeners of processes.

sock_diag netlink (what ss(8) uses) filters by state in the kernel, and a LISTEN-only dump
skips the connection hash altogether (~25 µs). /proc/PID/net/tcp formats every socket of the
namespace under a lock per bucket: ~7 ms on an idle VM, ~16 ms with 5,000 TIME_WAIT sockets.
We fall back to it only for a process in another network namespace (a netlink socket sees its
creator's) or where AF_NETLINK is not allowed. Costs: listening_sockets_of ~140 µs,
connections_of 0.2-0.7 ms (one walk of the kernel's connection hash, which grows with the
host's TIME_WAIT sockets; connections_by_pid does one walk for many pids).

:func:`connections_of` returns 0 for a process that has exited (it holds nothing) and never
raises for that; use :func:`~portshard.linux.proc.alive` to tell "exited" from "idle". It
counts a TCP socket in the process's fd table when a peer is, or was until a half-close, on
the other end: ESTABLISHED, SYN_RECV (a fast-open child), FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT
(the client half-closed and may still wait for the reply), LAST_ACK and CLOSING. Not
counted: LISTEN, CLOSE (never connected, or reset), SYN_SENT (no peer yet). TIME_WAIT and
NEW_SYN_RECV sockets are never in an fd table. A process this user may not look into raises
:class:`~portshard.errors.NoAccess` rather than answering "no connections".

:func:`held_connections` (the drain's freeze-check) leaves out one kind of CLOSE_WAIT: a
keep-alive leftover, answered and then closed by its client, that the server keeps open until
its own idle timeout (hypercorn holds every one for its 5 s keep-alive: ``ss`` showed 100+
per worker under a curl loop, so a retiring worker never looked idle and each reload waited
--grace). Its client closed its side, so no request can come; nothing is unread (the FIN aside) and
nothing unsent; and the server sent data at or after the last data it received (tcp_info's
``last_data_sent`` <= ``last_data_recv``, in ms ago at the kernel's tick: 4 ms at HZ=250).
Stopping such a server loses nothing. A half-closed client still waiting for its answer (nc
-N: request, FIN) has data received and none sent since, so it still counts; the one case this
misjudges is a server that speaks first (a banner) and a request and FIN that arrive within the
same tick as the banner left, answered later: the retiring worker then gets its stop signal
(its shutdown answers it) and only a program that dies on that signal would drop it.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..address import Proto
from .proc import pids_by_inode, process_tree, program_name, read, socket_fds

if TYPE_CHECKING:  # no runtime import: `import portshard` stays light
    from .cgroup import Cgroup

__all__ = [
    "Holder",
    "connections_by_pid",
    "connections_of",
    "held_connections",
    "listener_cgroups",
    "listening_sockets_of",
    "port_holders",
    "port_sockets",
]

_TCP_LISTEN = "0A"
_UDP_UNCONNECTED = "07"
# States in which a peer is, or was until a half-close, on the other end (see module doc).
_CONNECTED = frozenset({b"01", b"03", b"04", b"05", b"08", b"09", b"0B"})


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


def port_sockets(proto: Proto, port: int) -> list[tuple[int, int, str]]:
    """(inode, uid, local address) of each socket bound to ``port`` (TCP: listening; UDP:
    unconnected), without looking for their pids (that scans every process).

    Asked of sock_diag, filtered by state in the kernel: a TCP listener dump walks the
    listening hash alone. /proc/net/tcp lists every connection and TIME_WAIT socket, and
    parsing it in Python took 0.47 s a call with ~120k TIME_WAIT sockets on the host: every
    slot's socket opening asks (`sockets._check_one_group`), 7.5 s of a `-w 16` boot."""
    try:
        return _diag_port_sockets(proto, port)
    except (_NoDiag, OSError):
        pass
    rows: list[tuple[int, int, str]] = []
    state = _TCP_LISTEN if proto is Proto.TCP else _UDP_UNCONNECTED
    for cols in _proc_net_rows(proto):
        if len(cols) < 10 or cols[3] != state:
            continue
        if int(cols[1].rsplit(":", 1)[1], 16) != port:
            continue
        rows.append((int(cols[9]), int(cols[7]), _decode_addr(cols[1])))
    return rows


def _diag_port_sockets(proto: Proto, port: int) -> list[tuple[int, int, str]]:
    tcp = proto is Proto.TCP
    states = _TCPF_LISTEN if tcp else _TCPF_CLOSE
    rows: list[tuple[int, int, str]] = []
    for data, msg in _diag_messages(socket.IPPROTO_TCP if tcp else socket.IPPROTO_UDP, states):
        if int.from_bytes(data[msg + 4 : msg + 6], "big") != port or data[msg + 1] != (
            _TCP_LISTEN_STATE if tcp else _CLOSE_STATE
        ):
            continue
        family = data[msg]
        if family == socket.AF_INET:
            local = f"{socket.inet_ntop(socket.AF_INET, data[msg + 8 : msg + 12])}:{port}"
        elif family == socket.AF_INET6:
            local = f"[{socket.inet_ntop(socket.AF_INET6, data[msg + 8 : msg + 24])}]:{port}"
        else:
            continue
        uid, inode = _DIAG_UID_INODE.unpack_from(data, msg + 64)
        rows.append((inode, uid, local))
    return rows


def port_holders(proto: Proto, port: int) -> list[Holder]:
    """Sockets bound to ``port`` (TCP: listening; UDP: unconnected), with their owner pids."""
    rows = port_sockets(proto, port)
    pids = pids_by_inode({inode for inode, _, _ in rows})
    holders = []
    for inode, uid, local in rows:
        pid = pids.get(inode)
        holders.append(Holder(inode, uid, local, pid, program_name(pid) if pid else None))
    return holders


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
_DIAG_REQ_V1 = struct.Struct("=BxxB48xI4x")
# struct inet_diag_msg: family, state, timer, retrans, then the sockid (sport in network
# order at 4), expires, rqueue, wqueue, uid, inode (at 68)
_DIAG_MSG_MIN = 72
_DIAG_INODE = struct.Struct("=I")
_DIAG_INODE_OFFSET = 68
_TCPF_LISTEN = 1 << 10
_TCPF_CONNECTED = sum(1 << int(st, 16) for st in _CONNECTED)
_TCPF_CLOSE = 1 << 7  # an unconnected UDP socket
_TCP_LISTEN_STATE = 10
_CLOSE_STATE = 7
_DIAG_UID_INODE = struct.Struct("=II")  # uid, inode at 64 in inet_diag_msg

_Row = tuple[int, int, int]  # state, local port, inode
_CLOSE_WAIT = 8
_TCPF_CLOSE_WAIT = 1 << _CLOSE_WAIT
_INET_DIAG_INFO = 2  # the attribute holding struct tcp_info (ext bit 1 << (2 - 1))
_DIAG_QUEUES = struct.Struct("=II")  # rqueue, wqueue, at 56 in inet_diag_msg
_RTA = struct.Struct("=HH")  # rtattr: len, type
# struct tcp_info: tcpi_last_data_sent at 44, tcpi_last_data_recv at 52 (ms ago);
# tcpi_data_segs_out at 156 (Linux 4.6)
_INFO_TIMES = struct.Struct("=I4xI")
_INFO_SEGS_OUT = struct.Struct("=I")
_INFO_MIN = 160
_INET_DIAG_CGROUP_ID = 21  # u64, sent for every full socket (Linux 5.9; no ext bit)


class _NoDiag(Exception):
    """sock_diag is not usable here; read /proc instead."""


def _diag_requests(proto: int, states: int, ext: int = 0) -> list[bytes]:
    if proto == socket.IPPROTO_TCP:
        # One walk of the connection hash for both families: the old TCPDIAG_GETSOCK request
        # dumps AF_INET and AF_INET6 together. A walk costs ~150 µs on an idle 2-core VM
        # (262,144 buckets) plus ~35 ns per TIME_WAIT socket, so walking once matters.
        body = _DIAG_REQ_V1.pack(0, ext, states)
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
    for data, msg in _diag_messages(proto, states):
        state = data[msg + 1]
        port = int.from_bytes(data[msg + 4 : msg + 6], "big")
        (inode,) = _DIAG_INODE.unpack_from(data, msg + _DIAG_INODE_OFFSET)
        yield state, port, inode


def _answered_leftovers() -> set[int]:
    """Inodes of the CLOSE_WAIT TCP sockets of our namespace that are answered keep-alive
    leftovers (:func:`_answered`)."""
    found = set()
    for data, msg in _diag_messages(
        socket.IPPROTO_TCP, _TCPF_CLOSE_WAIT, 1 << (_INET_DIAG_INFO - 1)
    ):
        if _answered(data, msg):
            found.add(_DIAG_INODE.unpack_from(data, msg + _DIAG_INODE_OFFSET)[0])
    return found


def _answered(data: bytes, msg: int) -> bool:
    """The CLOSE_WAIT socket of the inet_diag_msg at ``msg`` (with its tcp_info) is an answered
    keep-alive leftover (module doc): nothing unread or unsent, data sent at or after the last
    data received. The receive queue counts the FIN, last in sequence: 1 is the FIN alone (a
    frozen worker has not read it yet), which closing does not turn into a reset."""
    rqueue, wqueue = _DIAG_QUEUES.unpack_from(data, msg + 56)
    info = _attribute(data, msg, _INET_DIAG_INFO)
    if rqueue > 1 or wqueue or info is None or info[1] < _INFO_MIN:
        return False
    at = info[0]
    sent_ago, received_ago = _INFO_TIMES.unpack_from(data, at + 44)
    (segs_out,) = _INFO_SEGS_OUT.unpack_from(data, at + 156)
    return bool(segs_out) and sent_ago <= received_ago


def _attribute(data: bytes, msg: int, kind: int) -> tuple[int, int] | None:
    """(offset, length) of the payload of attribute ``kind`` of the inet_diag_msg at ``msg``."""
    end = msg - _NLMSG_HDR.size + _NLMSG_HDR.unpack_from(data, msg - _NLMSG_HDR.size)[0]
    at = msg + _DIAG_MSG_MIN
    while at + _RTA.size <= end:
        length, rta_kind = _RTA.unpack_from(data, at)
        if length < _RTA.size:
            return None
        if rta_kind == kind:
            return at + _RTA.size, length - _RTA.size
        at += (length + 3) & ~3
    return None


def _diag_messages(proto: int, states: int, ext: int = 0) -> Iterator[tuple[bytes, int]]:
    """(reply, offset of an inet_diag_msg in it) for every socket of our namespace in
    ``states`` (a bitmask), with the ``ext`` attributes asked for."""
    try:
        nl = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG
        )
    except OSError as exc:
        raise _NoDiag from exc
    with nl:
        for request in _diag_requests(proto, states, ext):
            nl.send(request)
            yield from _diag_replies(nl, _NLMSG_HDR.unpack_from(request)[1])


def _diag_replies(nl: socket.socket, kind_wanted: int) -> Iterator[tuple[bytes, int]]:
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
            if kind == kind_wanted and length >= _NLMSG_HDR.size + _DIAG_MSG_MIN:
                yield data, at + _NLMSG_HDR.size
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
            data = read(f"/proc/{pid}/net/{table}")
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
    held = {pid: set(socket_fds(pid).values()) for pid in pids}
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
    held = {pid: set(socket_fds(pid).values())}
    tcp = _tables(held, socket.IPPROTO_TCP, _TCPF_LISTEN)[pid]
    found = {inode for _, port, inode in tcp if ports is None or port in ports}
    udp = _tables(held, socket.IPPROTO_UDP, _TCPF_CLOSE)[pid]
    found.update(inode for _, port, inode in udp if port and (ports is None or port in ports))
    return found


def held_connections(
    pid: int,
    listeners: AbstractSet[int],
    ports: AbstractSet[int],
    group: Cgroup | None = None,
    seen: set[int] | None = None,
) -> int:
    """Client connections (local port one of ``ports``) that the process tree holds (the
    worker's ``group`` members if given: its escaped descendants included), less answered
    keep-alive leftovers (module doc): what a retiring worker could still lose.

    First the tree's own fd tables (microseconds): no socket besides the listeners means
    nothing is held. Only otherwise walk the socket table once (sock_diag, filtered by state
    in the kernel, each socket with its tcp_info) for live connections on our ports (a DB
    connection does not count), judging those in CLOSE_WAIT (:func:`_held_less_leftovers`).
    """
    members = group.members() if group is not None else []
    return held_by_members(
        members or process_tree(pid), listeners, ports, leftovers=False, seen=seen
    )


def held_by_members(
    members: Iterable[int],
    listeners: AbstractSet[int],
    ports: AbstractSet[int],
    *,
    leftovers: bool = True,
    seen: set[int] | None = None,
) -> int:
    """:func:`held_connections` for a known set of processes (a cgroup's members), counting
    answered keep-alive leftovers too unless ``leftovers`` is False.

    ``seen``: inodes an earlier walk found not to be connections on
    ``ports``; the walk is skipped when the tree holds no other, and adds those it finds. A
    connection on a served port is born connected (accept() makes a new inode), so a socket
    that was not one never becomes one. Readiness asks every tick while a worker starts, and a
    pre-fork server's tree holds Unix sockets from its start (node cluster's IPC channels):
    every look walked the host's connection hash, 60 ms on average and up to 120 ms with
    ~120k TIME_WAIT sockets, the loop blocked meanwhile; and each freeze-check of such a
    tree walked once more, the worker frozen meanwhile."""
    held = {member: set(socket_fds(member).values()) for member in members}
    unknown = set().union(*held.values()) - listeners
    if seen is not None:
        unknown -= seen
    if not unknown:
        return 0
    if not leftovers and all(_same_netns(pid) for pid in held):
        matched: set[int] = set()
        try:
            count = _held_less_leftovers(set().union(*held.values()), ports, matched)
        except _NoDiag:
            pass  # /proc/PID/net below
        else:
            if seen is not None:
                seen |= unknown - matched
            return count
    rows = [
        (state, inode)
        for found in _tables(held, socket.IPPROTO_TCP, _TCPF_CONNECTED).values()
        for state, port, inode in found
        if port in ports
    ]
    if seen is not None:
        seen |= unknown - {inode for _, inode in rows}
    if not leftovers and any(state == _CLOSE_WAIT for state, _ in rows):
        try:
            answered = _answered_leftovers()
        except _NoDiag:  # cannot tell: every one counts
            answered = set()
        rows = [(state, inode) for state, inode in rows if inode not in answered]
    return len(rows)


def _held_less_leftovers(
    inodes: AbstractSet[int], ports: AbstractSet[int], found: set[int] | None = None
) -> int:
    """The connections among ``inodes`` (our namespace) on ``ports``, less answered keep-alive
    leftovers, in one walk of the kernel's connection hash: every connected socket comes with
    its tcp_info, which only a CLOSE_WAIT one needs. Two walks (connections, then the CLOSE_WAIT
    sockets with tcp_info) cost twice, and a walk grows with the host's TIME_WAIT sockets: with
    the ~110k that curl-like clients leave on a busy host, 45-60 ms each, while the worker stays
    frozen (hypercorn keeps its leftovers, so its freeze-check always walks)."""
    held = 0
    for data, msg in _diag_messages(
        socket.IPPROTO_TCP, _TCPF_CONNECTED, 1 << (_INET_DIAG_INFO - 1)
    ):
        if int.from_bytes(data[msg + 4 : msg + 6], "big") not in ports:
            continue
        (inode,) = _DIAG_INODE.unpack_from(data, msg + _DIAG_INODE_OFFSET)
        if inode not in inodes:
            continue
        if found is not None:  # a connection on our ports (a leftover too)
            found.add(inode)
        held += not (data[msg + 1] == _CLOSE_WAIT and _answered(data, msg))
    return held


def listener_cgroups(inodes: AbstractSet[int]) -> dict[int, int]:
    """The cgroup v2 id (the inode of its directory) of each TCP listener of our namespace
    whose inode is in ``inodes``: the cgroup the kernel fixed when it was created, whose
    SOCK_OPS programs see its connections. Missing: not found, or a kernel that does not say.
    Raises OSError if sock_diag is not usable here."""
    found: dict[int, int] = {}
    try:
        for data, msg in _diag_messages(socket.IPPROTO_TCP, _TCPF_LISTEN):
            (inode,) = _DIAG_INODE.unpack_from(data, msg + _DIAG_INODE_OFFSET)
            attr = _attribute(data, msg, _INET_DIAG_CGROUP_ID) if inode in inodes else None
            if attr is not None and attr[1] >= 8:
                (found[inode],) = struct.unpack_from("=Q", data, attr[0])
    except _NoDiag as exc:
        raise OSError(f"sock_diag: {exc}") from None
    return found
