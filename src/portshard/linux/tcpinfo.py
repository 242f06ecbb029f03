"""A listener's accept queue (getsockopt TCP_INFO), stopping a listener, and socket inodes.

Costs on Linux 6.18, a 2-core x86_64 VM: queue_depth ~1.6 µs, queue_depth_fd ~3.3 µs,
socket_inode ~0.9 µs.

:func:`queue_depth` raises :class:`~portshard.errors.NotListening` for anything that is not a
listening TCP socket (UDP, Unix, an unconnected or connected TCP socket, a listener someone
shut down). A slot's socket that stops listening is damaged and must be replaced, so the
supervisor should hear about it, not read a quiet zero.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import socket
import stat
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..errors import InspectError, NotListening

__all__ = [
    "TCP_STATES",
    "QueueDepth",
    "queue_depth",
    "queue_depth_fd",
    "socket_inode",
    "socket_inodes",
    "stop_listening",
]

# include/net/tcp_states.h; /proc/net/tcp prints these as %02X.
TCP_STATES = {
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
TCP_STATE_LISTEN = 10


@dataclass(frozen=True)
class QueueDepth:
    """The accept queue of a listening TCP socket."""

    queued: int  # connections the handshake completed, waiting for accept()
    backlog: int  # listen() backlog after the kernel capped it at net.core.somaxconn


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
    if state != TCP_STATE_LISTEN:
        name = TCP_STATES.get(state, str(state))
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
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_PREFIX)
    except OSError as exc:
        if exc.errno in _NOT_TCP_ERRNOS:
            raise _not_tcp(f"socket fd {sock.fileno()}", exc) from exc
        raise
    if len(raw) >= _TCPI_PREFIX and raw[_TCPI_STATE_OFFSET] == TCP_STATE_LISTEN:
        return QueueDepth(*_TCPI_QUEUE.unpack_from(raw, _TCPI_UNACKED_OFFSET))  # every look
    return _parse_tcp_info(raw, f"socket fd {sock.fileno()}")


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


def socket_inodes(socks: Iterable[int | socket.socket]) -> set[int]:
    """:func:`socket_inode` of each (a slot's listeners, as readiness and the freeze-check
    know them)."""
    return {socket_inode(sock) for sock in socks}


def stop_listening(sock: socket.socket) -> None:
    """Take a TCP listener out of its port's group now, whoever else holds a copy of it (the
    warden holds one of every slot socket; a dead worker's child may hold another): close()
    does that only with the last copy. ``shutdown(SHUT_RD)`` runs inet_csk_listen_stop: what
    is queued migrates to the group's other listeners where the kernel can (SELECT_OR_MIGRATE,
    tcp_migrate_req), else it is reset. Quiet if it is not listening."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
