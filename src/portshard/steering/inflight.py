"""Connections in flight per slot, counted by the kernel: no supervisor work per connection.

A slot's *in flight* is what its TCP listeners have been handed and not yet given back: the
connections waiting in its accept queues plus those its worker (and its children) holds. The
supervisor used to count the held ones from /proc fd tables and a socket-table dump, a cost
that grows with connections (13.8% of a core at 10k idle ones); here two programs count them:

- the steering program (ebpf.py, ``tcp_code``), for each new connection (its SYN), adds one
  to ``held[slot]`` and records ``syn[client port, local port, client address] = (slot,
  time)`` in a hash (only handshakes in progress live there): counting at the SYN means
  that a burst of SYNs within one round trip already sees its own earlier members;
- a ``SOCK_OPS`` program on the supervisor's cgroup (cgroup v2; a private mount of the
  hierarchy when none is mounted) sees the handshake complete (``PASSIVE_ESTABLISHED``): it
  moves the tuple from ``syn`` to ``conns`` and asks for the
  connection's state changes; the first change that means the worker let go (``FIN_WAIT1``:
  it closed first; ``LAST_ACK``: it closed after the client; ``CLOSE``: a reset, or a
  connection never accepted) subtracts one, forgets the tuple and stops the callbacks;
- a handshake that never completes (the client vanished, a SYN flood) would stay counted: the
  supervisor expires ``syn`` entries older than ``EXPIRE`` seconds (:meth:`InFlight.expire`,
  a cost per handshake in progress, normally none) and adds them to ``fix[slot]``, which the
  steering program and :meth:`InFlight.counts` subtract (the supervisor cannot add to
  ``held`` atomically itself).

Nothing is counted twice or left behind: a SYN seen again moves its count to the slot chosen
now; a SYN that finds ``syn`` full (a flood of more than ``SYN_ENTRIES`` handshakes within
``EXPIRE``) is not counted, and ``conns`` full undoes the count. (``syn`` was an LRU hash,
which made room by forgetting a handshake in progress, whose count then stayed in ``held``
for ever; the LRU's bookkeeping also cost more at each SYN.)

What it costs each connection (``bench/experiments/held_cpu.py --cost-only``: the programs'
run time from BPF_ENABLE_STATS; 2 workers, 64 in flight, on loopback, where nearly all of it
runs in the client's context): the steering program ~1.0 µs, of which the ``syn`` insert is
~0.4, the key 0.1 and the clock 0.1; the SOCK_OPS program ~1.75 µs over 6 runs: 3 that every
attached program gets and that return at once (``TIMEOUT_INIT``, ``RWND_INIT``,
``NEEDS_ECN``) and the ``ESTABLISHED`` state change that follows the state callback's turning
on, ~70 ns each; the handshake (``PASSIVE_ESTABLISHED``, ~0.5 with the move) and the let-go
do the work, ``conns`` ~1.0 of it. Both maps are preallocated: a map that allocates at each
insert cost ~0.5 µs more a connection. The attachment is a bpf link: it goes when the
supervisor's fd closes, even if the supervisor is killed.

Where it is attached: a cgroup's SOCK_OPS programs run for every TCP socket of the cgroup
and its descendants, 13-26 times per connection of ours on loopback when that was the
supervisor's cgroup (on a cgroup v1 host the root of the hierarchy: every client and every
other program of the host). A socket's cgroup is fixed when it is created and accepted
connections inherit their listener's, so the supervisor creates its listeners in a group of
their own (linux/cgroup.py ``made_in``, the home's ``listen``) and the program is attached
there: it runs for our slots' connections only. A listener made elsewhere (by a predecessor
before this, by systemd's socket activation) is found by its cgroup id (sock_diag) and that
cgroup is covered too (:meth:`InFlight.cover`); what cannot be placed falls back to this
process's own cgroup, as before, and :attr:`InFlight.reach` says so. The programs are
idempotent per connection (map moves keyed by the tuple), so a socket seen by two
attachments (nested cgroups) is still counted once.

Where SOCK_OPS cannot be attached (no cgroup v2, not root), :attr:`InFlight.kernel` is False
and the supervisor writes each slot's queue depth into ``held`` at every sample instead, so
the steering program still prefers the slot with the shorter queue.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import struct
import tempfile
from collections.abc import Iterable

from ..linux.sockdiag import listener_cgroups
from . import bpfasm as asm
from .bpfasm import Asm
from .ebpf import BpfError, Map, bpf, load_program
from .programs import BPF_FUNC_MAP_LOOKUP_ELEM, BPF_FUNC_MAP_UPDATE_ELEM
from .speed import UNIT

__all__ = ["InFlight", "cgroup_fd", "sock_ops_code", "tuple_key"]

BPF_MAP_TYPE_HASH = 1
BPF_NOEXIST = 1
BPF_PROG_TYPE_SOCK_OPS = 13
BPF_CGROUP_SOCK_OPS = 3
BPF_LINK_CREATE = 28
BPF_FUNC_MAP_DELETE_ELEM = 3
BPF_FUNC_SOCK_OPS_CB_FLAGS_SET = 59
BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB = 5, 10
BPF_SOCK_OPS_STATE_CB_FLAG = 4
TCP_FIN_WAIT1, TCP_CLOSE, TCP_LAST_ACK = 4, 7, 9
# offsetof(struct bpf_sock_ops, ...)
_OP, _ARG1, _FAMILY, _REMOTE_IP4, _REMOTE_IP6 = 0, 8, 20, 24, 32
_REMOTE_PORT, _LOCAL_PORT, _CB_FLAGS = 64, 68, 84
_V4_MAPPED_WORD = struct.unpack("=i", b"\0\0\xff\xff")[0]

KEY_SIZE = 20
SYN_ENTRIES = 16384  # handshakes in progress at once
SYN_VALUE = struct.Struct("=IxxxxQ")  # slot, when the SYN was steered (CLOCK_MONOTONIC ns)
EXPIRE = 10.0  # seconds: a handshake not completed by then is forgotten
# Connections counted at once (more are not counted). Preallocated: an element is taken from
# and given back to a per-CPU free list, where a map allocating at each insert cost 0.5 µs
# more a connection (held_cpu.py --cost-only); 12.6 MB of kernel memory (memlock in fdinfo).
CONN_ENTRIES = 1 << 17
CGROUP2_MAGIC = 0x63677270


def tuple_key(client: str, client_port: int, local_port: int) -> bytes:
    """The 20-byte key both programs build: client port and local port as they sit in the TCP
    header, then the client address as IPv6 (IPv4 as ``::ffff:a.b.c.d``)."""
    packed = socket.inet_pton(socket.AF_INET6, client if ":" in client else f"::ffff:{client}")
    return struct.pack("!HH", client_port, local_port) + packed


def _key(a: Asm, prefix: str) -> None:
    """The tuple key of the connection of this sock_ops ctx (r6) at fp - 24 (20 bytes)."""
    a.op(asm.LDX_W, dst=1, src=6, off=_REMOTE_PORT).op(asm.RSH32_IMM, dst=1, imm=16)
    a.op(asm.LDX_W, dst=2, src=6, off=_LOCAL_PORT).op(asm.TO_BE, dst=2, imm=16)
    a.op(asm.LSH32_IMM, dst=2, imm=16).op(asm.OR32_REG, dst=1, src=2)
    a.op(asm.STX_W, dst=10, src=1, off=-24)
    a.op(asm.LDX_W, dst=1, src=6, off=_FAMILY)
    a.jump(asm.JEQ_IMM, f"{prefix}6", dst=1, imm=socket.AF_INET6)
    a.op(asm.ST_W, dst=10, off=-20, imm=0).op(asm.ST_W, dst=10, off=-16, imm=0)
    a.op(asm.ST_W, dst=10, off=-12, imm=_V4_MAPPED_WORD)
    a.op(asm.LDX_W, dst=1, src=6, off=_REMOTE_IP4).op(asm.STX_W, dst=10, src=1, off=-8)
    a.jump(asm.JA, f"{prefix}done")
    a.label(f"{prefix}6")
    for word in range(4):
        a.op(asm.LDX_W, dst=1, src=6, off=_REMOTE_IP6 + 4 * word)
        a.op(asm.STX_W, dst=10, src=1, off=-20 + 4 * word)
    a.label(f"{prefix}done")


def _call_map(a: Asm, helper: int, map_fd: int, key_off: int, value_off: int = 0) -> None:
    a.map_fd(1, map_fd).op(asm.MOV64_REG, dst=2, src=10).op(asm.ADD64_IMM, dst=2, imm=key_off)
    if value_off:
        a.op(asm.MOV64_REG, dst=3, src=10).op(asm.ADD64_IMM, dst=3, imm=value_off)
        a.op(asm.MOV64_IMM, dst=4, imm=BPF_NOEXIST)
    a.call(helper)


def _add(a: Asm, held_fd: int, delta: int) -> None:
    """held[*(u32 *)(fp - 28)] += delta (atomic)."""
    _call_map(a, BPF_FUNC_MAP_LOOKUP_ELEM, held_fd, -28)
    a.jump(asm.JEQ_IMM, "out", dst=0, imm=0)
    a.op(asm.MOV64_IMM, dst=1, imm=delta).op(asm.ATOMIC_ADD_DW, dst=0, src=1)


def sock_ops_code(syn_fd: int, conns_fd: int, held_fd: int) -> bytes:
    """The SOCK_OPS program of the module notes."""
    a = Asm().op(asm.MOV64_REG, dst=6, src=1)
    a.op(asm.LDX_W, dst=1, src=6, off=_OP)
    a.jump(asm.JEQ_IMM, "established", dst=1, imm=BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
    a.jump(asm.JEQ_IMM, "state", dst=1, imm=BPF_SOCK_OPS_STATE_CB)
    a.jump(asm.JA, "out")
    # A handshake completed: is it one of ours?
    a.label("established")
    _key(a, "e")
    _call_map(a, BPF_FUNC_MAP_LOOKUP_ELEM, syn_fd, -24)
    a.jump(asm.JEQ_IMM, "out", dst=0, imm=0)
    a.op(asm.LDX_W, dst=7, src=0).op(asm.STX_W, dst=10, src=7, off=-28)
    _call_map(a, BPF_FUNC_MAP_DELETE_ELEM, syn_fd, -24)
    a.jump(asm.JNE_IMM, "out", dst=0, imm=0)  # the supervisor expired it meanwhile
    _call_map(a, BPF_FUNC_MAP_UPDATE_ELEM, conns_fd, -24, value_off=-28)
    a.jump(asm.JEQ_IMM, "follow", dst=0, imm=0)
    _add(a, held_fd, -1)  # conns is full: its close could not be seen, so it does not count
    a.jump(asm.JA, "out")
    a.label("follow")
    a.op(asm.LDX_W, dst=2, src=6, off=_CB_FLAGS).op(0x44, dst=2, imm=BPF_SOCK_OPS_STATE_CB_FLAG)
    a.op(asm.MOV64_REG, dst=1, src=6).call(BPF_FUNC_SOCK_OPS_CB_FLAGS_SET)
    a.jump(asm.JA, "out")
    # A state change of a counted connection: has the worker let go?
    a.label("state")
    a.op(asm.LDX_W, dst=1, src=6, off=_ARG1)
    for state in (TCP_FIN_WAIT1, TCP_LAST_ACK, TCP_CLOSE):
        a.jump(asm.JEQ_IMM, "gone", dst=1, imm=state)
    a.jump(asm.JA, "out")
    a.label("gone")
    _key(a, "g")
    _call_map(a, BPF_FUNC_MAP_LOOKUP_ELEM, conns_fd, -24)
    a.jump(asm.JEQ_IMM, "out", dst=0, imm=0)
    a.op(asm.LDX_W, dst=7, src=0).op(asm.STX_W, dst=10, src=7, off=-28)
    _call_map(a, BPF_FUNC_MAP_DELETE_ELEM, conns_fd, -24)
    a.jump(asm.JNE_IMM, "out", dst=0, imm=0)
    _add(a, held_fd, -1)
    # Its later state changes (FIN_WAIT2, TIME_WAIT, CLOSE) need not run this program.
    a.op(asm.LDX_W, dst=2, src=6, off=_CB_FLAGS).op(0x54, dst=2, imm=~BPF_SOCK_OPS_STATE_CB_FLAG)
    a.op(asm.MOV64_REG, dst=1, src=6).call(BPF_FUNC_SOCK_OPS_CB_FLAGS_SET)
    a.label("out").op(asm.MOV64_IMM, dst=0, imm=1).op(asm.EXIT)
    return a.code()


def _cgroup2_mounts() -> Iterable[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[:1] == ["cgroup2"]:
                yield left.split()[4]


def _own_cgroup() -> str:
    """This process's cgroup v2 path (``0::PATH`` of /proc/self/cgroup)."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    raise OSError("this kernel has no cgroup v2 hierarchy (no 0:: line in /proc/self/cgroup)")


