"""Classic BPF programs for a reuseport group and for one listener. No privilege needed.

- ``attach_first_k(sock, k)``: the group's new connections go only to the first ``k`` sockets in
  listen() order (random pick), so the sockets after them can drain and close without loss.
  An index >= group size would fall back to hashing over every socket, so k must be >= 1 and
  <= the group size.
- ``table_program(runs, buckets, flow_hash=)`` and ``attach(sock, program)``: the steering
  table (see ``table.py``) as a program: ``bucket = x % buckets``, then a chain of
  ``jge #end; ret #index`` over the table's runs (classic BPF has no indexed load). ``x`` is
  ``ld rand`` for TCP (a new connection may go anywhere; ``rxhash`` works too on loopback, it is
  the client's random txhash) and, for UDP, a hash of the source address and port read from the
  IP and UDP headers: a UDP datagram's ``rxhash`` is 0 on loopback and ``rand`` would scatter a
  flow's datagrams (both measured on Linux 6.18).
- ``drop_syns(sock)``: a socket filter that drops new SYNs reaching this listener while letting
  every other segment (the final ACK of handshakes in progress) through, so its accept queue can
  be emptied before it closes. Clients retransmit a dropped SYN (after ~1 s) and then reach
  another member or, at a full stop, are refused: nothing already accepted by the kernel is lost.
"""

from __future__ import annotations

import contextlib
import socket

from ..linux import bpf
from ..linux.bpf import ALU_AND_K as _ALU_AND_K
from ..linux.bpf import ALU_MOD_K as _ALU_MOD_K
from ..linux.bpf import ALU_MUL_K as _ALU_MUL_K
from ..linux.bpf import ALU_RSH_K as _ALU_RSH_K
from ..linux.bpf import ALU_XOR_X as _ALU_XOR_X
from ..linux.bpf import JA as _JA
from ..linux.bpf import JEQ_K as _JEQ_K
from ..linux.bpf import JGE_K as _JGE_K
from ..linux.bpf import LD_B_ABS as _LD_B_ABS
from ..linux.bpf import LD_H_ABS as _LD_H_ABS
from ..linux.bpf import LD_H_IND as _LD_H_IND
from ..linux.bpf import LD_MEM as _LD_MEM
from ..linux.bpf import LD_W_ABS as _LD_W_ABS
from ..linux.bpf import LDX_B_MSH as _LDX_B_MSH
from ..linux.bpf import RET_A as _RET_A
from ..linux.bpf import RET_K as _RET_K
from ..linux.bpf import SKF_AD_OFF as _SKF_AD_OFF
from ..linux.bpf import SKF_AD_RANDOM as _SKF_AD_RANDOM
from ..linux.bpf import SKF_NET_OFF as _SKF_NET_OFF
from ..linux.bpf import (
    SO_ATTACH_FILTER,
    SO_ATTACH_REUSEPORT_CBPF,
    SO_DETACH_FILTER,
    SO_DETACH_REUSEPORT_BPF,
)
from ..linux.bpf import ST as _ST
from ..linux.bpf import TAX as _TAX

__all__ = [
    "SO_ATTACH_REUSEPORT_CBPF",
    "attach",
    "attach_first_k",
    "detach",
    "drop_syns",
    "table_program",
    "undrop_syns",
]

Program = bpf.Program


def _setsockopt_prog(sock: socket.socket, option: int, program: Program) -> None:
    bpf.set_program(sock, option, program)


def first_k_program(k: int) -> Program:
    if k < 1:
        raise ValueError(f"a steering program needs at least one socket, not {k}")
    return [
        (_LD_W_ABS, 0, 0, _SKF_AD_OFF + _SKF_AD_RANDOM),
        (_ALU_MOD_K, 0, 0, k),
        (_RET_A, 0, 0, 0),
    ]


