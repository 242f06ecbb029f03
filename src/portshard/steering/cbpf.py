"""Classic BPF programs for a reuseport group and for one listener. No privilege needed.

- ``attach_first_k(sock, k)``: the group's new connections go only to the first ``k`` sockets in
  listen() order (random pick), so the sockets after them can drain and close without loss.
  An index >= group size would fall back to hashing over every socket, so k must be >= 1 and
  <= the group size.
- ``drop_syns(sock)``: a socket filter that drops new SYNs reaching this listener while letting
  every other segment (the final ACK of handshakes in progress) through, so its accept queue can
  be emptied before it closes. Clients retransmit a dropped SYN (after ~1 s) and then reach
  another member or, at a full stop, are refused: nothing already accepted by the kernel is lost.
"""

from __future__ import annotations

import contextlib
import ctypes
import socket

__all__ = ["SO_ATTACH_REUSEPORT_CBPF", "attach_first_k", "detach", "drop_syns", "undrop_syns"]

SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
SO_ATTACH_REUSEPORT_CBPF = 51
SO_DETACH_REUSEPORT_BPF = 68

_SKF_AD_OFF = -0x1000
_SKF_AD_RANDOM = 56

# Opcodes (linux/filter.h)
_LD_W_ABS = 0x20
_LD_B_ABS = 0x30
_ALU_MOD_K = 0x94
_ALU_AND_K = 0x54
_JEQ_K = 0x15
_RET_K = 0x06
_RET_A = 0x16


class _Insn(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Insn))]


Program = list[tuple[int, int, int, int]]


def _setsockopt_prog(sock: socket.socket, option: int, program: Program) -> None:
    insns = (_Insn * len(program))(*(_Insn(c, t, f, k & 0xFFFFFFFF) for c, t, f, k in program))
    prog = _Prog(len(program), ctypes.cast(insns, ctypes.POINTER(_Insn)))
    sock.setsockopt(socket.SOL_SOCKET, option, bytes(prog))  # insns kept alive by this frame


def first_k_program(k: int) -> Program:
    if k < 1:
        raise ValueError(f"a steering program needs at least one socket, not {k}")
    return [
        (_LD_W_ABS, 0, 0, _SKF_AD_OFF + _SKF_AD_RANDOM),
        (_ALU_MOD_K, 0, 0, k),
        (_RET_A, 0, 0, 0),
    ]


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


def undrop_syns(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
