"""eBPF steering for a reuseport group through bpf(2) and ctypes: no libbpf, no clang.

An ``SK_REUSEPORT`` program picks the socket for each new connection (or datagram) of the group:
``bucket = hash % K``, ``slot = table[bucket]`` (an array map of K slot keys), then
``bpf_sk_select_reuseport(ctx, sockarray, &slot)`` (a ``REUSEPORT_SOCKARRAY`` map from slot key
to socket). Keys are slot numbers, so they do not shift when a socket leaves the group (the
classic BPF index does), and a change of weights is two bpf() calls with no re-attach (the
table is double-buffered: see :func:`steering_code`). Needs CAP_BPF or root.

The program is loaded with ``expected_attach_type = BPF_SK_REUSEPORT_SELECT_OR_MIGRATE``: when a
slot's listener closes, the kernel asks the same program where each connection still queued on
it should go (``ctx->migrating_sk`` is set; we pick by the same table, which no longer holds the
closing slot) instead of resetting them. That works whatever ``net.ipv4.tcp_migrate_req`` says,
so the supervisor can replace the listener of a slot whose worker died and hand its queue to
the other slots at once.

For UDP, ``hash`` is the kernel's flow hash of the packet (the 4-tuple), so a flow stays on
its bucket; for TCP it is a random number (``bpf_get_prandom_u32``), as in the classic program:
a new connection may go anywhere, and a few busy clients then cannot pile onto one slot.

Every failure raises :class:`BpfError` with what was being done and why it failed.
"""

from __future__ import annotations

import array
import ctypes
import errno
import functools
import os
import platform
import socket
import struct
import sys
from collections.abc import Callable, Sequence

from ..errors import PortshardError
from ..linux.bpf import SO_ATTACH_REUSEPORT_EBPF
from ..linux.syscalls import native_arch

__all__ = [
    "SO_ATTACH_REUSEPORT_EBPF",
    "BpfError",
    "Map",
    "SteeringProgram",
    "bpf",
    "load_select_key0",
]

BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM = 0, 1, 2, 3
BPF_PROG_LOAD = 5
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_REUSEPORT_SOCKARRAY = 20
BPF_PROG_TYPE_SK_REUSEPORT = 21
BPF_SK_REUSEPORT_SELECT = 39  # expected_attach_type
BPF_SK_REUSEPORT_SELECT_OR_MIGRATE = 40
BPF_FUNC_MAP_LOOKUP_ELEM = 1
BPF_FUNC_GET_PRANDOM_U32 = 7
BPF_FUNC_SK_SELECT_REUSEPORT = 82
BPF_PSEUDO_MAP_FD = 1
SK_PASS = 1
_MD_HASH = 32  # offsetof(struct sk_reuseport_md, hash)
_MD_MIGRATING_SK = 48  # offsetof(struct sk_reuseport_md, migrating_sk) (Linux 5.14+)


class BpfError(PortshardError):
    """A bpf(2) call failed; the message says which and why."""


def _reason(exc: OSError) -> str:
    return f"{errno.errorcode.get(exc.errno or 0, exc.errno)}: {exc.strerror or exc}"


@functools.cache
def _syscall() -> tuple[int, Callable[..., int]]:
    """bpf(2)'s number here and libc's syscall(), looked up once: a map update is a hot path."""
    arch = native_arch()
    if arch is None:
        raise BpfError(f"no bpf(2) syscall number for {platform.machine()} in portshard")
    fn = ctypes.CDLL(None, use_errno=True).syscall
    fn.restype = ctypes.c_long
    fn.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_long]
    return arch.nr_bpf, fn


