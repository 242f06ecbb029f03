"""The steering controller: the supervisor's side of steering.

The supervisor says, at every turn of its loop, which slots have a ready worker
(:meth:`Steering.step`); every ``SAMPLE`` seconds the controller also reads each slot's
accept-queue depth (TCP_INFO, ~1.5 µs a socket), and every ``SAMPLE_STEADY`` seconds once
everything has been steady for a while, with a :meth:`Steering.peek` at the kernel's counts
between (docs/ARCHITECTURE.md, "What a look costs"); idle, the first connection queued on a
TCP listener wakes the loop (:attr:`Steering.wake`, :meth:`Steering.woken`). The policy
(``policy.py``) turns that into verdicts and weights, the table (``table.py``) into buckets,
and a backend puts them in the kernel, per reuseport group (one per ``--listen`` address):

- ``ebpf``: one SK_REUSEPORT program per group with a REUSEPORT_SOCKARRAY keyed by slot and a
  double-buffered array of bucket -> slot; a change is one batch write and a flip. Needs
  CAP_BPF or root.
- ``cbpf``: a classic program per group (a jump chain over the table's runs), re-attached on
  every change (~20 µs). Its indices are the kernel's listen order, so the controller keeps a
  copy of that order: a socket that closes is replaced in the kernel's array by the last one.

A slot whose worker died keeps connections in its accept queue until a replacement accepts
them. Where the kernel can migrate a closing listener's queue (the eBPF program is loaded as
SELECT_OR_MIGRATE, or ``net.ipv4.tcp_migrate_req`` is 1), :meth:`Steering.rescue` replaces that
slot's listener: a new socket is bound first (so a failure changes nothing), the old one closes
(the kernel moves its queue to the slots in the table), the new one listens.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..address import Proto
from ..errors import InspectError, SupervisorError
from ..linux import proc, sysctl, tcpinfo
from ..linux.cgroup import Cgroup, made_in
from ..linux.sysctl import migrate_req
from . import cbpf
from .ebpf import BpfError, SteeringProgram
from .inflight import InFlight
from .policy import Change, ChangeKind, Health, Observation, Policy
from .speed import UNIT, WAITED, Speeds, cost_word, split_word
from .table import BUCKETS, Buckets, apportion, contiguous, runs

__all__ = ["BACKENDS", "SAMPLE", "Health", "Steering", "migrate_req"]

log = logging.getLogger("portshard.steering")

BACKENDS = ("auto", "cbpf", "ebpf", "off")
SAMPLE = 0.02  # seconds between queue samples while any queue is not empty (10 ms cost 3.3%
# of a core on the benchmark, 20 ms 2.0%, with no difference measured in what steering achieved)
SAMPLE_IDLE = 0.05  # ... and while nothing was queued or handed since the last sample (a
# stall is seen at the second look, so within 70 ms of the load starting)
SAMPLE_STEADY = 0.1  # ... and while busy but steady (eBPF with kernel counts): every slot
# ready, in, at a full weight and speed, no cap, for STEADY_AFTER; between two such samples a
# peek every PEEK_STEADY at the kernel's counts (memory reads) looks for a slot that let nothing
# go while holding connections (a stall beginning) and brings the samples back at once
PEEK_STEADY = 0.05  # seconds between those peeks: a stall that begins is seen within 50 ms
# (then SAMPLE cadence); at SAMPLE (20 ms) the peeks and their wake-ups were about half of the
# supervisor's 2.25-3% of a core under a steady load
STEADY_AFTER = 1.0  # seconds of steady samples before the cadence slows
STEADY_SPREAD = 2.0  # ... with no rate this many times slower than the fastest
SUSPECT_FAST = 0.1  # seconds of SAMPLE cadence after a peek saw a slot let nothing go
SAMPLE_QUIET = 1.0  # ... and while idle and steady, with a peek every PEEK_QUIET for any new
# connection (an idle look found nothing to do: 1.3% of a core at 20 a second, load 4-6)
PEEK_QUIET = 0.25  # idle, the first connection wakes the supervisor (a listener becomes
# readable: :meth:`Steering.woken`); the peek is for one it missed (its worker took it first)
LOG_EVERY = 1.0  # overload and weight lines: at most one a second per slot
MIGRATE_REQ = sysctl.path(sysctl.MIGRATE_REQ)


class _Group:
    """One reuseport group (a --listen address): its socket in each slot."""

    def __init__(self, proto: Proto, slots: Sequence[int]) -> None:
        self.proto = proto
        self.socks: dict[int, socket.socket] = {}
        self.order: list[int] = []  # cbpf: slot at each index of the kernel's listen order
        self.buckets = Buckets(slots)
        self.program: SteeringProgram | None = None
        self.installed: object = None  # what the kernel has now (to skip identical updates)
        self.counts: dict[int, int] = {}  # the bucket counts last installed
        self.seeded_order: list[int] = []  # a predecessor's listen order (seed)

    def export(self) -> dict[str, Any]:
        """What a supervisor's successor needs to go on where this one is (issue 15): the
        bucket table (so that no UDP flow moves) and the kernel's listen order."""
        return {
            "proto": self.proto.value,
            "home": list(self.buckets.home),
            "owner": list(self.buckets.owner),
            "order": list(self.order),
        }

    def seed(self, saved: Mapping[str, Any]) -> None:
        """Start from a predecessor's table (before the sockets join, in its listen order)."""
        if saved.get("proto") != self.proto.value:
            return
        if sorted(set(saved["home"])) != self.buckets.slots:
            return  # other slots: start afresh
        self.buckets.home = list(saved["home"])
        self.buckets.owner = list(saved["owner"])
        self.seeded_order = [int(s) for s in saved.get("order", ())]

    def join(self, slot: int, sock: socket.socket, present: bool = False) -> None:
        """``present``: the socket is in the (inherited) sockarray already (issue 15)."""
        self.socks[slot] = sock
        self.order.append(slot)
        if self.program is not None and not present:
            self.program.set_socket(slot, sock)

    def leave(self, slot: int) -> None:
        """``slot``'s socket has closed: the kernel moved its last socket into its place."""
        del self.socks[slot]
        i = self.order.index(slot)
        self.order[i] = self.order[-1]
        self.order.pop()
        self.installed = None
        self.counts = {}

    def anchor(self) -> socket.socket:
        return self.socks[self.order[0]]


