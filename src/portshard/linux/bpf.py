"""Classic BPF: the one encoder (seccomp filters, socket filters, reuseport programs).

A program is a list of ``(code, jt, jf, k)`` tuples; :class:`ClassicProgram` lays it out as
``struct sock_fprog`` over ``struct sock_filter`` and keeps the memory alive. What the
programs say lives with their users: ``steering/cbpf.py`` (reuseport selection, SYN drop)
and ``interpose/seccomp_sys.py`` (the bind() trap).
"""

from __future__ import annotations

import ctypes
import socket
from collections.abc import Sequence

__all__ = [
    "ClassicProgram",
    "Program",
    "SockFilter",
    "SockFprog",
    "attach_filter",
    "detach_filter",
    "set_program",
]

Program = list[tuple[int, int, int, int]]

# asm-generic/socket.h (Python's socket module exports none of these)
SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
SO_ATTACH_REUSEPORT_CBPF = 51
SO_ATTACH_REUSEPORT_EBPF = 52
SO_DETACH_REUSEPORT_BPF = 68

# Ancillary loads (linux/filter.h): negative offsets that read something other than the packet.
SKF_AD_OFF = -0x1000
SKF_AD_RANDOM = 56
SKF_NET_OFF = -0x100000  # loads relative to the network (IP) header

# Opcodes (linux/filter.h), class | size | mode or class | op | source.
LD_W_ABS = 0x20  # A = *(u32 *)(data + k)
LD_H_ABS = 0x28
LD_B_ABS = 0x30
LD_H_IND = 0x48  # A = *(u16 *)(data + X + k)
LDX_B_MSH = 0xB1  # X = 4 * (byte & 0xf): the IPv4 header length
ST = 0x02  # M[k] = A
LD_MEM = 0x60  # A = M[k]
TAX = 0x07  # X = A
ALU_MUL_K = 0x24
ALU_XOR_X = 0xAC
ALU_RSH_K = 0x74
ALU_MOD_K = 0x94
ALU_AND_K = 0x54
JA = 0x05
JGE_K = 0x35
JEQ_K = 0x15  # pc += (A == k) ? jt : jf
RET_K = 0x06  # return k
RET_A = 0x16  # return A


class SockFilter(ctypes.Structure):
    """struct sock_filter: one classic BPF instruction."""

    _fields_ = (
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    )


class SockFprog(ctypes.Structure):
    """struct sock_fprog: a classic BPF program (seccomp, SO_ATTACH_*)."""

    _fields_ = (("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter)))


class ClassicProgram:
    """A classic BPF program and the memory it points to, kept alive together.

    ``insns`` are (code, jt, jf, k) tuples (``k`` may be given negative, as the ancillary
    offsets are). Pass ``fprog`` by address to seccomp(2), or ``as_option()`` as a
    setsockopt value (the kernel copies the program during the call).
    """

    def __init__(self, insns: Sequence[tuple[int, int, int, int]]) -> None:
        if not 0 < len(insns) <= 4096:
            raise ValueError(f"a classic BPF program has 1 to 4096 instructions, not {len(insns)}")
        self._insns = (SockFilter * len(insns))(
            *(SockFilter(c, t, f, k & 0xFFFFFFFF) for c, t, f, k in insns)
        )
        self.fprog = SockFprog(len(insns), ctypes.cast(self._insns, ctypes.POINTER(SockFilter)))

    def __len__(self) -> int:
        return len(self._insns)

    def as_option(self) -> bytes:
        return bytes(self.fprog)


def set_program(
    sock: socket.socket, option: int, program: Sequence[tuple[int, int, int, int]]
) -> None:
    """setsockopt(SOL_SOCKET, ``option``, the program): SO_ATTACH_FILTER or
    SO_ATTACH_REUSEPORT_CBPF."""
    prog = ClassicProgram(program)
    sock.setsockopt(socket.SOL_SOCKET, option, prog.as_option())  # prog alive during the call


def attach_filter(sock: socket.socket, program: Sequence[tuple[int, int, int, int]]) -> None:
    """A socket filter on this socket alone (what reaches its queue)."""
    set_program(sock, SO_ATTACH_FILTER, program)


def detach_filter(sock: socket.socket) -> None:
    """Remove the socket filter; OSError (ENOENT) if there is none."""
    sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
