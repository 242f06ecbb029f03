"""The eBPF steering programs, as code for :func:`portshard.steering.ebpf.load_program`.

``steering_code`` (UDP: a flow stays on its bucket) and ``tcp_code`` (TCP: the less loaded of
two slots drawn from the table). Built with :mod:`bpfasm`; every map is passed in by fd.
"""

from __future__ import annotations

import errno
import socket
import struct

from . import bpfasm as asm
from .bpfasm import Asm

__all__ = ["SK_PASS", "steering_code", "tcp_code"]

BPF_FUNC_MAP_LOOKUP_ELEM = 1
BPF_FUNC_MAP_UPDATE_ELEM = 2
BPF_FUNC_GET_PRANDOM_U32 = 7
BPF_FUNC_SK_SELECT_REUSEPORT = 82
BPF_FUNC_KTIME_GET_NS = 5
BPF_FUNC_SKB_LOAD_BYTES = 26
BPF_FUNC_SKB_LOAD_BYTES_RELATIVE = 68
_BPF_HDR_START_NET = 1
_ETH_P_IPV6_BE = socket.htons(0x86DD)  # ctx->eth_protocol of an IPv6 packet
_V4_MAPPED_WORD = struct.unpack("=i", b"\0\0\xff\xff")[0]  # word 2 of ::ffff:a.b.c.d
SK_PASS = 1
BPF_ANY, BPF_NOEXIST = 0, 1
_DRAWS = 5  # draws of a table bucket per TCP connection, at most (see tcp_code)
_MD_ETH_PROTOCOL = 20  # offsetof(struct sk_reuseport_md, eth_protocol): network order
_MD_HASH = 32  # offsetof(struct sk_reuseport_md, hash)
_MD_MIGRATING_SK = 48  # offsetof(struct sk_reuseport_md, migrating_sk) (Linux 5.14+)
# Added to the load of a slot at its cap: above any (in flight + 1) x cost (2^40 is a million
# connections at the largest cost), so a slot at its cap is taken only if both draws are.
OVER_CAP_SHIFT = 40


def _active_bucket(a: Asm, table_fd: int, buckets: int) -> None:
    """r7 = the active copy's offset (table[2K]); a failed lookup goes to ``out``."""
    a.op(asm.ST_W, dst=10, off=-4, imm=2 * buckets)  # *(u32 *)(fp - 4) = 2K
    _lookup(a, table_fd, -4)
    a.jump(asm.JEQ_IMM, "out", dst=0, imm=0)
    a.op(asm.LDX_W, dst=7, src=0)  # w7 = active offset


def _lookup(a: Asm, map_fd: int, key_off: int) -> None:
    """r0 = &map[*(fp + key_off)] or NULL."""
    a.map_fd(1, map_fd).op(asm.MOV64_REG, dst=2, src=10).op(asm.ADD64_IMM, dst=2, imm=key_off)
    a.call(BPF_FUNC_MAP_LOOKUP_ELEM)


def _pick(a: Asm, table_fd: int, buckets: int, dst: int, fail: str) -> None:
    """w``dst`` = the slot of a random bucket of the active table; NULL lookup: ``fail``."""
    a.call(BPF_FUNC_GET_PRANDOM_U32).op(asm.MOV32_REG, dst=2, src=0)
    a.op(asm.MOD32_IMM, dst=2, imm=buckets).op(asm.ADD32_REG, dst=2, src=7)
    a.op(asm.STX_W, dst=10, src=2, off=-4)  # *(u32 *)(fp - 4) = bucket
    _lookup(a, table_fd, -4)
    a.jump(asm.JEQ_IMM, fail, dst=0, imm=0)
    a.op(asm.LDX_W, dst=dst, src=0)


def _tuple_key(a: Asm) -> None:
    """The connection's key at fp - 40 (20 bytes; see
    :func:`portshard.steering.inflight.tuple_key`): TCP ports, then the client as IPv6."""
    a.op(asm.MOV64_REG, dst=1, src=6).op(asm.MOV64_IMM, dst=2, imm=0)
    a.op(asm.MOV64_REG, dst=3, src=10).op(asm.ADD64_IMM, dst=3, imm=-40)
    a.op(asm.MOV64_IMM, dst=4, imm=4).call(BPF_FUNC_SKB_LOAD_BYTES)  # TCP ports (skb->data)
    a.jump(asm.JNE_IMM, "out", dst=0, imm=0)
    a.op(asm.LDX_W, dst=1, src=6, off=_MD_ETH_PROTOCOL)
    a.jump(asm.JEQ_IMM, "v6", dst=1, imm=_ETH_P_IPV6_BE)
    for off in (-36, -32):
        a.op(asm.ST_W, dst=10, off=off, imm=0)
    a.op(asm.ST_W, dst=10, off=-28, imm=_V4_MAPPED_WORD)  # ::ffff:a.b.c.d
    _load_net(a, offset=12, to=-24, size=4)  # IPv4 source
    a.jump(asm.JA, "keyed")
    a.label("v6")
    _load_net(a, offset=8, to=-36, size=16)  # IPv6 source
    a.label("keyed")