def _flow_hash() -> Program:
    """A = a 32-bit hash of the datagram's source address and port (IPv4 or IPv6 header)."""
    v4 = [
        (_LDX_B_MSH, 0, 0, _SKF_NET_OFF),  # X = IPv4 header length
        (_LD_H_IND, 0, 0, _SKF_NET_OFF),  # A = source port
        (_TAX, 0, 0, 0),
        (_LD_W_ABS, 0, 0, _SKF_NET_OFF + 12),  # A = source address
    ]
    v6 = [(_LD_W_ABS, 0, 0, _SKF_NET_OFF + 8)]  # A = the source address's 4 words xor-ed
    for offset in (12, 16, 20):
        v6 += [(_TAX, 0, 0, 0), (_LD_W_ABS, 0, 0, _SKF_NET_OFF + offset), (_ALU_XOR_X, 0, 0, 0)]
    v6 += [
        (_ST, 0, 0, 0),
        (_LD_H_ABS, 0, 0, _SKF_NET_OFF + 40),  # source port (no extension headers)
        (_TAX, 0, 0, 0),
        (_LD_MEM, 0, 0, 0),
    ]
    head = [
        (_LD_B_ABS, 0, 0, _SKF_NET_OFF),
        (_ALU_AND_K, 0, 0, 0xF0),
        (_JEQ_K, len(v4) + 1, 0, 0x60),  # IPv6?
    ]
    # A = address, X = port: mix them (murmur3's finalizer).
    mix = [
        (_ALU_MUL_K, 0, 0, 0x9E3779B1),
        (_ALU_XOR_X, 0, 0, 0),
        (_ALU_MUL_K, 0, 0, 0x85EBCA6B),
        (_TAX, 0, 0, 0),
        (_ALU_RSH_K, 0, 0, 13),
        (_ALU_XOR_X, 0, 0, 0),
        (_ALU_MUL_K, 0, 0, 0xC2B2AE35),
        (_TAX, 0, 0, 0),
        (_ALU_RSH_K, 0, 0, 16),
        (_ALU_XOR_X, 0, 0, 0),
    ]
    return head + v4 + [(_JA, 0, 0, len(v6))] + v6 + mix


def table_program(runs: list[tuple[int, int]], buckets: int, *, flow_hash: bool) -> Program:
    """Send bucket ``[previous end, end)`` of ``runs`` to socket index ``index`` for each
    ``(end, index)``; ``flow_hash`` picks the bucket by the UDP flow, else at random."""
    if not runs or runs[-1][0] != buckets:
        raise ValueError(f"the runs must cover all {buckets} buckets: {runs}")
    source = _flow_hash() if flow_hash else [(_LD_W_ABS, 0, 0, _SKF_AD_OFF + _SKF_AD_RANDOM)]
    program = [*source, (_ALU_MOD_K, 0, 0, buckets)]
    for end, index in runs[:-1]:
        program += [(_JGE_K, 1, 0, end), (_RET_K, 0, 0, index)]
    program.append((_RET_K, 0, 0, runs[-1][1]))
    if len(program) > 4096:
        raise ValueError(f"a steering table of {len(runs)} runs is too long for classic BPF")
    return program


def attach(sock: socket.socket, program: Program) -> None:
    """Attach ``program`` to the reuseport group of ``sock`` (replaces the one there)."""
    _setsockopt_prog(sock, SO_ATTACH_REUSEPORT_CBPF, program)


def attach_first_k(sock: socket.socket, k: int) -> None:
    """Send the group's new connections to its first ``k`` sockets only (re-attach replaces)."""
    _setsockopt_prog(sock, SO_ATTACH_REUSEPORT_CBPF, first_k_program(k))


def detach(sock: socket.socket) -> None:
    """Back to the kernel's plain hashing over every socket of the group."""
    with contextlib.suppress(OSError):  # ENOENT: nothing attached
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)


DROP_SYNS: Program = [
    (_LD_B_ABS, 0, 0, 13),  # TCP flags (data starts at the TCP header here)
    (_ALU_AND_K, 0, 0, 0x12),  # SYN | ACK
    (_JEQ_K, 0, 1, 0x02),  # a SYN without ACK: a new connection
    (_RET_K, 0, 0, 0),  # drop
    (_RET_K, 0, 0, 0xFFFFFFFF),  # keep the rest
]


def drop_syns(sock: socket.socket) -> None:
    _setsockopt_prog(sock, SO_ATTACH_FILTER, DROP_SYNS)


def drop_syns_refused() -> OSError | None:
    """Why this process may not attach the SYN-drop filter, or None if it may: this kernel
    refuses SO_ATTACH_FILTER on a TCP socket without CAP_NET_ADMIN (EPERM), root without it
    too. Probed on a socket of no group (the supervisor's holds, doctor's syn_hold)."""
    with socket.socket() as probe:
        try:
            drop_syns(probe)
        except OSError as exc:
            return exc
    return None


def undrop_syns(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
