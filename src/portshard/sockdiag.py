"""TCP sockets of this network namespace via sock_diag netlink, filtered in the kernel.

/proc/net/tcp formats every socket as text, TIME_WAIT included: after a burst of short
connections it holds tens of thousands of rows and takes 100 ms+ to read. A sock_diag dump
asks only for the states we want, so it stays fast under load. Used while a worker is frozen,
where every millisecond is added to the latency of whatever the worker holds.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

__all__ = ["LIVE_STATES", "TcpSocket", "dump_tcp"]

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_NLMSG_DONE = 3
_NLMSG_ERROR = 2

# TCP states (include/net/tcp_states.h)
ESTABLISHED, SYN_SENT, SYN_RECV, FIN_WAIT1, FIN_WAIT2, TIME_WAIT = 1, 2, 3, 4, 5, 6
CLOSE, CLOSE_WAIT, LAST_ACK, LISTEN, CLOSING = 7, 8, 9, 10, 11
# A connection someone may still be waiting on an answer from (not LISTEN, not TIME_WAIT).
LIVE_STATES = (ESTABLISHED, SYN_RECV, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING)

_HDR = struct.Struct("=IHHII")  # nlmsghdr
_REQ = struct.Struct("=BBBBI")  # inet_diag_req_v2 head: family, protocol, ext, pad, states
_ID = struct.Struct("!HH16s16s")  # inet_diag_sockid head: sport, dport (network order), src, dst
_MSG = struct.Struct("=BBBB")  # inet_diag_msg head: family, state, timer, retrans


@dataclass(frozen=True)
class TcpSocket:
    inode: int
    state: int
    sport: int
    dport: int


def _request(family: int, states: int) -> bytes:
    sockid = _ID.pack(0, 0, b"\0" * 16, b"\0" * 16) + struct.pack("=IQ", 0, 0xFFFFFFFFFFFFFFFF)
    body = _REQ.pack(family, socket.IPPROTO_TCP, 0, 0, states) + sockid
    return (
        _HDR.pack(_HDR.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0)
        + body
    )


def dump_tcp(states: tuple[int, ...] = LIVE_STATES) -> list[TcpSocket]:
    """Every TCP socket (IPv4 and IPv6) of this namespace in one of ``states``."""
    mask = 0
    for st in states:
        mask |= 1 << st
    found: list[TcpSocket] = []
    with socket.socket(
        socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG
    ) as nl:
        for family in (socket.AF_INET, socket.AF_INET6):
            nl.send(_request(family, mask))
            done = False
            while not done:
                data = nl.recv(1 << 16)
                offset = 0
                while offset + _HDR.size <= len(data):
                    length, kind, _flags, _seq, _pid = _HDR.unpack_from(data, offset)
                    if kind == _NLMSG_DONE:
                        done = True
                        break
                    if kind == _NLMSG_ERROR:
                        code = -struct.unpack_from("=i", data, offset + _HDR.size)[0]
                        raise OSError(code, f"sock_diag: {os.strerror(code)}")
                    msg = offset + _HDR.size
                    _fam, state, _timer, _retrans = _MSG.unpack_from(data, msg)
                    sport, dport, _src, _dst = _ID.unpack_from(data, msg + _MSG.size)
                    # after the id (48 bytes): expires, rqueue, wqueue, uid, inode (u32 each)
                    inode = struct.unpack_from("=I", data, msg + _MSG.size + 48 + 16)[0]
                    found.append(TcpSocket(inode, state, sport, dport))
                    offset += (length + 3) & ~3
                    if length == 0:
                        done = True
                        break
    return found