def _add(a: Asm, map_fd: int, key_off: int, delta: int) -> None:
    """map[*(u32 *)(fp + key_off)] += delta, atomically (nothing if the lookup fails)."""
    _lookup(a, map_fd, key_off)
    skip = f"skip{a.here()}"
    a.jump(asm.JEQ_IMM, skip, dst=0, imm=0)
    a.op(asm.MOV64_IMM, dst=1, imm=delta).op(asm.ATOMIC_ADD_DW, dst=0, src=1)
    a.label(skip)


def _record(a: Asm, held_fd: int, syn_fd: int) -> None:
    """``syn[tuple] = (slot, now)`` and ``held[slot] += 1`` for a new connection; a SYN seen
    again (retransmitted, or a request migrated from a closing listener) moves its count to
    the slot chosen now; an established connection migrating is not this map's."""
    _tuple_key(a)
    a.op(asm.LDX_W, dst=1, src=10, off=-8).op(asm.STX_W, dst=10, src=1, off=-56)
    a.op(asm.ST_W, dst=10, off=-52, imm=0)
    a.call(BPF_FUNC_KTIME_GET_NS).op(asm.STX_DW, dst=10, src=0, off=-48)
    a.jump(asm.JNE_IMM, "again", dst=7, imm=0)  # r7: migrating_sk: only a SYN seen before
    _put(a, syn_fd, BPF_NOEXIST)  # the common case: a new tuple, one map call
    a.jump(asm.JEQ_IMM, "count", dst=0, imm=0)
    a.jump(asm.JNE_IMM, "out", dst=0, imm=-errno.EEXIST)  # not recorded (full): not counted
    a.label("again")
    _lookup(a, syn_fd, -40)
    a.jump(asm.JEQ_IMM, "out", dst=0, imm=0)  # a migration of a request not recorded
    a.op(asm.LDX_W, dst=1, src=0).op(asm.LDX_W, dst=2, src=10, off=-8)
    a.jump(asm.JEQ_REG, "out", dst=1, src=2)  # the same slot again
    a.op(asm.STX_W, dst=10, src=1, off=-60)
    _add(a, held_fd, -60, -1)
    _put(a, syn_fd, BPF_ANY)
    a.jump(asm.JNE_IMM, "out", dst=0, imm=0)  # not recorded: not counted
    a.label("count")
    _add(a, held_fd, -8, 1)


def _put(a: Asm, syn_fd: int, flags: int) -> None:
    """r0 = bpf_map_update_elem(syn, fp - 40, fp - 56, flags)."""
    a.map_fd(1, syn_fd).op(asm.MOV64_REG, dst=2, src=10).op(asm.ADD64_IMM, dst=2, imm=-40)
    a.op(asm.MOV64_REG, dst=3, src=10).op(asm.ADD64_IMM, dst=3, imm=-56)
    a.op(asm.MOV64_IMM, dst=4, imm=flags).call(BPF_FUNC_MAP_UPDATE_ELEM)