def bpf(cmd: int, attr: bytes, what: str) -> int:
    """bpf(2) with ``attr`` (the leading fields of union bpf_attr; the kernel zero-extends)."""
    nr, fn = _syscall()
    buf = ctypes.create_string_buffer(attr, len(attr))
    try:
        ret = int(fn(nr, cmd, ctypes.addressof(buf), len(attr)))
        if ret < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return ret
    except OSError as exc:
        if exc.errno == errno.EPERM and os.geteuid() == 0:
            why = "denied even to root: a sandbox (container seccomp profile, LSM) forbids bpf()"
            raise BpfError(f"EPERM {what}: {why}") from None
        if exc.errno == errno.EPERM:
            why = f"needs CAP_BPF or root (this is uid {os.geteuid()})"
            raise BpfError(f"EPERM {what}: {why}") from None
        raise BpfError(f"{what}: {_reason(exc)}") from None


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One eBPF instruction (struct bpf_insn)."""
    regs = dst | src << 4 if sys.byteorder == "little" else dst << 4 | src
    return struct.pack("=BBhi", code, regs, off, imm)


def _ld_map_fd(dst: int, fd: int) -> bytes:
    return insn(0x18, dst=dst, src=BPF_PSEUDO_MAP_FD, imm=fd) + insn(0)  # ld_imm64: two slots


class Map:
    """A BPF map with u32 keys; closes its fd on close()."""

    def __init__(self, kind: int, value_size: int, entries: int, name: bytes, what: str) -> None:
        spec = struct.pack("=7I16s", kind, 4, value_size, entries, 0, 0, 0, name)
        self.fd = bpf(BPF_MAP_CREATE, spec, f"creating {what}")
        self.entries = entries
        self.what = what

    def update(self, key: int, value: int, value_size: int = 4) -> None:
        k = ctypes.c_uint32(key)
        v = ctypes.c_uint32(value) if value_size == 4 else ctypes.c_uint64(value)
        attr = struct.pack("=I4xQQQ", self.fd, ctypes.addressof(k), ctypes.addressof(v), 0)
        bpf(BPF_MAP_UPDATE_ELEM, attr, f"updating {self.what} at key {key}")

    def update_many(self, keys: Sequence[int], values: Sequence[int]) -> None:
        """``keys[i]`` gets ``values[i]`` (u32), in one call where the kernel can
        (BPF_MAP_UPDATE_BATCH, Linux 5.6+), else one call each."""
        if not keys:
            return
        k, v = array.array("I", keys), array.array("I", values)
        attr = struct.pack(
            "=QQQQIIQQ", 0, 0, k.buffer_info()[0], v.buffer_info()[0], len(k), self.fd, 0, 0
        )
        try:
            bpf(BPF_MAP_UPDATE_BATCH, attr, f"updating {self.what}")
        except BpfError:
            for key, value in zip(keys, values, strict=True):
                self.update(key, value)

    def lookup_u64(self, key: int) -> int:
        """The u64 value at ``key``."""
        k, v = ctypes.c_uint32(key), ctypes.c_uint64(0)
        attr = struct.pack("=I4xQQQ", self.fd, ctypes.addressof(k), ctypes.addressof(v), 0)
        bpf(BPF_MAP_LOOKUP_ELEM, attr, f"reading {self.what} at key {key}")
        return int(v.value)

    def delete(self, key: int) -> bool:
        """Remove ``key``; False if it held nothing."""
        k = ctypes.c_uint32(key)
        attr = struct.pack("=I4xQ", self.fd, ctypes.addressof(k))
        try:
            bpf(BPF_MAP_DELETE_ELEM, attr, f"deleting key {key} of {self.what}")
        except BpfError as exc:
            if "ENOENT" in str(exc):
                return False
            raise
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def load_program(code: bytes, attach_type: int, name: bytes) -> int:
    """Load an SK_REUSEPORT program; the verifier's last line is in the error if it refuses."""
    insns, license_ = ctypes.create_string_buffer(code, len(code)), ctypes.c_char_p(b"GPL")
    log = ctypes.create_string_buffer(16384)
    attr = struct.pack(
        "=IIQQIIQII16sII",
        BPF_PROG_TYPE_SK_REUSEPORT, len(code) // 8, ctypes.addressof(insns),
        ctypes.cast(license_, ctypes.c_void_p).value or 0, 1, len(log), ctypes.addressof(log),
        0, 0, name, 0, attach_type,
    )  # fmt: skip
    try:
        return bpf(BPF_PROG_LOAD, attr, "loading an SK_REUSEPORT program")
    except BpfError as exc:
        lines = log.value.decode(errors="replace").strip().splitlines()
        raise BpfError(f"{exc}; verifier: {lines[-1]}" if lines else str(exc)) from None