@dataclass
class _Limiter:
    """At most one overload/weight line per slot per LOG_EVERY; the newest pending is kept."""

    last: float = -LOG_EVERY
    pending: Change | None = None
    held: int = 0


class Steering:
    """Steering for every reuseport group of one supervisor."""

    def __init__(
        self,
        backend: str,
        why: str,
        protos: Sequence[Proto],
        slots: dict[int, list[socket.socket]],
        on_event: Callable[[str], None] | None = None,
        seed: Sequence[Mapping[str, Any]] | None = None,
        inherited: Mapping[int, int] | None = None,
        listen_group: Cgroup | None = None,
    ) -> None:
        """``seed``: a predecessor's tables (``export``); ``inherited``: its sockarray fds by
        group (``handoff_fds``), whose sockets are in them already (issue 15);
        ``listen_group``: the cgroup our listeners are created in (linux/cgroup.py
        ``made_in``), where the SOCK_OPS program goes (inflight.py)."""
        inherited = inherited or {}
        if backend not in ("cbpf", "ebpf"):
            raise ValueError(f"steering backend {backend!r}: use cbpf or ebpf")
        self.backend = backend
        self.why = why
        self.policy = Policy()
        self.groups = [_Group(proto, sorted(slots)) for proto in protos]
        for group, saved in zip(self.groups, seed or (), strict=False):
            group.seed(saved)
        self.on_event = on_event
        self.changes = 0
        self.updates = 0
        self.exported = 0  # goes up when what export() returns may have changed (the warden)
        self.next_sample = 0.0
        self._version = -1  # the policy version the kernel has
        self.seen_ready = False
        self._limit: dict[int, _Limiter] = {}
        self._shares: dict[int, float] = {}
        self._pids: dict[int, int | None] = {}
        self._ever_ready: set[int] = set()  # slots that have had a ready worker
        self._last_health: tuple[tuple[int, int | None, Health], ...] = ()
        self._handed: dict[int, int] = {}
        self._next_expire = 0.0
        self.speeds = Speeds()
        self._costs: dict[int, int] = {}  # what the kernel's cost map holds (else UNIT)
        self._speed_pids: dict[int, int | None] = {}
        self._waits: dict[int, tuple[int, proc.Sched, float]] = {}  # slot -> (pid, read, when)
        self._schedstat = proc.RunQueueWaits()
        self._cpu: dict[int, float] = {}  # slot -> its worker's CPU seconds since the last sample
        self.next_peek = 0.0
        self.steady = False  # sampling at SAMPLE_STEADY, peeking at SAMPLE between
        self._steady_since = 0.0  # the first of the steady samples since the last abnormal one
        self._fast_until = 0.0
        self._peeked: dict[int, tuple[int, int]] = {}  # slot -> (let go, in flight)
        self._tcp_programs: list[SteeringProgram] = []  # what a peek reads handed counts from
        self._last_full = 0.0
        self._unsettled = False  # a health change or a logged change since the last sample
        self._was_busy = False
        self.quiet = False  # steady while idle: a peek is for any new connection
        # Idle, the TCP listeners are watched (level, one-shot) in an epoll of our own that the
        # loop's selector watches: the first connection queued wakes the supervisor at once
        # instead of at the next idle look (up to SAMPLE_IDLE, or a quiet peek, later).
        self.wake = select.epoll()
        self._watched: list[int] = []
        self._fresh = False  # woken: the next look starts the speeds' window (speed.py)
        self._woke = -SAMPLE_IDLE  # when (one wake per SAMPLE_IDLE at most: under a light
        # load a look may find nothing queued, and each connection would bring one)
        self.interval = SAMPLE_IDLE  # between the last sample and the next one (status)
        self.inflight: InFlight | None = None
        self.listen_group = listen_group
        self.balance = "none"
        # The benchmark's knob (not an option): PORTSHARD_POLICY=frozen never samples, so the
        # tables stay at equal weights and no cost or cap is written; what the programs alone
        # cost against the policy's decisions (steering_sweep's ebpf+frozen).
        self.frozen = os.environ.get("PORTSHARD_POLICY") == "frozen"
        try:
            if backend == "ebpf":
                self.inflight = InFlight()
                self.balance = os.environ.get("PORTSHARD_BALANCE", "inflight")
                if self.balance == "inflight":
                    self.inflight.attach(
                        listen_group.path if listen_group is not None else None,
                        [sock for socks in slots.values() for sock in socks],
                    )
                else:  # the benchmark's knob: "queue" depths, or "none" (random, as classic)
                    self.inflight.why = f"PORTSHARD_BALANCE={self.balance}"
                loads = self.inflight.loads
                for gi, group in enumerate(self.groups):
                    group.program = SteeringProgram(
                        BUCKETS,
                        flow=group.proto is Proto.UDP,
                        loads=loads,
                        compare=self.balance != "none",
                        socks_fd=os.dup(inherited[gi]) if gi in inherited else None,
                    )
            for gi, group in enumerate(self.groups):
                order = group.seeded_order
                if sorted(order) != sorted(slots):
                    order = sorted(slots)
                for slot in order:
                    group.join(slot, slots[slot][gi], present=gi in inherited)
            self.policy.observe(Observation(s, None, Health.STARTING) for s in sorted(slots))
            for group in self.groups:
                self._install(group)
        except BaseException:
            self.close()
            raise

    @classmethod
    def create(
        cls,
        mode: str,
        protos: Sequence[Proto],
        slots: dict[int, list[socket.socket]],
        on_event: Callable[[str], None] | None = None,
        seed: Sequence[Mapping[str, Any]] | None = None,
        inherited: Mapping[int, int] | None = None,
        listen_group: Cgroup | None = None,
    ) -> Steering | None:
        """Steering with the backend ``mode`` asks for (auto: eBPF if this process may load it,
        else classic BPF); None for ``off``. Raises SupervisorError if a forced backend fails."""
        if mode == "off":
            return None
        if mode not in BACKENDS:
            raise SupervisorError(f"--steering {mode!r}: use one of {', '.join(BACKENDS)}")
        tried = ""
        if mode in ("auto", "ebpf"):
            try:
                return cls(
                    "ebpf",
                    f"{mode}: eBPF SK_REUSEPORT loaded",
                    protos,
                    slots,
                    on_event,
                    seed,
                    inherited,
                    listen_group,
                )
            except (BpfError, OSError) as exc:
                if mode == "ebpf":
                    raise SupervisorError(f"--steering ebpf: {exc}; use --steering cbpf") from None
                tried = f"; eBPF not available: {exc}"
        try:
            return cls("cbpf", f"{mode}: classic BPF{tried}", protos, slots, on_event, seed)
        except OSError as exc:
            if mode == "cbpf":
                raise SupervisorError(
                    f"--steering cbpf: cannot attach a classic BPF program to the group: "
                    f"{exc.strerror or exc}"
                ) from None
            log.warning("steering is off: classic BPF failed too (%s)%s", exc, tried)
            return None

    def export(self) -> list[dict[str, Any]]:
        return [group.export() for group in self.groups]

    def handoff_fds(self) -> dict[int, int]:
        """Each group's sockarray fd (eBPF): a successor must use the same map (issue 15)."""
        return {
            gi: group.program.socks.fd
            for gi, group in enumerate(self.groups)
            if group.program is not None and group.program.socks is not None
        }

    def close(self) -> None:
        self._schedstat.close()
        self.wake.close()
        for group in self.groups:
            if group.program is not None:
                group.program.close()
                group.program = None
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None

    # ---- slots come and go ------------------------------------------------------------------

    def add_slot(self, slot: int, socks: Sequence[socket.socket]) -> None:
        """A new slot (scale up): its sockets have just joined the groups (at the end)."""
        self.exported += 1
        for group, sock in zip(self.groups, socks, strict=True):
            group.buckets.add_slot(slot)
            group.join(slot, sock)
        self._cover(socks)
        if self._writes_queues():
            self._write_queued(slot, 0)  # a slot removed earlier may have left its last depth

    def _cover(self, socks: Sequence[socket.socket]) -> None:
        """The SOCK_OPS program sees these new listeners' connections (inflight.py)."""
        if self.inflight is None or not self.inflight.kernel:
            return
        try:
            self.inflight.cover(socks)
        except (BpfError, OSError) as exc:
            log.warning("connections of a new listener may not be counted: %s", exc)

    def remove_slot(self, slot: int) -> None:
        """A slot's sockets have closed (scale down); it was excluded before."""
        self.exported += 1
        for group in self.groups:
            if slot in group.socks:
                group.leave(slot)
            group.buckets.remove_slot(slot)
        self.policy.forget(slot)
        self._limit.pop(slot, None)
        for group in self.groups:
            self._install(group)

    def can_migrate(self) -> bool:
        """Can the kernel hand a closing listener's queue to the rest of its group?"""
        return self.backend == "ebpf" or migrate_req() == 1

    def rescue(
        self, slot: int, index: int, old: socket.socket, backlog: int
    ) -> socket.socket | None:
        """Replace ``slot``'s listener of group ``index`` (a TCP group) so that the kernel hands
        the connections queued on it to the other slots; returns the new listener, or None if
        that cannot be done (no migration here, the slot is still in the table, or no other
        slot is).

        Raises OSError if the new socket cannot be bound; then nothing has changed.
        """
        group = self.groups[index]
        weights = self.policy.tcp_weights()
        if not self.can_migrate() or slot in weights or not weights or slot not in group.socks:
            return None
        queued = tcpinfo.queue_depth(old).queued
        with made_in(self.listen_group):
            new = socket.socket(old.family, old.type)
        try:
            new.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            new.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if old.family == socket.AF_INET6:
                v6only = old.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
                new.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
            new.bind(old.getsockname())  # bound, not listening: not in the group yet
        except BaseException:
            new.close()
            raise
        self.unwatch()  # a closed socket stays in an epoll while another process holds it
        tcpinfo.stop_listening(old)  # its queue migrates now, even if the warden holds a copy
        old.close()
        group.leave(slot)
        self.exported += 1
        new.listen(backlog)
        group.join(slot, new)
        self._cover([new])
        self._install(group)
        pid = self._pids.get(slot)
        self._say(
            Change(
                slot,
                pid,
                f"its listener was replaced; the kernel handed the {queued} connection(s) "
                f"queued on it to the other slots",
                ChangeKind.RESCUE,
            ),
            time.monotonic(),
        )
        return new

    # ---- the loop's side --------------------------------------------------------------------

    def due(self, now: float) -> float:
        """Seconds until the next queue sample (or, steady, the next peek)."""
        return max(0.0, min(self.next_sample, self.next_peek) - now)

    def woken(self, now: float) -> None:
        """The loop saw :attr:`wake` readable: idle, a connection was queued on one of the
        TCP listeners. Sample now (the load starts), and start the speeds' window here: the
        trapezoid over the idle interval before would count up to half of it as work."""
        with contextlib.suppress(OSError):
            self.wake.poll(0)
        self.unwatch()
        self.next_sample = self.next_peek = now
        self._fresh = True
        self._woke = now

    def _watch(self) -> None:
        """Idle: the TCP listeners wake the supervisor (:meth:`woken`) at their first
        connection. One-shot: a socket closed while watched (another process may hold it, so
        the epoll keeps it) wakes it once at most."""
        if self._watched:
            return
        for group in self.groups:
            if group.proto is not Proto.TCP:
                continue
            for sock in group.socks.values():
                try:
                    self.wake.register(sock.fileno(), select.EPOLLIN | select.EPOLLONESHOT)
                except OSError:
                    continue
                self._watched.append(sock.fileno())

    def unwatch(self) -> None:
        """Busy (or a listener is about to close): the listeners are not watched."""
        for fd in self._watched:
            with contextlib.suppress(OSError):
                self.wake.unregister(fd)
        self._watched = []

    def peek(self, now: float) -> bool:
        """Steady, between samples (the loop calls it when woken for nothing else): True if
        :meth:`step` should run now, because a sample is due or a peek is and found a slot
        that let nothing go since the last look (a stall beginning, or a worker descheduled:
        then SAMPLE for SUSPECT_FAST, so that the policy sees it as before)."""
        if now >= self.next_sample or not self.steady:
            return True
        if now < self.next_peek:
            return False
        self.next_peek = now + (PEEK_QUIET if self.quiet else PEEK_STEADY)
        if self._peek():
            self.next_sample = now
            self._fast_until = now + SUSPECT_FAST
            return True
        self._waited(now, list(self._waits))  # the next sample's run-queue waits start here
        return False

    def step(self, now: float, slots: Sequence[tuple[int, int | None, Health]]) -> None:
        """The slots' health now; samples the queues when due, updates the kernel if needed."""
        if self.steady and now >= self.next_peek and now < self.next_sample:
            self.peek(now)
        sample = now >= self.next_sample
        if self.frozen and sample:  # the benchmark's frozen policy: health only
            sample = False
            self.next_sample = self.next_peek = now + SAMPLE_QUIET
        seen = tuple(slots)
        if not sample and seen == self._last_health and not self._pending():
            return  # the common case between samples: nothing changed
        changed = seen != self._last_health
        self._last_health = seen
        busy = False
        observations = []
        handed = self.handed() if sample else None
        rows = []
        for slot, pid, health in slots:
            if pid is not None or slot not in self._pids:
                if pid is not None and pid != self._pids.get(slot):
                    # Its /proc fds (_waited) open now, not at its first look, up to 1 s
                    # later on a busy machine: the supervisor's fd count is the same from
                    # the moment a worker is seen (the soak's "fd count flat" counted the
                    # difference as a leak: 3 workers, 37 -> 40 at load 8).
                    self._schedstat.read(pid)
                self._pids[slot] = pid
            pid = self._pids[slot]  # a dead worker's pid names its slot's lines until replaced
            if health is Health.READY:
                self._ever_ready.add(slot)
            queued = count = None
            if sample and health is Health.READY:
                queued = self._queued(slot)
                busy = busy or bool(queued)
            if handed is not None and slot in handed:
                count = handed[slot]
                busy = busy or count != self._handed.get(slot, count)
                self._handed[slot] = count
            if sample and self._writes_queues():
                self._write_queued(slot, queued)
            limited = self._costs.get(slot, UNIT) != UNIT  # the kernel holds it back
            rows.append((slot, pid, health, queued, count, limited))
            self.seen_ready = self.seen_ready or health is Health.READY
        if sample:
            self._expire(now)
        in_flight, counts = self._speed_counts(slots, handed) if sample else (None, None)
        waited = self._waited(now, counts) if counts is not None else {}
        for slot, pid, health, queued, count, limited in rows:
            observations.append(
                Observation(slot, pid, health, queued, count, limited, waited.get(slot, 0.0))
            )
        changes = self.policy.observe(observations)
        looks = max(1.0, (now - self._last_full) / SAMPLE) if self.steady else 1.0
        if counts is not None:
            if self._fresh:
                self.speeds.restart()
            self._weigh_speeds(now, counts, waited, looks)
        self._fresh = self._fresh and not sample
        # A worker came or went (an overload or a stall, frequent, is not: the rules below)
        self._unsettled = self._unsettled or changed or any(not c.kind.frequent for c in changes)
        if sample:
            self._cadence(now, busy, self._unsettled, handed, in_flight)
            self._unsettled = False
        elif self.steady and self._unsettled:  # a worker came or went: look again soon
            self.steady = False
            self.next_sample = self.next_peek = min(self.next_sample, now + SAMPLE)
        for change in changes:
            if change.moves:
                self.changes += 1
            self._say(change, now)
        for limiter in self._limit.values():
            if limiter.pending is not None and now - limiter.last >= LOG_EVERY:
                self._emit(limiter.pending, limiter, now)
        if self.policy.version != self._version:
            self._version = self.policy.version
            for group in self.groups:
                self._install(group)

    def _cadence(
        self,
        now: float,
        busy: bool,
        changed: bool,
        handed: dict[int, int] | None,
        in_flight: dict[int, int] | None,
    ) -> None:
        """When to sample next: every SAMPLE while busy, SAMPLE_IDLE while idle, and once
        normal and even for STEADY_AFTER (since the load started or stopped too), every
        SAMPLE_STEADY busy (peeking every PEEK_STEADY) or SAMPLE_QUIET idle (every SAMPLE_IDLE)."""
        self._last_full = now
        turned, self._was_busy = busy != self._was_busy, busy
        # Settled: nothing learned or held back, for STEADY_AFTER. A slot out for a look or
        # two (an equal worker descheduled: on this machine at 2 workers / 64 in flight, one
        # was out every 0.5 s) does not reset it, but no slower look while one is out.
        verdicts = self.policy.verdicts().values()
        # Idle, nothing is learned (the rates fade) and nothing changes until a connection
        # comes, which a peek sees in the handed counts: with TCP listeners only.
        tcp = any(g.proto is Proto.TCP and g.program is not None for g in self.groups)
        settled = (
            (busy or tcp)
            and not changed
            and not turned
            and in_flight is not None
            and handed is not None
            and not self.policy.fallback
            and all(h is Health.READY for _, _, h in self._last_health)
            and all(v.weight >= 1.0 for v in verdicts)
            and all(word == UNIT for word in self._costs.values())
            and (not busy or self.speeds.even(STEADY_SPREAD))
        )
        if not settled:
            self._steady_since = 0.0
        elif not self._steady_since:
            self._steady_since = now
        self.steady = settled and now - self._steady_since >= STEADY_AFTER
        self.steady = self.steady and now >= self._fast_until and all(v.included for v in verdicts)
        if self.steady and handed is not None and in_flight is not None:
            self._peeked = {s: (handed[s] - n, n) for s, n in in_flight.items() if s in handed}
            self._tcp_programs = [
                g.program for g in self.groups if g.proto is Proto.TCP and g.program is not None
            ]
            self.quiet = not busy
            self.interval = SAMPLE_STEADY if busy else SAMPLE_QUIET
            self.next_sample = now + self.interval
            self.next_peek = now + (PEEK_STEADY if busy else PEEK_QUIET)
        else:
            self.interval = SAMPLE if busy else SAMPLE_IDLE
            self.next_sample = self.next_peek = now + self.interval
        if busy:
            self.unwatch()
        elif now - self._woke >= SAMPLE_IDLE:
            self._watch()

    def _peek(self) -> bool:
        """Did a slot holding connections at the last look and now let none go between (a
        stall beginning, or a worker descheduled)? Quiet: did any connection come? Memory
        reads, no syscall."""
        inflight = self.inflight
        if inflight is None or not inflight.kernel:
            return True
        programs = self._tcp_programs
        suspect = False
        try:
            for slot, (let_go, n) in self._peeked.items():
                handed = 0
                for program in programs:
                    handed += program.handed(slot)
                now_in = max(0, inflight.count(slot))
                if self.quiet and (now_in or handed - now_in != let_go):
                    suspect = True  # the load starts
                elif n and now_in and handed - now_in <= let_go:
                    suspect = True
                self._peeked[slot] = (max(let_go, handed - now_in), now_in)
        except (BpfError, IndexError):
            return True
        return suspect

    def _speed_counts(
        self, slots: Sequence[tuple[int, int | None, Health]], handed: dict[int, int] | None
    ) -> tuple[dict[int, int] | None, dict[int, tuple[int, int]] | None]:
        """The kernel's in-flight counts, and (handed so far, in flight now) of each ready
        slot for speed.py (None without kernel counts); a slot with a new worker starts again
        at a full speed."""
        in_flight = self.in_flight() if handed is not None else None
        if in_flight is None or self.inflight is None or handed is None:
            return None, None
        counts: dict[int, tuple[int, int]] = {}
        for slot, pid, health in slots:
            known = self._speed_pids.get(slot)
            self._speed_pids[slot] = pid
            if health is not Health.READY or slot not in handed or slot not in in_flight:
                continue
            if known is not None and known != pid:
                self.speeds.forget(slot)
            counts[slot] = (handed[slot], in_flight[slot])
        return in_flight, counts

    def _weigh_speeds(
        self,
        now: float,
        counts: dict[int, tuple[int, int]],
        waited: Mapping[int, float],
        looks: float,
    ) -> None:
        """How fast each ready slot serves and its in-flight cap (speed.py), into the kernel's
        cost map."""
        assert self.inflight is not None
        costs = self.speeds.observe(now, counts, waited, looks, self._cpu)
        self._cpu = {}
        for slot in self.policy.stalled():
            if waited.get(slot, 0.0) < WAITED:  # else descheduled, not stalled
                self.speeds.stalled(slot, now)
        caps = self.speeds.caps(now)
        for slot in set(self._costs) | set(costs):
            word = cost_word(costs.get(slot, UNIT), caps.get(slot, 0))
            if self._costs.get(slot, UNIT) != word:
                self.inflight.set_cost(slot, word)
                self._costs[slot] = word

    def _waited(self, now: float, slots: Iterable[int]) -> dict[int, float]:
        """The part of the time since each slot's last read its worker was runnable but
        waiting for a CPU (speed.py, and the policy's stall rule): on a busy machine a worker
        descheduled for a look holds its connections and takes none, as a stalled one does,
        but it is as fast as the rest once it runs. Read at every sample and steady peek, idle
        too (2-3 µs a slot): the first busy look after an idle spell is when a burst finds a
        worker descheduled, and without a read before it that worker was taken for stalled
        (3 of 4 equal workers out, "waited 0.00", 119 of 200 long-lived connections on one)."""
        waited: dict[int, float] = {}
        slots = list(slots)
        self._schedstat.keep({pid for slot in slots if (pid := self._pids.get(slot))})
        for slot in slots:
            pid = self._pids.get(slot)
            now_sched = self._schedstat.read(pid) if pid is not None else None
            before = self._waits.get(slot)
            if now_sched is None or pid is None:
                self._waits.pop(slot, None)
                self._cpu.pop(slot, None)
                continue
            self._waits[slot] = (pid, now_sched, now)
            took = now - before[2] if before is not None else 0.0
            if before is None or before[0] != pid or not 0 < took <= 1.0:
                continue
            # CPU time since the last sample, across steady peeks (speed.py: CPU a completion)
            self._cpu[slot] = self._cpu.get(slot, 0.0) + (now_sched.ran - before[1].ran) / 1e9
            ran = (now_sched.ran - before[1].ran) / 1e9 / took
            part = (now_sched.waited - before[1].waited) / 1e9 / took
            if now_sched.runnable and ran < WAITED:
                part = 1.0  # waiting for a CPU now: schedstat counts it only once it runs
            waited[slot] = min(1.0, max(0.0, part))
        return waited

    def _expire(self, now: float) -> None:
        """Once a second: handshakes that never completed stop counting (inflight.py)."""
        if self.inflight is None or not self.inflight.kernel or now < self._next_expire:
            return
        self._next_expire = now + 1.0
        try:
            if expired := self.inflight.expire(time.monotonic_ns()):
                log.debug("steering: %d handshake(s) never completed; not counted", expired)
        except BpfError as exc:
            log.warning("steering: could not expire stale handshakes: %s", exc)

    def _writes_queues(self) -> bool:
        """eBPF without kernel counts: the program compares the queue depths written here."""
        return self.inflight is not None and not self.inflight.kernel and self.balance != "none"

    def _write_queued(self, slot: int, queued: int | None) -> None:
        """No kernel in-flight counts: the steering program compares queue depths instead."""
        assert self.inflight is not None
        with contextlib.suppress(BpfError):  # else the slot's load is stale until the next one
            self.inflight.write(slot, queued or 0)

    def _pending(self) -> bool:
        return any(limiter.pending is not None for limiter in self._limit.values())

    def _queued(self, slot: int) -> int | None:
        total = 0
        found = False
        for group in self.groups:
            sock = group.socks.get(slot)
            if group.proto is Proto.TCP and sock is not None:
                try:
                    total += tcpinfo.queue_depth(sock).queued
                    found = True
                except (OSError, InspectError):
                    continue
        return total if found else None

    def _install(self, group: _Group) -> None:
        if group.proto is Proto.TCP:
            weights = self.policy.tcp_weights()
        else:
            weights = self.policy.udp_weights()
        weights = {s: w for s, w in weights.items() if s in group.socks}
        if not weights:  # nothing observed yet, or every slot gone: all sockets, equal
            weights = {s: 1.0 for s in group.socks}
        counts = apportion(weights, BUCKETS)
        if counts == group.counts and group.installed is not None:
            return
        group.counts = counts
        if group.proto is Proto.TCP:
            self._shares = {s: c / BUCKETS for s, c in counts.items()}
        # TCP: a new connection may go anywhere, so each slot's buckets are one run (a short
        # classic program, few map writes). UDP: buckets move as little as they can.
        if group.proto is Proto.TCP:
            table = contiguous(counts)
        else:
            group.buckets.assign(counts)
            table = group.buckets.owner
        if group.program is not None:
            if group.program.set_table(table):
                self.updates += 1
                self.exported += group.proto is Proto.UDP  # a TCP table is not exported
            if group.installed is None:
                group.program.attach(group.anchor())
                group.installed = True
            return
        index = {slot: i for i, slot in enumerate(group.order)}
        chain = [(end, index[slot]) for end, slot in runs(table)]
        if chain == group.installed:
            return
        program = cbpf.table_program(chain, BUCKETS, flow_hash=group.proto is Proto.UDP)
        cbpf.attach(group.anchor(), program)
        group.installed = chain
        self.updates += 1
        self.exported += 1  # the listen order may have changed

    # ---- what people see --------------------------------------------------------------------

    def _say(self, change: Change, now: float) -> None:
        if change.kind is ChangeKind.ALL_OUT and not self.seen_ready:
            return  # booting: no worker is ready yet, nothing to say
        if change.slot >= 0 and change.slot not in self._ever_ready:
            log.debug(  # booting
                "slot %d: steering: %s", change.slot, change.text, extra={"slot": change.slot}
            )
            return
        if not change.kind.frequent:
            self._emit(change, None, now)
            return
        limiter = self._limit.setdefault(change.slot, _Limiter())
        if now - limiter.last >= LOG_EVERY:
            self._emit(change, limiter, now)
        else:
            limiter.pending = change
            limiter.held += 1

    def _emit(self, change: Change, limiter: _Limiter | None, now: float) -> None:
        text = change.text
        if limiter is not None:
            if limiter.held > 1:
                text += f" ({limiter.held} steering changes in the last {LOG_EVERY:g}s)"
            limiter.last, limiter.pending, limiter.held = now, None, 0
        level = logging.WARNING if change.warn else logging.INFO
        if change.slot < 0:
            log.log(level, "steering: %s", text)
        else:
            pid = change.pid if change.pid is not None else "-"
            fields = {"slot": change.slot, "pid": change.pid}
            log.log(level, "slot %d pid %s: steering: %s", change.slot, pid, text, extra=fields)
        if self.on_event is not None:
            who = f"slot {change.slot}: " if change.slot >= 0 else ""
            self.on_event(f"{who}{text}")

    def slot_status(self, slot: int) -> dict[str, Any]:
        verdict = self.policy.verdicts().get(slot)
        if verdict is None:
            return {"excluded": False, "reason": None, "weight": 1.0, "share": None}
        out: dict[str, Any] = {
            "excluded": not verdict.included,
            "reason": verdict.reason,
            "weight": round(verdict.weight, 3),
            "share": round(self._shares.get(slot, 0.0), 4),
        }
        if self.inflight is not None and self.inflight.kernel:
            # How much slower than the fastest it serves (1.0: as fast; speed.py), and the
            # connections in flight it may hold (0: no cap; a worker caught stalling).
            cost, cap = split_word(self._costs.get(slot, UNIT))
            out["slower"] = round(cost / UNIT, 2)
            out["cap"] = cap
        if any(g.proto is Proto.UDP for g in self.groups):
            out["udp"] = verdict.udp_included
        return out

    def handed(self) -> dict[int, int] | None:
        """New TCP connections handed to each slot since steering started, counted by the eBPF
        program (None under classic BPF: it cannot count). A slot's count survives the
        replacement of its listener (the counter is keyed by slot)."""
        if self.backend != "ebpf":
            return None
        totals: dict[int, int] = {}
        for group in self.groups:
            if group.proto is not Proto.TCP or group.program is None:
                continue
            for slot in group.socks:
                try:
                    totals[slot] = totals.get(slot, 0) + group.program.handed(slot)
                except BpfError:
                    continue  # should not happen; the rate is simply unknown this second
        return totals

    def in_flight(self) -> dict[int, int] | None:
        """Connections in flight per slot (queued + held by its worker and its children),
        counted in the kernel (inflight.py): None where it cannot count (classic BPF, or no
        SOCK_OPS attach point). Costs one map read per slot, whatever the connections."""
        if self.inflight is None or not self.inflight.kernel:
            return None
        slots = {slot for group in self.groups for slot in group.socks}
        try:
            return {slot: max(0, n) for slot, n in self.inflight.counts(sorted(slots)).items()}
        except BpfError:
            return None

    def in_flight_source(self) -> str:
        """What the kernel program compares, in words (status, doctor)."""
        if self.inflight is None:
            return "none: classic BPF cannot read per-slot counts (random pick from the table)"
        if self.inflight.kernel:
            return (
                "connections in flight, counted by a SOCK_OPS program (two choices) on "
                + self.inflight.reach
            )
        if self.balance == "none":
            return "none (PORTSHARD_BALANCE=none): a random pick from the table"
        return f"queue depths written every sample (two choices); {self.inflight.why}"

    def status(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "why": self.why,
            "balance": self.in_flight_source(),
            "migrate": self.can_migrate(),
            "sample_ms": round(self.interval * 1000),
            "changes": self.changes,
            "updates": self.updates,
            "fallback": self.policy.fallback or None,
        }
