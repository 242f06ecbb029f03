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
import mmap
import os
import platform
import socket
import struct
from collections.abc import Callable, Sequence

from ..errors import PortshardError
from ..linux.bpf import SO_ATTACH_REUSEPORT_EBPF
from ..linux.syscalls import native_arch
from .bpfasm import insn
from .programs import (
    BPF_FUNC_SK_SELECT_REUSEPORT,
    SK_PASS,
    steering_code,
    tcp_code,
)

__all__ = [
    "SO_ATTACH_REUSEPORT_EBPF",
    "BpfError",
    "Map",
    "SteeringProgram",
    "bpf",
    "load_select_key0",
]

BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM = 0, 1, 2, 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_TYPE_ARRAY = 2
BPF_F_MMAPABLE = 1 << 10
BPF_MAP_TYPE_REUSEPORT_SOCKARRAY = 20
BPF_PROG_TYPE_SK_REUSEPORT = 21
BPF_SK_REUSEPORT_SELECT = 39  # expected_attach_type
BPF_SK_REUSEPORT_SELECT_OR_MIGRATE = 40
BPF_PSEUDO_MAP_FD = 1


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


def _ld_map_fd(dst: int, fd: int) -> bytes:
    return insn(0x18, dst=dst, src=BPF_PSEUDO_MAP_FD, imm=fd) + insn(0)  # ld_imm64: two slots