def _relative(path: str) -> str:
    """``path`` (a directory of a mounted cgroup2) as a path in the hierarchy."""
    real = os.path.realpath(path)
    for mount in _cgroup2_mounts():
        if real == mount or real.startswith(mount.rstrip("/") + "/"):
            return "/" + real[len(mount) :].strip("/")
    return real


def _find_cgroups(mount: str, ids: set[int]) -> dict[int, str]:
    """The paths in the hierarchy of the cgroups whose ids (directory inodes) are ``ids``:
    a walk of the mount, stopped once all are found."""
    found: dict[int, str] = {}
    if os.stat(mount).st_ino in ids:
        found[os.stat(mount).st_ino] = "/"
    stack = [(mount, "")]
    while stack and len(found) < len(ids):
        directory, rel = stack.pop()
        with contextlib.suppress(OSError), os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    path = f"{rel}/{entry.name}"
                    if entry.inode() in ids:
                        found[entry.inode()] = path
                    stack.append((entry.path, path))
    return found


def cgroup_fd() -> int:
    """An fd of this process's cgroup v2 directory: from a mounted cgroup2 if there is one,
    else from a private mount, detached at once (the fd keeps working; nothing is left)."""
    path = _own_cgroup().lstrip("/")
    for mount in _cgroup2_mounts():
        with contextlib.suppress(OSError):
            return os.open(os.path.join(mount, path), os.O_RDONLY | os.O_DIRECTORY)
    libc = ctypes.CDLL(None, use_errno=True)
    where = tempfile.mkdtemp(prefix="portshard-cgroup2-")
    try:
        if libc.mount(b"none", where.encode(), b"cgroup2", 0, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount -t cgroup2: {os.strerror(err)}")
        try:
            return os.open(os.path.join(where, path), os.O_RDONLY | os.O_DIRECTORY)
        finally:
            libc.umount2(where.encode(), 2)  # MNT_DETACH
    finally:
        os.rmdir(where)


class InFlight:
    """The in-flight maps, and the SOCK_OPS program that keeps them where it can attach."""

    def __init__(self, slots: int = 1024) -> None:
        self.held = Map.counters(slots, b"portshard_held", "the in-flight counts")
        self.fix: Map | None = None
        self.cost: Map | None = None
        self.syn: Map | None = None
        self.conns: Map | None = None
        self.prog_fd = self.link_fd = -1  # link_fd: the last attachment (>= 0: counting)
        self._links: dict[int, tuple[str, int]] = {}  # cgroup id -> (path in the hierarchy, link)
        self._broad = ""  # why the program reaches more than our listeners
        self.why = ""
        try:
            self.fix = Map.counters(slots, b"portshard_fix", "the expired handshakes")
            self.cost = Map.counters(slots, b"portshard_cost", "the per-slot costs")
            assert self.cost.view is not None
            for slot in range(slots):
                self.cost.view[slot] = UNIT
            self.syn = Map(
                BPF_MAP_TYPE_HASH, SYN_VALUE.size, SYN_ENTRIES, b"portshard_syn",
                "the handshake map", key_size=KEY_SIZE,
            )  # fmt: skip
        except BaseException:
            self.close()
            raise

    @property
    def kernel(self) -> bool:
        """True while the SOCK_OPS program counts (else the supervisor writes queue depths)."""
        return self.link_fd >= 0

    def attach(self, group: str | None = None, listeners: Iterable[socket.socket] = ()) -> bool:
        """Load the SOCK_OPS program and attach it to ``group`` (the cgroup directory our
        listeners are created in) and to the cgroup of any of ``listeners`` made elsewhere;
        without ``group``, to this process's own cgroup. False (and :attr:`why`) if it cannot
        be attached anywhere."""
        assert self.syn is not None
        try:
            self.conns = Map(
                BPF_MAP_TYPE_HASH, 4, CONN_ENTRIES, b"portshard_conns", "the connection map",
                key_size=KEY_SIZE,
            )  # fmt: skip
            code = sock_ops_code(self.syn.fd, self.conns.fd, self.held.fd)
            self.prog_fd = load_program(
                code, BPF_CGROUP_SOCK_OPS, b"portshard_held", BPF_PROG_TYPE_SOCK_OPS
            )
            if group is not None:
                self._link_path(group)
            else:
                self._link_own()
            self.cover(listeners)
            return True
        except (BpfError, OSError) as exc:
            self.why = f"connections in flight are not counted by the kernel: {exc}"
            self._close_program()
            return False

    def cover(self, listeners: Iterable[socket.socket]) -> None:
        """Make sure the program sees the connections of these TCP ``listeners`` (new slots, a
        rescued listener): attach it to the cgroup of each that no attachment covers yet (found
        by its cgroup id), or, if that cannot be found, to this process's own cgroup. Other
        sockets are ignored. Raises BpfError or OSError if an attachment fails."""
        if self.prog_fd < 0:
            return
        tcp = {
            os.fstat(sock.fileno()).st_ino: sock
            for sock in listeners
            if sock.fileno() >= 0 and sock.type == socket.SOCK_STREAM
        }
        if not tcp:
            return
        try:
            ids = listener_cgroups(set(tcp))
        except OSError as exc:
            self._link_own(f"cannot see the listeners' cgroups ({exc})")
            return
        unknown = set(ids.values()) - set(self._links)
        if len(ids) < len(tcp):
            self._link_own("the kernel did not say a listener's cgroup")
        if not unknown:
            return
        mount = next(iter(_cgroup2_mounts()), None)
        paths = _find_cgroups(mount, unknown) if mount is not None else {}
        for cid in sorted(unknown):
            rel = paths.get(cid)
            if rel is None:
                self._link_own(f"a listener's cgroup (id {cid}) is not found")
            elif not self._covers(rel):
                assert mount is not None
                self._link_path(os.path.join(mount, rel.lstrip("/")), rel)
                self._broad = "listeners made elsewhere (by a predecessor, or systemd) are there"

    @property
    def reach(self) -> str:
        """Where the program is attached, in words (status, doctor, the bench)."""
        if not self._links:
            return "nowhere"
        where = ", ".join(sorted(rel for rel, _ in self._links.values()))
        if self._broad:
            return f"cgroup {where}: every TCP socket there ({self._broad})"
        return f"cgroup {where}: our listeners' connections only"

    def _covers(self, rel: str) -> bool:
        return any(
            have == "/" or rel == have or rel.startswith(have + "/")
            for have, _ in self._links.values()
        )

    def _link_path(self, path: str, rel: str | None = None) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._attach_fd(fd, rel or _relative(path))
        finally:
            os.close(fd)

    def _link_own(self, why: str = "") -> None:
        """This process's own cgroup (the reach before the listen group, and its fallback)."""
        rel = _own_cgroup()
        self._broad = why or "no cgroup of our own for the listeners"
        if self._covers(rel):
            return
        fd = cgroup_fd()
        try:
            self._attach_fd(fd, rel)
        finally:
            os.close(fd)

    def _attach_fd(self, cgroup: int, rel: str) -> None:
        cid = os.fstat(cgroup).st_ino
        if cid in self._links:
            return
        attr = struct.pack("=IIII", self.prog_fd, cgroup, BPF_CGROUP_SOCK_OPS, 0)
        self._links[cid] = (rel, bpf(BPF_LINK_CREATE, attr, "attaching SOCK_OPS to the cgroup"))
        self.link_fd = self._links[cid][1]

    def counts(self, slots: Iterable[int]) -> dict[int, int]:
        """In flight per slot (queued + held), or the last queue depths the supervisor wrote."""
        held, fix = self.held.view, self.fix.view if self.fix else None
        assert held is not None and fix is not None
        return {slot: int(held[slot]) - int(fix[slot]) for slot in slots}

    def count(self, slot: int) -> int:
        """:meth:`counts` of one slot."""
        assert self.held.view is not None and self.fix is not None and self.fix.view is not None
        return int(self.held.view[slot]) - int(self.fix.view[slot])

    @property
    def loads(self) -> tuple[int, int, int, int]:
        """The fds a TCP steering program reads and writes (ebpf.tcp_code)."""
        assert self.fix is not None and self.syn is not None and self.cost is not None
        return self.held.fd, self.fix.fd, self.syn.fd, self.cost.fd

    def set_cost(self, slot: int, cost: int) -> None:
        """How much slower than the fastest ``slot`` serves, x ``UNIT`` (speed.py): what the
        program multiplies its connections in flight by. A memory write."""
        assert self.cost is not None and self.cost.view is not None
        self.cost.view[slot] = max(1, cost)

    def expire(self, now_ns: int, older: float = EXPIRE) -> int:
        """Forget the handshakes started more than ``older`` s ago (they will not complete),
        so that they stop counting; returns how many. Costs one bpf() call per handshake in
        progress, which are normally none."""
        assert self.syn is not None and self.fix is not None and self.fix.view is not None
        stale: list[bytes] = []
        key = None
        while (key := self.syn.next_key(key)) is not None:
            value = self.syn.lookup_bytes(key)
            if value is not None and now_ns - SYN_VALUE.unpack(value)[1] > older * 1e9:
                stale.append(key)
        expired = 0
        for key in stale:
            value = self.syn.lookup_bytes(key)
            if value is not None and self.syn.delete_bytes(key):  # else it completed meanwhile
                self.fix.view[SYN_VALUE.unpack(value)[0]] += 1
                expired += 1
        return expired

    def write(self, slot: int, value: int) -> None:
        """The supervisor's stand-in for the kernel count (only while :attr:`kernel` is False)."""
        assert self.held.view is not None
        self.held.view[slot] = value

    def _close_program(self) -> None:
        for _rel, fd in self._links.values():
            os.close(fd)
        self._links.clear()
        self._broad = ""
        if self.prog_fd >= 0:
            os.close(self.prog_fd)
        self.link_fd = self.prog_fd = -1
        if self.conns is not None:
            self.conns.close()
            self.conns = None

    def close(self) -> None:
        self._close_program()
        for m in (self.syn, self.fix, self.cost):
            if m is not None:
                m.close()
        self.held.close()