def _load(a: Asm, loads: tuple[int, int, int, int], slot_reg: int, to: int) -> None:
    """*(s64 *)(fp + to) = (held[slot] - fix[slot] + 1) x cost[slot]: the expected wait of a
    new connection there (speed.py), plus ``OVER_CAP`` if the slot holds its cap already
    (the cost word's high half, 0: none); a failed lookup goes to ``choose``."""
    held_fd, fix_fd, _, cost_fd = loads
    a.op(asm.STX_W, dst=10, src=slot_reg, off=-8)
    _lookup(a, held_fd, -8)
    a.jump(asm.JEQ_IMM, "choose", dst=0, imm=0)
    a.op(asm.LDX_DW, dst=1, src=0).op(asm.STX_DW, dst=10, src=1, off=to)
    _lookup(a, fix_fd, -8)
    a.jump(asm.JEQ_IMM, "choose", dst=0, imm=0)
    a.op(asm.LDX_DW, dst=2, src=0).op(asm.LDX_DW, dst=1, src=10, off=to)
    a.op(asm.SUB64_REG, dst=1, src=2).op(asm.ADD64_IMM, dst=1, imm=1)
    a.op(asm.STX_DW, dst=10, src=1, off=to)
    _lookup(a, cost_fd, -8)
    a.jump(asm.JEQ_IMM, "choose", dst=0, imm=0)
    a.op(asm.LDX_DW, dst=2, src=0).op(asm.MOV64_REG, dst=3, src=2)
    a.op(asm.RSH64_IMM, dst=3, imm=32).op(asm.MOV32_REG, dst=2, src=2)  # w3 = cap, w2 = cost
    a.op(asm.LDX_DW, dst=1, src=10, off=to).op(asm.MOV64_REG, dst=4, src=1)  # in flight + 1
    a.op(asm.MUL64_REG, dst=1, src=2)
    under = f"under{a.here()}"
    a.jump(asm.JEQ_IMM, under, dst=3, imm=0)  # no cap
    a.jump(asm.JSGT_REG, "over" + under, dst=4, src=3)  # in flight >= cap: one more is over
    a.jump(asm.JA, under)
    a.label("over" + under)
    a.op(asm.MOV64_IMM, dst=2, imm=1).op(asm.LSH64_IMM, dst=2, imm=OVER_CAP_SHIFT)
    a.op(asm.ADD64_REG, dst=1, src=2)
    a.label(under).op(asm.STX_DW, dst=10, src=1, off=to)


def _load_net(a: Asm, offset: int, to: int, size: int) -> None:
    a.op(asm.MOV64_REG, dst=1, src=6).op(asm.MOV64_IMM, dst=2, imm=offset)
    a.op(asm.MOV64_REG, dst=3, src=10).op(asm.ADD64_IMM, dst=3, imm=to)
    a.op(asm.MOV64_IMM, dst=4, imm=size).op(asm.MOV64_IMM, dst=5, imm=_BPF_HDR_START_NET)
    a.call(BPF_FUNC_SKB_LOAD_BYTES_RELATIVE)
    a.jump(asm.JNE_IMM, "out", dst=0, imm=0)


def steering_code(
    table_fd: int, sockarray_fd: int, counts_fd: int, buckets: int, *, flow: bool
) -> bytes:
    """UDP: ``table[active + hash % buckets]`` is the slot key (the kernel's flow hash of the
    packet, so a flow stays on its bucket); select that slot's socket.

    The table holds two copies of the bucket table (``[0, K)`` and ``[K, 2K)``) and, at index
    2K, the offset of the active one: the supervisor writes the other copy in one batch and
    then flips the offset, so a change is atomic (no mix of old and new buckets) and costs two
    bpf() calls however many buckets change. If a lookup fails, or the slot has no socket (it
    just closed), the program selects nothing and the kernel falls back to its own hash.

    TCP uses :func:`tcp_code` (two choices by connections in flight).
    """
    if not flow:
        raise ValueError("TCP steering is tcp_code()")
    a = Asm().op(asm.MOV64_REG, dst=6, src=1)
    _active_bucket(a, table_fd, buckets)
    a.op(asm.LDX_W, dst=2, src=6, off=_MD_HASH)  # w2 = ctx->hash
    a.op(asm.MOD32_IMM, dst=2, imm=buckets).op(asm.ADD32_REG, dst=2, src=7)
    a.op(asm.STX_W, dst=10, src=2, off=-4)
    _lookup(a, table_fd, -4)
    a.jump(asm.JEQ_IMM, "out", dst=0, imm=0)
    a.op(asm.LDX_W, dst=8, src=0)
    _select(a, sockarray_fd)
    a.label("out").op(asm.MOV64_IMM, dst=0, imm=SK_PASS).op(asm.EXIT)
    return a.code()


def _select(a: Asm, sockarray_fd: int) -> None:
    """sk_select_reuseport(ctx, sockarray, &w8); r0 = its result."""
    a.op(asm.STX_W, dst=10, src=8, off=-8)  # *(u32 *)(fp - 8) = slot
    a.op(asm.MOV64_REG, dst=1, src=6).map_fd(2, sockarray_fd)
    a.op(asm.MOV64_REG, dst=3, src=10).op(asm.ADD64_IMM, dst=3, imm=-8)
    a.op(asm.MOV64_IMM, dst=4, imm=0).call(BPF_FUNC_SK_SELECT_REUSEPORT)