def load_select_key0(map_fd: int) -> int:
    """An SK_REUSEPORT program that picks the socket at key 0 of ``map_fd`` (doctor's probe)."""
    code = b"".join(
        (
            insn(0x62, dst=10, off=-4, imm=0),  # *(u32 *)(r10 - 4) = 0     (key; r1 = ctx)
            _ld_map_fd(2, map_fd),  # r2 = map
            insn(0xBF, dst=3, src=10),  # r3 = r10
            insn(0x07, dst=3, imm=-4),  # r3 += -4                   (&key)
            insn(0xB7, dst=4, imm=0),  # r4 = 0                      (flags)
            insn(0x85, imm=BPF_FUNC_SK_SELECT_REUSEPORT),  # call sk_select_reuseport
            insn(0xB7, dst=0, imm=SK_PASS),  # r0 = SK_PASS
            insn(0x95),  # exit
        )
    )
    return load_program(code, BPF_SK_REUSEPORT_SELECT, b"portshard_probe")


def steering_code(
    table_fd: int, sockarray_fd: int, counts_fd: int, buckets: int, *, flow: bool
) -> bytes:
    """``table[active + x % buckets]`` is the slot key; select that slot's socket. ``x`` is the
    kernel's flow hash of the packet if ``flow`` (UDP: a flow stays on its bucket), else a
    random number (TCP: any spread will do for a new connection, as in the classic program).

    The table holds two copies of the bucket table (``[0, K)`` and ``[K, 2K)``) and, at index
    2K, the offset of the active one: the supervisor writes the other copy in one batch and
    then flips the offset, so a change is atomic (no mix of old and new buckets) and costs two
    bpf() calls however many buckets change. If a lookup fails, or the slot has no socket (it
    just closed), the program selects nothing and the kernel falls back to its own hash.

    For TCP, ``counts[slot]`` (u64) goes up by one for every new connection handed to the slot
    (an atomic add: CPUs may run the program at once), not for one migrated from a closing
    listener: the new connections per second that ``portshard status`` shows.
    """
    if flow:
        x = insn(0x61, dst=2, src=6, off=_MD_HASH)  # w2 = ctx->hash
    else:
        x = insn(0x85, imm=BPF_FUNC_GET_PRANDOM_U32) + insn(0xBC, dst=2, src=0)  # w2 = random
    count = b""
    if not flow:  # TCP only (nobody reads UDP counts), and new connections only, not migrations
        count = b"".join(
            (
                insn(0x55, dst=0, off=10, imm=0),  # if r0 != 0 goto out     (not selected)
                insn(0x79, dst=1, src=6, off=_MD_MIGRATING_SK),  # r1 = ctx->migrating_sk
                insn(0x55, dst=1, off=8, imm=0),  # if r1 != 0 goto out     (a migration)
                _ld_map_fd(1, counts_fd),  # r1 = counts
                insn(0xBF, dst=2, src=10),  # r2 = r10
                insn(0x07, dst=2, imm=-8),  # r2 += -8                  (&slot)
                insn(0x85, imm=BPF_FUNC_MAP_LOOKUP_ELEM),  # r0 = &counts[slot] or NULL
                insn(0x15, dst=0, off=2, imm=0),  # if r0 == 0 goto out
                insn(0xB7, dst=1, imm=1),  # r1 = 1
                insn(0xDB, dst=0, src=1),  # lock *(u64 *)r0 += r1
            )
        )
    head = b"".join(
        (
            insn(0xBF, dst=6, src=1),  # r6 = ctx
            insn(0x62, dst=10, off=-4, imm=2 * buckets),  # *(u32 *)(r10 - 4) = 2K
            _ld_map_fd(1, table_fd),  # r1 = table
            insn(0xBF, dst=2, src=10),  # r2 = r10
            insn(0x07, dst=2, imm=-4),  # r2 += -4
            insn(0x85, imm=BPF_FUNC_MAP_LOOKUP_ELEM),  # r0 = &table[2K] or NULL
        )
    )
    bucket = b"".join(
        (
            insn(0x61, dst=7, src=0),  # w7 = *(u32 *)r0            (active offset)
            x,
            insn(0x94, dst=2, imm=buckets),  # w2 %= K
            insn(0x0C, dst=2, src=7),  # w2 += w7
            insn(0x63, dst=10, src=2, off=-4),  # *(u32 *)(r10 - 4) = w2    (bucket)
            _ld_map_fd(1, table_fd),  # r1 = table
            insn(0xBF, dst=2, src=10),  # r2 = r10
            insn(0x07, dst=2, imm=-4),  # r2 += -4
            insn(0x85, imm=BPF_FUNC_MAP_LOOKUP_ELEM),  # r0 = &table[bucket] or NULL
        )
    )
    select = b"".join(
        (
            insn(0x61, dst=1, src=0),  # w1 = *(u32 *)r0            (slot key)
            insn(0x63, dst=10, src=1, off=-8),  # *(u32 *)(r10 - 8) = w1
            insn(0xBF, dst=1, src=6),  # r1 = ctx
            _ld_map_fd(2, sockarray_fd),  # r2 = sockarray
            insn(0xBF, dst=3, src=10),  # r3 = r10
            insn(0x07, dst=3, imm=-8),  # r3 += -8                  (&slot)
            insn(0xB7, dst=4, imm=0),  # r4 = 0                     (flags)
            insn(0x85, imm=BPF_FUNC_SK_SELECT_REUSEPORT),
            count,
        )
    )
    out = insn(0xB7, dst=0, imm=SK_PASS) + insn(0x95)  # out: r0 = SK_PASS; exit
    to_out_2 = len(select) // 8
    to_out_1 = (len(bucket) + 8 + len(select)) // 8
    return b"".join(
        (
            head,
            insn(0x15, dst=0, off=to_out_1, imm=0),  # if r0 == 0 goto out
            bucket,
            insn(0x15, dst=0, off=to_out_2, imm=0),  # if r0 == 0 goto out
            select,
            out,
        )
    )