class Map:
    """A BPF map (u32 keys unless ``key_size`` says otherwise); closes its fd on close()."""

    def __init__(
        self,
        kind: int,
        value_size: int,
        entries: int,
        name: bytes,
        what: str,
        *,
        key_size: int = 4,
        flags: int = 0,
    ) -> None:
        spec = struct.pack("=7I16s", kind, key_size, value_size, entries, flags, 0, 0, name)
        self.fd = bpf(BPF_MAP_CREATE, spec, f"creating {what}")
        self.key_size, self.value_size = key_size, value_size
        self.entries = entries
        self.what = what
        self.view: memoryview | None = None
        self._mmap: mmap.mmap | None = None

    @classmethod
    def adopt(cls, fd: int, value_size: int, entries: int, what: str) -> Map:
        """A map a predecessor created (issue 15: handed over by fd)."""
        self = cls.__new__(cls)
        self.fd, self.key_size, self.value_size = fd, 4, value_size
        self.entries, self.what = entries, what
        self.view, self._mmap = None, None
        return self

    @classmethod
    def counters(cls, entries: int, name: bytes, what: str) -> Map:
        """An array of ``entries`` u64, mapped into this process (BPF_F_MMAPABLE, Linux 5.5+):
        reading or writing a counter is a memory access, not a bpf() call (the supervisor
        reads them at every sample)."""
        counters = cls(BPF_MAP_TYPE_ARRAY, 8, entries, name, what, flags=BPF_F_MMAPABLE)
        try:
            size = -(-8 * entries // mmap.PAGESIZE) * mmap.PAGESIZE
            counters._mmap = mmap.mmap(counters.fd, size, mmap.MAP_SHARED)
        except OSError as exc:
            counters.close()
            raise BpfError(f"mapping {what} into memory: {_reason(exc)}") from None
        counters.view = memoryview(counters._mmap).cast("q")
        return counters

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

    def next_key(self, key: bytes | None) -> bytes | None:
        """The key after ``key`` (the first if None), or None at the end (BPF_MAP_GET_NEXT_KEY)."""
        size = self.key_size
        k = ctypes.create_string_buffer(key or b"\0" * size, size)
        nxt = ctypes.create_string_buffer(size)
        attr = struct.pack(
            "=I4xQQ", self.fd, ctypes.addressof(k) if key else 0, ctypes.addressof(nxt)
        )
        try:
            bpf(BPF_MAP_GET_NEXT_KEY, attr, f"walking {self.what}")
        except BpfError as exc:
            if "ENOENT" in str(exc):
                return None
            raise
        return nxt.raw

    def lookup_bytes(self, key: bytes) -> bytes | None:
        """The value at a byte-string key, or None if there is none."""
        k = ctypes.create_string_buffer(key, len(key))
        v = ctypes.create_string_buffer(self.value_size)
        attr = struct.pack("=I4xQQQ", self.fd, ctypes.addressof(k), ctypes.addressof(v), 0)
        try:
            bpf(BPF_MAP_LOOKUP_ELEM, attr, f"reading {self.what}")
        except BpfError as exc:
            if "ENOENT" in str(exc):
                return None
            raise
        return v.raw

    def delete_bytes(self, key: bytes) -> bool:
        """Remove a byte-string key; False if it was not there."""
        k = ctypes.create_string_buffer(key, len(key))
        attr = struct.pack("=I4xQ", self.fd, ctypes.addressof(k))
        try:
            bpf(BPF_MAP_DELETE_ELEM, attr, f"deleting from {self.what}")
        except BpfError as exc:
            if "ENOENT" in str(exc):
                return False
            raise
        return True

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
        if self.view is not None:
            self.view.release()
            self.view = None
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def load_program(
    code: bytes, attach_type: int, name: bytes, prog_type: int = BPF_PROG_TYPE_SK_REUSEPORT
) -> int:
    """Load a program (SK_REUSEPORT unless ``prog_type`` says otherwise); the verifier's last
    line is in the error if it refuses. Loaded without the verifier's log first: a log that
    overflows its buffer fails the load (ENOSPC) even when the program is fine."""
    insns, license_ = ctypes.create_string_buffer(code, len(code)), ctypes.c_char_p(b"GPL")
    log = ctypes.create_string_buffer(65536)

    def attr(level: int) -> bytes:
        return struct.pack(
            "=IIQQIIQII16sII",
            prog_type, len(code) // 8, ctypes.addressof(insns),
            ctypes.cast(license_, ctypes.c_void_p).value or 0, level,
            len(log) if level else 0, ctypes.addressof(log) if level else 0,
            0, 0, name, 0, attach_type,
        )  # fmt: skip

    what = f"loading the program {name.decode()}"
    try:
        return bpf(BPF_PROG_LOAD, attr(0), what)
    except BpfError:
        pass
    try:
        return bpf(BPF_PROG_LOAD, attr(1), what)
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


class SteeringProgram:
    """The maps and program steering one reuseport group, by slot key.

    ``set_socket(slot, sock)`` puts a slot's socket in the sockarray (it must be bound, and
    listening for TCP); ``set_table(owners)`` installs a new bucket table atomically (see
    :func:`steering_code`); ``attach`` attaches the program through any socket of the group
    (replacing any program there).
    """

    def __init__(
        self,
        buckets: int,
        *,
        flow: bool,
        slots: int = 1024,
        loads: tuple[int, int, int, int] = (-1, -1, -1, -1),
        compare: bool = True,
        socks_fd: int | None = None,
    ) -> None:
        """``loads``: the fds of the in-flight maps ``held``, ``fix``, ``syn`` and ``cost``
        (inflight.py) a TCP program reads and writes. ``socks_fd``: a predecessor's
        sockarray (issue 15): a socket can be in one sockarray only, and the group's sockets
        are in that one already."""
        if not flow and min(loads) < 0:
            raise ValueError("a TCP steering program needs the in-flight maps")
        self.buckets = buckets
        self.table = Map(
            BPF_MAP_TYPE_ARRAY, 4, 2 * buckets + 1, b"portshard_table", "the bucket table"
        )
        self.socks: Map | None = None
        self.counts: Map | None = None
        self.prog_fd = -1
        try:
            self.counts = Map.counters(slots, b"portshard_count", "the per-slot counters")
            self.socks = (
                Map(
                    BPF_MAP_TYPE_REUSEPORT_SOCKARRAY,
                    8,
                    slots,
                    b"portshard_socks",
                    "a REUSEPORT_SOCKARRAY map",
                )
                if socks_fd is None
                else Map.adopt(socks_fd, 8, slots, "a REUSEPORT_SOCKARRAY map")
            )
            if flow:
                code = steering_code(
                    self.table.fd, self.socks.fd, self.counts.fd, buckets, flow=True
                )
            else:
                code = tcp_code(
                    self.table.fd, self.socks.fd, self.counts.fd, loads, buckets, compare=compare
                )
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
        assert self.counts is not None and self.counts.view is not None
        return int(self.counts.view[slot])
