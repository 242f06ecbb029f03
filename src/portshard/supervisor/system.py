"""The real effects layer: processes, sockets, the kernel, steering, systemd, the control socket.

Implements ``effects.Effects`` for the supervisor; the lifecycle (``fleet.py``,
``procedures.py``) decides and this carries out. Tests swap in a fake.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..address import Address, Proto, parse
from ..control.server import Connection, ControlServer
from ..errors import InspectError, PortshardError, SupervisorError
from ..interpose.plan import plan as interpose_plan
from ..interpose.seccomp import Trap
from ..linux import proc, sockdiag, tcpinfo
from ..linux.cgroup import Trees, made_in
from ..linux.proc import tree_stopped
from ..linux.sockdiag import held_connections
from ..linux.waiting import tree_idle_for_datagrams, tree_waiting_for_work, tree_waits_in_epoll
from ..sockets import listen
from ..steering import cbpf
from ..steering.controller import Health, Steering
from .config import Config
from .handoff import slot_keys
from .output import Pipes, WorkerOutput
from .spawn import SpawnSpec, spawn
from .state import State
from .systemd import Activated, Notifier, address_of, store_name
from .worker import TREE_ENV, Slot, Worker, tree_token

if TYPE_CHECKING:
    from .fleet import Fleet
    from .wardenlink import WardenLink

log = logging.getLogger("portshard.supervisor")

__all__ = ["HANDOVER_MAX", "SystemEffects", "expand_placeholders"]

HANDOVER_MAX = 1.0  # seconds a reloading slot may stay out for new TCP connections


class SystemEffects:
    """What the supervisor does to the world. ``fleet`` is set once the fleet exists."""

    fleet: Fleet

    def __init__(
        self,
        selector: selectors.BaseSelector,
        activated: Activated | None = None,
        *,
        capture_output: bool = False,
    ) -> None:
        self.sel = selector
        # --log-format json: the workers' stdout/stderr come back as log records
        self.output = WorkerOutput(selector) if capture_output else None
        self.activated = activated
        self.systemd = Notifier()  # takes NOTIFY_SOCKET out of the workers' environment
        self.held: set[int] = set()  # fds of sockets systemd holds too (they outlive us)
        self.bound: list[Address] = []  # each listen spec's concrete address (port 0 resolved)
        self.steering: Steering | None = None
        self.control: ControlServer | None = None
        self.trees: Trees | None = None  # a cgroup per worker, or the subreaper fallback
        self.notify_name = ""  # the abstract address of the workers' NOTIFY_SOCKET
        self.warden: WardenLink | None = None  # the process that outlives us (issue 15)
        # The warden gets the manifest at this turn's end, not up to SYNC_EVERY later: a slot
        # socket was replaced or closed (it lets go of its copy), or a worker was spawned (an
        # adopter must know it: handoff.adopt_unrecorded).
        self.sync_now = False
        self.blocking_loop_said = False  # _warn_blocking_loop, once
        self.blind: set[int] = set()  # workers whose tree we could not look into, said once
        # A UDP worker being frozen: datagrams delivered in its netns when the freeze began,
        # then whether any was delivered until its tree had stopped (``_holds_datagrams``).
        self.freezing_udp: dict[int, int] = {}
        self.udp_moved: dict[int, bool] = {}
        self.filter_refused: str | None = None  # why the kernel refuses a socket filter ("": not)

    @property
    def cfg(self) -> Config:
        return self.fleet.cfg

    def now(self) -> float:
        return time.monotonic()

    @property
    def owns_sockets(self) -> bool:
        """False with --via reuseport: each worker binds its own socket, slots hold none."""
        return self.cfg.via != "reuseport"

    def tcp_ports(self) -> set[int]:
        """The served TCP ports (port 0 resolved)."""
        return {a.port for a in self.bound if a.proto is Proto.TCP}

    # ---- processes --------------------------------------------------------------------------

    def spawn(self, slot: Slot, role: str, cfg: Config, generation: int) -> Worker:
        env = dict(os.environ)
        env.update(cfg.env)
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET"):
            env.pop(key, None)
        env["PORTSHARD_SLOT"] = str(slot.index)
        env["PORTSHARD_WORKERS"] = str(cfg.workers)
        if cfg.ready.kind == "notify":
            env["NOTIFY_SOCKET"] = "@" + self.notify_name[1:]
        names = [spec.name for spec in cfg.listen]
        ports = [addr.port for addr in self.bound]
        argv = [expand_placeholders(arg, names, ports) for arg in cfg.command]
        creds = cfg.credentials()
        try:
            via = interpose_plan(
                cfg.via,
                argv,
                env,
                inodes=[os.fstat(s.fileno()).st_ino for s in slot.socks],
                ports=ports,
                uid=creds.uid if creds is not None else None,
            )
        except PortshardError as exc:
            raise SupervisorError(str(exc)) from None
        group = self.trees.create(f"slot{slot.index}") if self.trees else None
        token = None
        if group is None:  # no cgroup names its tree: its environment does (an adopter's)
            token = env[TREE_ENV] = tree_token(self.notify_name, slot.index)
        fds = [s.fileno() for s in slot.socks]
        if cfg.nonblocking:  # on the shared file description: what the worker inherits
            for fd in fds:
                os.set_blocking(fd, False)
        pipes = Pipes.create() if self.output is not None else None
        stdio = (pipes.stdout_w, pipes.stderr_w) if pipes is not None else None
        try:
            spawned = spawn(
                SpawnSpec(
                    argv,
                    env,
                    fds,
                    names,
                    creds,
                    seccomp=via.seccomp,
                    cgroup=group,
                    stdio=stdio,
                    # With a warden, a worker outlives a supervisor that dies (issue 15)
                    orphan=self.orphans_kept(cfg, slot),
                )
            )
        except SupervisorError:
            if pipes is not None:
                pipes.close_all()
            if self.trees is not None:
                self.trees.release(group)
            raise
        if pipes is not None and self.output is not None:
            pipes.close_child_ends()
            self.output.watch(pipes, slot.index, spawned.pid)
        w = Worker(slot, spawned.pid, spawned.pidfd, generation, role, self.now())
        w.mode = via.mode
        w.cgroup = group
        w.token = token
        self.watch_exit(w)
        self.sync_now = True
        if spawned.listener is not None:
            self._watch_trap(w, spawned.listener, via.reuseport)
        log.log(
            logging.WARNING if via.warn else logging.INFO,
            "slot %d pid %d: started (%s, generation %d, via %s: %s)",
            slot.index,
            w.pid,
            role,
            generation,
            via.mode,
            via.why,
            extra=w.fields,
        )
        return w

    def watch_exit(self, w: Worker) -> None:
        """Its pidfd in the selector: readable once it exits (a child or not: issue 15)."""
        self.sel.register(w.pidfd, selectors.EVENT_READ, lambda _m: self.fleet.on_exit(w))

    def _watch_trap(self, w: Worker, listener: int, reuseport: bool) -> None:
        """Answer the worker's bind() calls from the selector (--via seccomp; with
        ``reuseport``, only set SO_REUSEPORT on the program's own socket)."""
        ports = frozenset(a.port for a in self.bound) if reuseport else None
        trap = Trap(
            listener, w.slot.socks, label=f"slot {w.slot.index} pid {w.pid}", reuseport=ports
        )
        w.trap = trap

        def on_trap(_mask: int) -> None:
            if not trap.on_readable():  # every process that used the filter has exited
                self.sel.unregister(trap.listener)
                trap.close()

        self.sel.register(listener, selectors.EVENT_READ, on_trap)

    def orphans_kept(self, cfg: Config, slot: Slot) -> bool:
        """Workers outlive a supervisor that dies (no parent-death signal): only while a
        warden holds what they and a successor need, and --orphan-timeout is not 0. A warden
        lost since the last turn is started again first, and one that does not hold
        ``slot``'s sockets yet (a scale up's) gets them now (``WardenLink.revive``)."""
        if cfg.orphan_timeout <= 0 or self.warden is None:
            return False
        return self.warden.revive(self.now(), slot_keys(slot))

    def signal(self, w: Worker, sig: int) -> None:
        if sig == signal.SIGSTOP and any(s.type == socket.SOCK_DGRAM for s in w.slot.socks):
            before = proc.udp_delivered(w.pid)
            if before is not None:
                self.freezing_udp[w.pid] = before
        w.signal(sig)

    def reap(self, w: Worker) -> None:
        self.blind.discard(w.pid)
        self.freezing_udp.pop(w.pid, None)
        self.udp_moved.pop(w.pid, None)
        if w.pidfd >= 0:
            self.sel.unregister(w.pidfd)
        w.reap()
        if self.trees is not None:
            self.trees.release(w.cgroup)  # what is left in its cgroup is killed; it goes
            self.trees.reap_orphans({o.pid for s in self.fleet.slots for o in s.workers})

    def is_ready(self, w: Worker, now: float) -> bool:
        mode = w.slot.cfg.ready
        if mode.kind == "delay":
            return now - w.started >= mode.seconds
        if mode.kind == "accept":
            # Waiting for work on its socket, or already serving: under a saturating load the
            # queue never empties, so a worker that accepts at once never waits, but it holds
            # a connection it accepted (it inherited none).
            try:
                inodes = self.listeners_of(w)
                members = w.cgroup.members() if w.cgroup is not None else None
                return tree_waiting_for_work(
                    w.pid, inodes, ports=self.tcp_ports(), members=members, seen=w.not_held
                )
            except (OSError, InspectError):
                return False  # not visible (yet): ask again on the next tick
        return False  # notify: an event from the notify socket

    def became_ready(self, w: Worker) -> None:
        """Says once if the worker's event loop waits on a blocking socket (below); and a
        program under --via seccomp called listen() on the slot's socket for real (only
        bind() is trapped), which set its own backlog (e.g. 128): put ours back."""
        self._warn_blocking_loop(w)
        if w.trap is None:
            return
        for sock in w.slot.queue_fds():
            try:
                sock.listen(w.slot.cfg.backlog)
            except OSError as exc:
                log.warning(
                    "slot %d: cannot restore the backlog: %s",
                    w.slot.index,
                    exc,
                    extra={"slot": w.slot.index},
                )

    def _warn_blocking_loop(self, w: Worker) -> None:
        """An event loop (epoll) waiting on a slot's socket that is blocking (as --via fds
        hands it over, systemd's way) accepts until EAGAIN and blocks in accept() instead: it
        stops answering while it counts as ready. Said once per supervisor, with the fix."""
        if self.blocking_loop_said or not self.owns_sockets:
            return
        blocking = {s for s in w.slot.socks if os.get_blocking(s.fileno())}
        try:
            members = w.cgroup.members() if w.cgroup is not None else None
            found = tree_waits_in_epoll(w.pid, tcpinfo.socket_inodes(blocking), members=members)
        except (OSError, InspectError):
            return
        if found:
            self.blocking_loop_said = True
            log.warning(
                "slot %d pid %d: waits for its socket with epoll (an event loop), but the "
                "socket is blocking, as systemd hands sockets over: a loop that accepts until "
                "EAGAIN (tornado, gevent, nginx) blocks in accept() and stops answering; use "
                "--nonblocking, or make the socket non-blocking in the program "
                "(sock.setblocking(False))",
                w.slot.index,
                w.pid,
                extra=w.fields,
            )

    def listeners_of(self, w: Worker) -> set[int]:
        """Inodes of the listening sockets ``w`` serves: its slot's, or (--via reuseport) the
        ones it bound itself."""
        if self.owns_sockets:
            return tcpinfo.socket_inodes(w.slot.socks)
        try:  # only the served ports: a program may listen elsewhere first (an admin port)
            return sockdiag.listening_sockets_of(w.pid, ports={a.port for a in self.bound})
        except (OSError, InspectError):
            return set()  # not visible now: nothing counts as its listener this time

    def tree_stopped(self, w: Worker, spin: float) -> bool:
        """Its whole tree is stopped; ``spin``: wait that long inline for it (a freeze should
        be short: its request in hand waits)."""
        until = time.monotonic() + spin
        while not tree_stopped(w.pid, w.cgroup):
            if time.monotonic() >= until:
                return False
            time.sleep(0.0002)
        before = self.freezing_udp.pop(w.pid, None)
        if before is not None:  # at once: other workers' receives count too from now on
            self.udp_moved[w.pid] = proc.udp_delivered(w.pid) != before
        return True

    def holds_connections(self, w: Worker) -> bool:
        """True also when we cannot tell (EMFILE, an unreadable /proc): then the drain thaws
        it and looks again, and after --grace falls back to the stop signal."""
        try:
            ports = self.tcp_ports()
            held = held_connections(w.pid, self.listeners_of(w), ports, w.cgroup, w.not_held)
            return held > 0 or self._holds_datagrams(w)
        except (OSError, InspectError) as exc:
            if w.pid not in self.blind:  # once: a freeze-check looks every 20 ms until --grace
                self.blind.add(w.pid)
                log.warning(
                    "slot %d pid %d: cannot see what it holds (%s); assuming it holds a "
                    "connection (until --grace at most)",
                    w.slot.index,
                    w.pid,
                    exc,
                    extra=w.fields,
                )
            return True

    def _holds_datagrams(self, w: Worker) -> bool:
        """The frozen tree may hold a datagram it read and has not answered: a thread of it
        is not stopped waiting for one (``tree_idle_for_datagrams``). Without it, an idle
        UDP worker was killed with whatever it held (1 datagram in 2.5k during reloads)."""
        datagram = [s for s in w.slot.socks if s.type == socket.SOCK_DGRAM]
        if not datagram:
            return False
        if self.udp_moved.pop(w.pid, False):
            # A thread woken by the freeze while in recvfrom takes a datagram that arrived
            # before it ran, then stops on its way out: /proc shows it in recvfrom all the
            # same (the return value is not there). The netns's count tells: it moved.
            return True
        members = w.cgroup.members() if w.cgroup is not None else None
        return not tree_idle_for_datagrams(w.pid, tcpinfo.socket_inodes(datagram), members=members)

    # ---- sockets ----------------------------------------------------------------------------

    def open_slot(self, index: int) -> list[socket.socket]:
        if not self.owns_sockets:  # each copy binds its own (ports checked by config)
            if self.activated:
                raise SupervisorError(
                    "--via reuseport cannot use sockets from systemd socket activation: each "
                    "copy binds its own; use --via auto"
                )
            self.bound = [spec.address for spec in self.cfg.listen]
            return []
        socks: list[socket.socket] = []
        try:
            for i, spec in enumerate(self.cfg.listen):
                addr = self.bound[i] if i < len(self.bound) else spec.address
                passed = self.activated.take(spec.name, addr, index) if self.activated else None
                if passed is not None:
                    sock = passed
                    self.held.add(sock.fileno())
                    if i >= len(self.bound):  # the other slots copy its exact address
                        self.bound.append(parse(address_of(sock)))
                else:  # made in our listen group: SOCK_OPS sees only these (inflight.py)
                    with made_in(self.trees.listen_group() if self.trees else None):
                        sock = listen(addr, backlog=self.cfg.backlog)
                if i >= len(self.bound):
                    port = sock.getsockname()[1]
                    self.bound.append(Address(addr.proto, addr.host, port))
                socks.append(sock)
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        return socks

    def close_slot(self, slot: Slot) -> None:
        # Its TCP sockets leave the port's group now, not when the warden's copy goes: still
        # in it, they took connections nobody would accept (16 in ~1,000 requests of a 4 -> 2
        # scale with steering off). Only now: a stopped listener has no queue to read.
        if self.steering is not None:
            self.steering.unwatch()  # an epoll keeps a closed socket another process holds
        for sock in slot.queue_fds():
            if sock.fileno() not in self.held:  # systemd's: it keeps listening on them
                tcpinfo.stop_listening(sock)
        for spec, sock in zip(self.cfg.listen, slot.socks, strict=self.owns_sockets):
            self.systemd.unstore(store_name(spec.name, slot.index))
            self.held.discard(sock.fileno())
            sock.close()
        self.sync_now = True  # a UDP socket cannot be stopped: the warden lets go at once
        if self.steering is not None:
            self.steering.remove_slot(slot.index)

    def steers(self) -> bool:
        return self.steering is not None

    def shielded(self, slot: Slot) -> bool:
        if self.fleet.stopping:
            return True  # the stop drops new SYNs on every slot socket
        steering = self.steering
        return steering is not None and bool(steering.slot_status(slot.index)["excluded"])

    def queue_empty(self, slot: Slot) -> bool:
        return not any(tcpinfo.queue_depth(sock).queued for sock in slot.queue_fds())

    def can_hold(self, slot: Slot) -> bool:
        if not self.owns_sockets or not slot.socks:
            return False
        if not all(spec.address.proto is Proto.TCP for spec in self.cfg.listen):
            return False
        return self._filter_allowed()

    def _filter_allowed(self) -> bool:
        """The kernel lets us attach a socket filter (a hold's SYN drop). This one refuses it
        (EPERM) to a process without CAP_NET_ADMIN, root without it too, and the hold raised
        out of every handover at one slot or with steering off: a traceback per reload and the
        old worker killed as an internal error. Probed once, on a socket of no group."""
        if self.filter_refused is None:
            refused = cbpf.drop_syns_refused()
            self.filter_refused = "" if refused is None else refused.strerror or str(refused)
            if refused is not None:
                log.warning(
                    "cannot hold new connections off a slot while its old worker stops "
                    "(SO_ATTACH_FILTER: %s; this kernel wants CAP_NET_ADMIN): with one slot or "
                    "--steering off, an idle old worker is killed frozen at a handover instead "
                    "(nothing lost; its shutdown does not run); for its graceful stop give "
                    "portshard CAP_NET_ADMIN (systemd: AmbientCapabilities=CAP_NET_ADMIN)",
                    self.filter_refused,
                )
        return not self.filter_refused

    def hold(self, slot: Slot, on: bool) -> None:
        if not on and self.fleet.stopping:
            return  # the stop's filter (the same program) stays
        if not on and slot.removing and not any(self.tree_listens(w) for w in slot.live()):
            # Nobody accepts from it again: it drops SYNs (retried in 1 s) until close_slot
            # takes it out of the group. A worker that still listens (it ignores its stop
            # signal) serves on until --grace, as on any slot.
            return
        for sock in slot.queue_fds():
            if on:
                cbpf.drop_syns(sock)
            else:
                cbpf.undrop_syns(sock)

    def tree_listens(self, w: Worker) -> bool:
        inodes = tcpinfo.socket_inodes(w.slot.socks)
        try:
            members = w.cgroup.members() if w.cgroup is not None else None
            pids = proc.process_tree(w.pid) if members is None else members
            return any(not inodes.isdisjoint(proc.sockets_of(pid)) for pid in pids)
        except (OSError, InspectError):
            return True  # cannot tell: it may still accept

    def drop_syns(self) -> list[socket.socket]:
        closing = [
            sock
            for slot in self.fleet.slots
            for sock, spec in zip(slot.socks, self.cfg.listen, strict=self.owns_sockets)
            if spec.address.proto is Proto.TCP and sock.fileno() not in self.held
        ]
        refused: OSError | None = None
        for sock in closing:
            try:
                cbpf.drop_syns(sock)
            except OSError as exc:  # seen: EPERM for a user without root on this kernel
                refused = exc
        if refused is not None:
            log.warning(
                "stop: cannot make the sockets refuse new connections (SO_ATTACH_FILTER: %s); "
                "the workers empty the queues and are retired, and a connection that arrives "
                "after that is reset when the sockets close (CAP_NET_ADMIN lets portshard "
                "refuse them)",
                refused.strerror or refused,
            )
        return closing

    def queues_empty(self, socks: list[socket.socket]) -> bool:
        return all(tcpinfo.queue_depth(sock).queued == 0 for sock in socks)

    def store(self, slots: list[Slot]) -> None:
        """Give systemd a copy of each slot socket it doesn't hold yet (kept across restarts
        when the unit has FileDescriptorStoreMax=; ignored otherwise)."""
        if not self.systemd:
            return
        if not self.owns_sockets:
            return  # --via reuseport: the programs own their sockets
        for slot in slots:
            for spec, sock in zip(self.cfg.listen, slot.socks, strict=True):
                if sock.fileno() not in self.held:
                    self.systemd.store(store_name(spec.name, slot.index), sock)
                    if self.systemd.store_known:  # it will outlive us: leave its queue be
                        self.held.add(sock.fileno())

    # ---- steering ---------------------------------------------------------------------------

    def health(self, slot: Slot) -> Health:
        if slot.removing:
            return Health.REMOVING
        live = slot.live()
        states = {w.state for w in live}
        if State.READY in states:
            # Out for new TCP connections while an old worker goes, so that its queue empties
            # and the freeze-check catches it idle; while draining at most HANDOVER_MAX s: an
            # old worker that holds long-lived connections is not caught idle anyway (it waits
            # for --grace), and meanwhile its slot's new worker should serve. One that was found
            # idle and given its stop signal keeps the slot out until it exits (it holds
            # nothing, and its shutdown is short): a server that handles the signal may still
            # accept what reaches the shared socket before it stops listening, and close it
            # unread (aiohttp: measured, 3 empty replies in 8.5k requests over 3 reloads).
            now = self.now()
            retiring = any(
                (w.state is State.STOPPING and w.life.shutting_down)
                or (
                    w.state in (State.DRAINING, State.STOPPING)
                    and now - (w.life.retired_at or now) < HANDOVER_MAX
                )
                for w in live
            )
            return Health.HANDOVER if retiring else Health.READY
        if State.DRAINING in states or State.STOPPING in states:
            return Health.DRAINING
        if State.STARTING in states:
            return Health.STARTING
        return Health.DOWN

    def steer(self) -> None:
        """Tell steering each slot's health (every turn of the loop: a dead or ready worker
        changes the table at once); it samples the queues itself when due."""
        if self.steering is None or self.fleet.stopping:
            return
        views = []
        for slot in self.fleet.slots:
            w = slot.serving()
            views.append((slot.index, w.pid if w else None, self.health(slot)))
        self.steering.step(self.now(), views)

    def add_to_steering(self, slot: Slot) -> None:
        if self.steering is not None:
            self.steering.add_slot(slot.index, slot.socks)

    def first_k(self, count: int) -> None:
        if self.steering is not None:
            self.steer()
        elif self.owns_sockets:
            for i, spec in enumerate(self.cfg.listen):
                if spec.address.proto is Proto.TCP:
                    cbpf.attach_first_k(self.fleet.slots[0].socks[i], count)

    def all_slots(self) -> None:
        if self.steering is None and self.owns_sockets:
            for i, spec in enumerate(self.cfg.listen):
                if spec.address.proto is Proto.TCP:
                    cbpf.detach(self.fleet.slots[0].socks[i])

    def rescue(self, slot: Slot, pid: int) -> None:
        """A slot lost its only worker: take it out of the table now and, where the kernel can
        migrate a closing listener's queue, replace its listener so that the connections
        queued on it go to the other slots instead of waiting for the replacement."""
        if self.steering is None:
            return
        self.steer()
        if self.systemd:
            return  # systemd may hold a copy of the socket: closing ours would not close it
        fields = {"slot": slot.index, "pid": pid}
        for i, spec in enumerate(self.cfg.listen):
            old = slot.socks[i]
            if spec.address.proto is not Proto.TCP or old.fileno() in self.held:
                continue
            if not self.steering.can_migrate():
                queued = tcpinfo.queue_depth(old).queued
                if queued:
                    log.warning(
                        "slot %d pid %d: %d connection(s) queued on its socket wait for the "
                        "replacement (no migration: tcp_migrate_req=0 and no eBPF steering)",
                        slot.index,
                        pid,
                        queued,
                        extra=fields,
                    )
                continue
            try:
                new = self.steering.rescue(slot.index, i, old, self.cfg.backlog)
            except OSError as exc:
                log.warning(
                    "slot %d pid %d: could not replace its listener to hand its queue over "
                    "(%s); its queued connections wait for the replacement",
                    slot.index,
                    pid,
                    exc.strerror or exc,
                    extra=fields,
                )
                continue
            if new is not None:
                slot.socks[i] = new
                self.sync_now = True

    # ---- systemd and the control socket -----------------------------------------------------

    def notify(self, what: str, text: str = "") -> None:
        if what == "ready":
            self.systemd.ready(text)
        elif what == "reloading":
            self.systemd.reloading()
        elif what == "stopping":
            self.systemd.stopping()
        else:
            raise ValueError(f"sd_notify {what!r}: use ready, reloading or stopping")

    def reply(self, conn: Connection, data: bytes) -> None:
        if self.control is not None:
            self.control.reply(conn, data)

    def clients_gone(self, conns: list[Connection]) -> bool:
        return not any(c.pid is not None and proc.alive(c.pid) for c in conns)


def expand_placeholders(arg: str, names: list[str], ports: Sequence[int] = ()) -> str:
    """``{fd}`` is the first socket's fd; ``{fd:NAME}`` the fd of the listen address NAME;
    ``{port}`` and ``{port:NAME}`` the actual port (after port 0 was resolved), for programs
    that bind the port themselves (--via preload/seccomp)."""
    if "{fd" not in arg and "{port" not in arg:
        return arg
    out = arg.replace("{fd}", "3")
    if ports:
        out = out.replace("{port}", str(ports[0]))
    for i, name in enumerate(names):
        out = out.replace("{fd:" + name + "}", str(3 + i))
        if i < len(ports):
            out = out.replace("{port:" + name + "}", str(ports[i]))
    if "{fd:" in out or "{port:" in out:
        raise SupervisorError(
            f"argument {arg!r} names a listen address that does not exist; "
            f"known: {', '.join(names)}"
        )
    return out