def _compare(a: Asm, table_fd: int, buckets: int, loads: tuple[int, int, int, int]) -> None:
    """w8 = the less loaded of w8 and a second draw (see :func:`tcp_code`)."""
    for _ in range(_DRAWS - 1):
        _pick(a, table_fd, buckets, dst=9, fail="choose")
        a.jump(asm.JNE_REG, "compare", dst=9, src=8)
    # The same slot every time: the bucket half the table away from the first (the table is
    # one run per slot: with 2 equal slots, the other one; 1 in 16 connections went to a
    # slot 20x slower without a comparison, which was most of what it got).
    a.op(asm.LDX_W, dst=2, src=10, off=-64).op(asm.SUB32_REG, dst=2, src=7)
    a.op(asm.ADD32_IMM, dst=2, imm=buckets // 2).op(asm.MOD32_IMM, dst=2, imm=buckets)
    a.op(asm.ADD32_REG, dst=2, src=7).op(asm.STX_W, dst=10, src=2, off=-4)
    _lookup(a, table_fd, -4)
    a.jump(asm.JEQ_IMM, "choose", dst=0, imm=0)
    a.op(asm.LDX_W, dst=9, src=0)
    a.jump(asm.JEQ_REG, "choose", dst=9, src=8)  # the table holds one slot
    a.label("compare")
    _load(a, loads, 8, -16)
    _load(a, loads, 9, -24)
    a.op(asm.LDX_DW, dst=1, src=10, off=-24).op(asm.LDX_DW, dst=2, src=10, off=-16)
    a.jump(asm.JSGT_REG, "second", dst=2, src=1)  # load[first] > load[second]
    a.jump(asm.JA, "choose")
    a.label("second").op(asm.MOV64_REG, dst=8, src=9)


def tcp_code(
    table_fd: int,
    sockarray_fd: int,
    counts_fd: int,
    loads: tuple[int, int, int, int],
    buckets: int,
    *,
    compare: bool = True,
) -> bytes:
    """A new TCP connection goes to the less loaded of two slots drawn from the bucket table
    (the power of two choices; the table carries weights and exclusions). ``loads`` are the
    fds of ``held``, ``fix``, ``syn`` and ``cost`` (inflight.py): a slot's load is
    ``(held[slot] - fix[slot] + 1) x cost[slot]``, the expected wait of one more connection
    there: its connections in flight (handed and not yet let go by its worker; ``fix`` is what
    the supervisor found stale) plus this one, times how much slower than the fastest its
    worker serves (speed.py; ``UNIT`` for a full-speed one). The cost word's low half is that
    cost, its high half the slot's in-flight cap (0: none; speed.py gives one to a worker
    caught stalling): a slot already holding its cap gets ``2^OVER_CAP_SHIFT`` more, so it is
    taken only when both draws are at theirs. Where the SOCK_OPS program cannot
    run, the supervisor writes queue depths into ``held`` instead. The second draw is
    repeated while it names the first's slot, up to ``_DRAWS - 1`` times, then the bucket half
    the table away is taken (only a table of one slot leaves no choice); ties go to the first
    draw. ``compare=False``: the first draw only (the benchmark's PORTSHARD_BALANCE=none).

    Then, for a new connection (not one migrated from a closing listener): ``counts[slot]``
    (u64) goes up by one (an atomic add: CPUs may run the program at once; the new
    connections per second of ``portshard status``, and the "accepted since the last look"
    of the policy), and the slot's load goes up at once, before the handshake completes, so
    that a burst of SYNs (one RTT) does not all see the same counts (:func:`_record`).
    """
    held_fd, _, syn_fd, _ = loads
    a = Asm().op(asm.MOV64_REG, dst=6, src=1)
    _active_bucket(a, table_fd, buckets)
    _pick(a, table_fd, buckets, dst=8, fail="out")
    a.op(asm.LDX_W, dst=1, src=10, off=-4).op(asm.STX_W, dst=10, src=1, off=-64)  # its bucket
    if compare:  # else (PORTSHARD_BALANCE=none) the first draw, as the classic program
        _compare(a, table_fd, buckets, loads)
    a.label("choose")
    _select(a, sockarray_fd)
    a.jump(asm.JNE_IMM, "out", dst=0, imm=0)  # not selected
    a.op(asm.LDX_DW, dst=7, src=6, off=_MD_MIGRATING_SK)
    a.jump(asm.JNE_IMM, "record", dst=7, imm=0)  # a migration: not new
    _add(a, counts_fd, -8, 1)
    a.label("record")
    _record(a, held_fd, syn_fd)
    a.label("out").op(asm.MOV64_IMM, dst=0, imm=SK_PASS).op(asm.EXIT)
    return a.code()