class SteeringProgram:
    """The maps and program steering one reuseport group, by slot key.

    ``set_socket(slot, sock)`` puts a slot's socket in the sockarray (it must be bound, and
    listening for TCP); ``set_table(owners)`` installs a new bucket table atomically (see
    :func:`steering_code`); ``attach`` attaches the program through any socket of the group
    (replacing any program there).
    """

    def __init__(self, buckets: int, *, flow: bool, slots: int = 1024) -> None:
        self.buckets = buckets
        self.table = Map(
            BPF_MAP_TYPE_ARRAY, 4, 2 * buckets + 1, b"portshard_table", "the bucket table"
        )
        self.socks: Map | None = None
        self.counts: Map | None = None
        self.prog_fd = -1
        try:
            self.counts = Map(
                BPF_MAP_TYPE_ARRAY, 8, slots, b"portshard_count", "the per-slot counters"
            )
            self.socks = Map(
                BPF_MAP_TYPE_REUSEPORT_SOCKARRAY,
                8,
                slots,
                b"portshard_socks",
                "a REUSEPORT_SOCKARRAY map",
            )
            code = steering_code(self.table.fd, self.socks.fd, self.counts.fd, buckets, flow=flow)
            self.prog_fd = load_program(
                code, BPF_SK_REUSEPORT_SELECT_OR_MIGRATE, b"portshard_steer"
            )
        except BaseException:
            self.close()
            raise
        self.copies = [[0] * buckets, [0] * buckets]  # what each copy in the map holds now
        self.active = 0  # offset of the copy the program reads

    def set_socket(self, slot: int, sock: socket.socket) -> None:
        assert self.socks is not None
        self.socks.update(slot, sock.fileno(), value_size=8)

    def clear_socket(self, slot: int) -> None:
        assert self.socks is not None
        self.socks.delete(slot)

    def set_table(self, owners: Sequence[int]) -> bool:
        """Install ``owners`` (a slot key per bucket); False if it is what the program has.

        Writes, in one batch, only the buckets where the spare copy differs from ``owners``,
        then flips the active offset.
        """
        if len(owners) != self.buckets:
            raise ValueError(f"a table of {len(owners)} buckets, not {self.buckets}")
        new = list(owners)
        if new == self.copies[self.active // self.buckets]:
            return False
        spare = self.buckets - self.active
        old = self.copies[spare // self.buckets]
        changed = [b for b in range(self.buckets) if old[b] != new[b]]
        self.table.update_many([spare + b for b in changed], [new[b] for b in changed])
        self.copies[spare // self.buckets] = new
        self.table.update(2 * self.buckets, spare)
        self.active = spare
        return True

    def attach(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, self.prog_fd)

    def close(self) -> None:
        if self.prog_fd >= 0:
            os.close(self.prog_fd)
            self.prog_fd = -1
        if self.socks is not None:
            self.socks.close()
        if self.counts is not None:
            self.counts.close()
        self.table.close()

    def handed(self, slot: int) -> int:
        """New TCP connections handed to ``slot`` since the program was loaded (a UDP
        program does not count)."""
        assert self.counts is not None
        return self.counts.lookup_u64(slot)
