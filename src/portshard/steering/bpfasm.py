"""A tiny eBPF assembler with labels: instructions in, the bytes ``bpf(BPF_PROG_LOAD)`` takes.

Hand-counted jump offsets broke twice when a program grew; here a jump names its target
(:meth:`Asm.jump`) and :meth:`Asm.code` resolves it. Only what portshard's programs use.
"""

from __future__ import annotations

import struct
import sys

__all__ = ["Asm", "insn"]

BPF_PSEUDO_MAP_FD = 1

# Opcodes (linux/bpf_common.h, linux/bpf.h): class | op | source.
MOV64_IMM, MOV64_REG, MOV32_REG = 0xB7, 0xBF, 0xBC
ADD64_IMM, ADD32_REG, MOD32_IMM, SUB64_REG, MUL64_REG = 0x07, 0x0C, 0x94, 0x1F, 0x2F
ADD32_IMM, SUB32_REG = 0x04, 0x1C
LSH32_IMM, RSH32_IMM, OR32_REG = 0x64, 0x74, 0x4C
LSH64_IMM, RSH64_IMM, ADD64_REG = 0x67, 0x77, 0x0F
TO_BE = 0xDC  # BPF_ALU | BPF_END | BPF_TO_BE: imm = 16, 32 or 64
LDX_W, LDX_DW, STX_W, STX_DW, ST_W = 0x61, 0x79, 0x63, 0x7B, 0x62
ATOMIC_ADD_DW = 0xDB  # lock *(u64 *)(dst + off) += src
CALL, EXIT = 0x85, 0x95
JA, JEQ_IMM, JNE_IMM, JEQ_REG, JNE_REG, JSGT_REG = 0x05, 0x15, 0x55, 0x1D, 0x5D, 0x6D


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One eBPF instruction (struct bpf_insn)."""
    regs = dst | src << 4 if sys.byteorder == "little" else dst << 4 | src
    return struct.pack("=BBhi", code, regs, off, imm)


class Asm:
    """Append instructions; jumps name a label placed before or after them."""

    def __init__(self) -> None:
        self._items: list[bytes | tuple[int, int, int, int, str]] = []
        self._labels: dict[str, int] = {}
        self._at = 0  # instruction slots so far

    def op(self, code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> Asm:
        self._items.append(insn(code, dst, src, off, imm))
        self._at += 1
        return self

    def map_fd(self, dst: int, fd: int) -> Asm:
        """``dst = map`` (ld_imm64 with a map fd: two slots)."""
        self._items.append(insn(0x18, dst=dst, src=BPF_PSEUDO_MAP_FD, imm=fd) + insn(0))
        self._at += 2
        return self

    def call(self, helper: int) -> Asm:
        return self.op(CALL, imm=helper)

    def jump(self, code: int, label: str, dst: int = 0, src: int = 0, imm: int = 0) -> Asm:
        self._items.append((code, dst, src, imm, label))
        self._at += 1
        return self

    def here(self) -> int:
        """How many items so far (a unique suffix for a helper's private labels)."""
        return len(self._items)

    def label(self, name: str) -> Asm:
        if name in self._labels:
            raise ValueError(f"label {name!r} placed twice")
        self._labels[name] = self._at
        return self

    def code(self) -> bytes:
        out, at = [], 0
        for item in self._items:
            if isinstance(item, bytes):
                out.append(item)
                at += len(item) // 8
                continue
            code, dst, src, imm, name = item
            if name not in self._labels:
                raise ValueError(f"jump to label {name!r}, which is never placed")
            out.append(insn(code, dst, src, self._labels[name] - at - 1, imm))
            at += 1
        return b"".join(out)
