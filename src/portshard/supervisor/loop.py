"""The supervisor: owns one socket per slot per address, runs a worker on each slot.

Invariants:
- A slot's sockets are opened once and stay open for the slot's whole life; every
  incarnation of the slot's worker gets the same sockets. So a crash, restart or reload never
  resets a queued connection or moves a UDP flow.
- During a reload a slot has at most two workers, and the old one is drained only after the
  new one is ready.
- One thread. Signal handlers do nothing; signals arrive as bytes on the wakeup fd. Long
  procedures (reload, scale, stop, drain) are generators that yield ``Until`` conditions,
  stepped by the loop on every event and tick.
"""

from __future__ import annotations

import array
import logging
import os
import selectors
import signal
import socket
import struct
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import inspect
from ..address import Address, Proto, parse
from ..control import protocol
from ..control.server import Connection, ControlServer, default_path
from ..errors import ControlError, PortshardError, SupervisorError
from ..interpose.plan import plan as interpose_plan
from ..interpose.seccomp import Trap
from ..sockets import listen
from ..steering import cbpf
from ..steering.controller import Health, Steering, migrate_req
from ..steering.held import HeldWalk
from .config import Config, reloaded
from .history import History, listen_drop_counters
from .spawn import SpawnSpec, spawn
from .state import Backoff, Event, Lifecycle, State
from .systemd import Activated, Notifier, address_of, store_name
from .web import WebServer, parse_metrics_address

log = logging.getLogger("portshard.supervisor")

__all__ = ["Supervisor"]

TICK = 0.02  # how often conditions are re-checked while something is in progress


@dataclass
class Until:
    """A task waits until ``cond()`` is true (sends True) or ``deadline`` passes (sends False)."""

    cond: Callable[[], bool]
    deadline: float | None = None


Task = Generator[Until, bool, None]

HANDOVER_MAX = 1.0  # seconds a reloading slot may stay out for new TCP connections


@dataclass
class Outcome:
    """The result of a reload or scale, for a deferred control reply."""

    ok: bool = True
    error: str = ""
    done: bool = False
    waiters: list[Connection] = field(default_factory=list)


class Worker:
    def __init__(self, slot: Slot, pid: int, pidfd: int, generation: int, role: str, now: float):
        self.slot = slot
        self.pid = pid
        self.pidfd = pidfd
        self.generation = generation
        self.role = role  # boot | respawn | reload | scale
        self.life = Lifecycle()
        self.started = now
        self.ready_at: float | None = None
        self.deliberate = False  # we are stopping it (drain, stop): its exit is expected
        self.kill_at: float | None = None
        self.status: int | None = None
        self.mode = "fds"  # how it got its sockets (--via), for status
        self.trap: Trap | None = None  # its seccomp bind() trap (--via seccomp)
        self.retiring_since: float | None = None  # when _drain began to retire it

    @property
    def state(self) -> State:
        return self.life.state

    def describe_exit(self) -> str:
        status = self.status
        if status is None:
            return "still running"
        if os.WIFSIGNALED(status):
            return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
        return f"exit status {os.WEXITSTATUS(status)}"


class Slot:
    def __init__(self, index: int, socks: list[socket.socket], cfg: Config):
        self.index = index
        self.socks = socks
        self.cfg = cfg  # the settings its current generation runs with
        self.generation = 0
        self.workers: list[Worker] = []
        self.restarts = 0
        self.backoff = Backoff()
        self.respawn_at: float | None = None
        self.removing = False

    def live(self) -> list[Worker]:
        return [w for w in self.workers if w.life.alive]

    def serving(self) -> Worker | None:
        live = self.live()
        for wanted in (State.READY, State.STARTING, State.DRAINING, State.STOPPING):
            for w in reversed(live):
                if w.state is wanted:
                    return w
        return None


class Supervisor:
    def __init__(
        self, cfg: Config, cli: dict[str, Any], activated: Activated | None = None
    ) -> None:
        self.cfg = cfg
        self.cli = cli
        self.activated = activated
        self.systemd = Notifier()  # takes NOTIFY_SOCKET out of the workers' environment
        self.history = History()
        self.web: WebServer | None = None
        self._next_sample = 0.0
        self._connections: dict[int, int | None] = {}  # slot -> connections, last sample
        self._handed: tuple[float, dict[int, int]] | None = None  # eBPF counters, last sample
        self._new_per_s: dict[int, float] = {}  # slot -> new connections/s, last second
        self._held_walk = HeldWalk()  # per-connection counts: less often as they grow
        self.steering: Steering | None = None  # which slots get new connections (issue 5)
        self.held: set[int] = set()  # fds of sockets systemd holds too (they outlive us)
        self.sel = selectors.DefaultSelector()
        self.slots: list[Slot] = []
        self.bound: list[Address] = []  # each listen spec's concrete address (port 0 resolved)
        self.tasks: list[tuple[Task, Until]] = []
        self.reloads = {"ok": 0, "failed": 0}
        self.stopping = False
        self.busy: str | None = None  # "reload" or "scale" while one runs
        self.started_up = False
        self.fatal: str | None = None
        self.exit_code: int | None = None
        self.generation = 0
        self.started = time.monotonic()
        self.control: ControlServer | None = None
        self.on_ready: Callable[[Supervisor], None] | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._notify_name = ""
        self._old_handlers: dict[int, Any] = {}

    # ---- set-up and tear-down -------------------------------------------------------------

    def _open_slot_sockets(self, index: int) -> list[socket.socket]:
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
                else:
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

    def _setup(self) -> None:
        for i in range(self.cfg.workers):
            self.slots.append(Slot(i, self._open_slot_sockets(i), self.cfg))
        if self.activated:
            self.activated.close_unused()
        self._setup_steering()
        path = self.cfg.control or default_path(self.cfg.name)
        self.control = ControlServer(
            path, self.sel, self._on_request, private_dir=self.cfg.control is None
        )
        if self.cfg.metrics:
            self.web = WebServer(
                parse_metrics_address(self.cfg.metrics),
                self.sel,
                self.status,
                self.history.to_json,
            )
            log.info("metrics on %s/metrics, dashboard on %s/", self.web.url, self.web.url)
        self._notify_name = f"\0portshard/{os.getpid()}/{os.urandom(6).hex()}"
        self._notify.bind(self._notify_name)
        self._notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._notify.setblocking(False)
        self.sel.register(self._notify, selectors.EVENT_READ, self._on_notify)
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._on_wakeup)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
            self._old_handlers[sig] = signal.signal(sig, lambda _s, _f: None)
        log.info(
            "listening on %s with %d workers; control socket %s",
            ", ".join(str(a) for a in self.bound),
            len(self.slots),
            path,
        )

    def _teardown(self) -> None:
        signal.set_wakeup_fd(-1)
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        if self.control is not None:
            self.control.shutdown()
        if self.web is not None:
            self.web.close()
        if self.steering is not None:
            self.steering.close()
        for slot in self.slots:
            for sock in slot.socks:
                sock.close()
        for s in (self._notify, self._wake_r, self._wake_w):
            s.close()
        self.sel.close()

    # ---- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped; return the exit code (0 after a requested stop)."""
        try:
            self._setup()
            self.start_task(self._boot_task())
            while self.exit_code is None:
                timeout = self._timeout()
                for key, mask in self.sel.select(timeout):
                    key.data(mask)
                self._tick()
        except BaseException:
            self._kill_all()
            raise
        finally:
            self._teardown()
        return self.exit_code

    def _timeout(self) -> float:
        now = time.monotonic()
        deadlines = [w.kill_at for s in self.slots for w in s.workers if w.kill_at]
        deadlines += [s.respawn_at for s in self.slots if s.respawn_at is not None]
        busy = self.tasks or any(
            w.state is State.STARTING and w.ready_at is None for s in self.slots for w in s.workers
        )
        timeout = TICK if busy else 1.0
        if self.steering is not None and not self.stopping:
            timeout = min(timeout, self.steering.due(now))
        for d in deadlines:
            timeout = min(timeout, max(0.0, d - now))
        return timeout

    def _tick(self) -> None:
        now = time.monotonic()
        for slot in list(self.slots):
            for w in list(slot.workers):
                self._check_worker(w, now)
            if slot.respawn_at is not None and now >= slot.respawn_at and not self.stopping:
                slot.respawn_at = None
                self._spawn_or_fail(slot, "respawn")
        self._step_tasks(now)
        self._steer(now)
        if self.control is not None:
            self.control.expire(now)
        if now >= self._next_sample:
            self._next_sample = now + 1.0
            self._sample()
        if self.web is not None:
            self.web.expire(now)

    def _check_worker(self, w: Worker, now: float) -> None:
        if w.kill_at is not None and now >= w.kill_at and w.life.alive:
            w.kill_at = None
            log.warning(
                "slot %d pid %d: did not stop within the grace time; SIGKILL", w.slot.index, w.pid
            )
            if w.state is not State.STOPPING:
                w.life.fire(Event.STOP)
            w.life.fire(Event.GRACE_EXPIRED)
            self._signal(w, signal.SIGKILL)
        if w.state is State.STARTING and w.ready_at is None:
            if self._is_ready(w, now):
                w.ready_at = now
                w.life.fire(Event.READY)
                log.info("slot %d pid %d: ready after %.3fs", w.slot.index, w.pid, now - w.started)
                if w.trap is not None:
                    self._restore_backlog(w.slot)
            elif now - w.started > w.slot.cfg.ready_timeout:
                self._ready_timeout(w)

    def _is_ready(self, w: Worker, now: float) -> bool:
        mode = w.slot.cfg.ready
        if mode.kind == "delay":
            return now - w.started >= mode.seconds
        if mode.kind == "accept":
            # Waiting for work on its socket, or already serving: under a saturating load the
            # queue never empties, so a worker that accepts at once never waits, but it holds
            # a connection it accepted (it inherited none).
            try:
                inodes = self._listeners_of(w)
                if inspect.waiting_for_work(w.pid, inodes):
                    return True
                ports = self._tcp_ports()
                return bool(ports) and held_connections(w.pid, inodes, ports) > 0
            except (OSError, inspect.InspectError):
                return False  # not visible (yet): ask again on the next tick
        return False  # notify: set by _on_notify

    def _tcp_ports(self) -> set[int]:
        """The served TCP ports (port 0 resolved)."""
        return {a.port for a in self.bound if a.proto is Proto.TCP}

    @property
    def owns_sockets(self) -> bool:
        """False with --via reuseport: each worker binds its own socket, slots hold none."""
        return self.cfg.via != "reuseport"

    def _listeners_of(self, w: Worker) -> set[int]:
        """Inodes of the listening sockets ``w`` serves: its slot's, or (--via reuseport) the
        ones it bound itself."""
        if self.owns_sockets:
            return slot_inodes(w.slot)
        try:  # only the served ports: a program may listen elsewhere first (an admin port)
            return inspect.listening_sockets_of(w.pid, ports={a.port for a in self.bound})
        except (OSError, inspect.InspectError):
            return set()  # not visible now: nothing counts as its listener this time

    def _ready_timeout(self, w: Worker) -> None:
        timeout = w.slot.cfg.ready_timeout
        reason = (
            f"slot {w.slot.index} pid {w.pid}: not ready within {timeout:g}s "
            f"(--ready {w.slot.cfg.ready}); "
            + {
                "notify": "the program must send READY=1 to $NOTIFY_SOCKET "
                "(portshard.notify_ready())",
                "accept": "it never waited for connections on its inherited socket (fd 3...); "
                "does it use $LISTEN_FDS, or bind a port of its own?",
                "delay": "raise --ready-timeout",
            }[w.slot.cfg.ready.kind]
        )
        log.error("%s; killing it", reason)
        w.life.fire(Event.READY_TIMEOUT)
        self._signal(w, signal.SIGKILL)
        if w.role == "boot":
            self._fail(reason)

    # ---- tasks ------------------------------------------------------------------------------

    def start_task(self, task: Task) -> None:
        try:
            until = next(task)
        except StopIteration:
            return
        self.tasks.append((task, until))

    def _step_tasks(self, now: float) -> None:
        for entry in list(self.tasks):
            task, until = entry
            while True:
                if until.cond():
                    value = True
                elif until.deadline is not None and now >= until.deadline:
                    value = False
                else:
                    break
                try:
                    until = task.send(value)
                except StopIteration:
                    self.tasks.remove(entry)
                    break
                idx = self.tasks.index(entry)
                entry = (task, until)
                self.tasks[idx] = entry

    @staticmethod
    def sleep(seconds: float) -> Until:
        return Until(lambda: False, time.monotonic() + seconds)

    # ---- workers ----------------------------------------------------------------------------

    def _spawn(self, slot: Slot, role: str, cfg: Config | None = None) -> Worker:
        cfg = cfg or slot.cfg
        env = dict(os.environ)
        env.update(cfg.env)
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET"):
            env.pop(key, None)
        env["PORTSHARD_SLOT"] = str(slot.index)
        env["PORTSHARD_WORKERS"] = str(cfg.workers)
        if cfg.ready.kind == "notify":
            env["NOTIFY_SOCKET"] = "@" + self._notify_name[1:]
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
        spawned = spawn(
            SpawnSpec(
                argv, env, [s.fileno() for s in slot.socks], names, creds, seccomp=via.seccomp
            )
        )
        generation = self.generation if role in ("reload", "scale", "boot") else slot.generation
        w = Worker(slot, spawned.pid, spawned.pidfd, generation, role, time.monotonic())
        w.mode = via.mode
        slot.workers.append(w)
        self.sel.register(spawned.pidfd, selectors.EVENT_READ, lambda _m: self._on_exit(w))
        if spawned.listener is not None:
            self._watch_trap(w, spawned.listener, via.reuseport)
        log.info(
            "slot %d pid %d: started (%s, generation %d, via %s: %s)",
            slot.index,
            w.pid,
            role,
            generation,
            via.mode,
            via.why,
        )
        return w

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

    def _restore_backlog(self, slot: Slot) -> None:
        """A program under --via seccomp called listen() on the slot's socket for real (only
        bind() is trapped), which set its own backlog (e.g. 128); put ours back."""
        for sock in slot.socks:
            if sock.type == socket.SOCK_STREAM:
                try:
                    sock.listen(slot.cfg.backlog)
                except OSError as exc:
                    log.warning("slot %d: cannot restore the backlog: %s", slot.index, exc)

    def _spawn_or_fail(self, slot: Slot, role: str) -> Worker | None:
        try:
            return self._spawn(slot, role)
        except SupervisorError as exc:
            self._fail(str(exc))
            return None

    def _signal(self, w: Worker, sig: int) -> None:
        try:
            os.killpg(w.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            os.kill(w.pid, sig)

    def _on_exit(self, w: Worker) -> None:
        try:
            _, status = os.waitpid(w.pid, os.WNOHANG)
        except ChildProcessError:
            status = 0
        w.status = status
        self.sel.unregister(w.pidfd)
        os.close(w.pidfd)
        self._signal(w, signal.SIGKILL)  # whatever the worker left in its process group
        w.life.fire(Event.EXIT)
        w.kill_at = None
        slot = w.slot
        slot.workers.remove(w)
        if w.deliberate:
            log.info("slot %d pid %d: retired (%s)", slot.index, w.pid, w.describe_exit())
        else:
            log.warning("slot %d pid %d: exited (%s)", slot.index, w.pid, w.describe_exit())
        if w.deliberate or self.stopping or slot.removing or slot.live():
            return
        self._rescue_queue(slot, w.pid)
        if w.role == "reload" and w.ready_at is None:
            return  # a replacement that never became ready: the reload task reports it
        if w.role == "boot" and w.ready_at is None:
            self._fail(
                f"the worker for slot {slot.index} exited before it was ready "
                f"({w.describe_exit()}): the program cannot start; run it by hand to see why"
            )
            return
        self.history.event("crash", f"slot {slot.index} pid {w.pid} {w.describe_exit()}")
        ready = w.ready_at is not None
        status = w.status
        killed = (
            status is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        )
        uptime = time.monotonic() - w.started if ready else 0.0
        delay = slot.backoff.on_exit(uptime, own=not (ready and killed))
        if delay is None:
            self._fail(
                f"the worker for slot {slot.index} failed {slot.backoff.strikes} times in a row "
                f"within {slot.backoff.healthy_after:g}s of starting (last: {w.describe_exit()}); "
                f"giving up instead of crash-looping; fix the program and start again"
            )
            return
        slot.restarts += 1
        slot.respawn_at = time.monotonic() + delay
        if delay:
            log.warning("slot %d: respawning in %.2fs", slot.index, delay)

    def _on_notify(self, _mask: int) -> None:
        while True:
            try:
                data, ancdata, _flags, _addr = self._notify.recvmsg(4096, socket.CMSG_SPACE(12))
            except (BlockingIOError, InterruptedError):
                return
            pid = None
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid, _uid, _gid = struct.unpack("3i", payload[:12])
            if pid is None or b"READY=1" not in data.split(b"\n"):
                continue
            for slot in self.slots:
                for w in slot.workers:
                    if w.pid == pid and w.state is State.STARTING and w.ready_at is None:
                        w.ready_at = time.monotonic()
                        w.life.fire(Event.READY)
                        log.info(
                            "slot %d pid %d: ready (notify) after %.3fs",
                            slot.index,
                            pid,
                            w.ready_at - w.started,
                        )

    def _on_wakeup(self, _mask: int) -> None:
        try:
            data = self._wake_r.recv(512)
        except BlockingIOError:
            return
        for signum in array.array("B", data):
            if signum in (signal.SIGTERM, signal.SIGINT):
                if self.stopping:
                    log.warning("second %s: killing every worker now", signal.Signals(signum).name)
                    self._kill_all()
                else:
                    log.info("%s: stopping gracefully", signal.Signals(signum).name)
                    self.stop()
            elif signum == signal.SIGQUIT:
                log.warning("SIGQUIT: killing every worker now")
                self._kill_all()
                self.stopping = True
                self.start_task(self._wait_all_exited(0))
            elif signum == signal.SIGHUP:
                log.info("SIGHUP: reloading")
                try:
                    self.reload(Outcome())
                except PortshardError as exc:
                    log.error("reload refused: %s", exc)

    def _kill_all(self) -> None:
        for slot in self.slots:
            for w in slot.live():
                w.deliberate = True
                self._signal(w, signal.SIGKILL)

    def _fail(self, reason: str) -> None:
        if self.fatal is None:
            self.fatal = reason
            log.error("%s", reason)
        self.stop(code=1)

    # ---- procedures -------------------------------------------------------------------------

    def _boot_task(self) -> Task:
        self.generation = 1
        for slot in self.slots:
            slot.generation = 1
            if self._spawn_or_fail(slot, "boot") is None:
                return
        ok = yield Until(
            lambda: (
                all(
                    s.serving() and s.serving().state is State.READY  # type: ignore[union-attr]
                    for s in self.slots
                )
                or self.stopping
            )
        )
        if ok and not self.stopping:
            self.started_up = True
            log.info("all %d workers ready", len(self.slots))
            self.history.event("boot", f"{len(self.slots)} workers ready")
            self._store_sockets(self.slots)
            self.systemd.ready(self._summary())
            if self.on_ready is not None:
                self.on_ready(self)

    def _drain(self, w: Worker) -> Task:
        """Stop a worker without losing what it holds; ends when it has exited."""
        w.deliberate = True
        w.retiring_since = time.monotonic()
        if w.state is State.STARTING or w.state is State.READY:
            w.life.fire(Event.DRAIN)
        if w.state is not State.DRAINING:
            yield Until(lambda: not w.life.alive)
            return
        cfg = w.slot.cfg
        deadline = time.monotonic() + cfg.grace
        if cfg.drain == "freeze":
            # Freeze, check, kill: a stopped task leaves the accept wait queue, so the queue goes
            # to the other worker of the slot; if it holds no connection, nothing can be lost.
            ports = self._tcp_ports()
            while w.life.alive and time.monotonic() < deadline:
                listeners = self._listeners_of(w)
                self._signal(w, signal.SIGSTOP)
                # Usually stopped within microseconds: check inline to keep the freeze short.
                spin_until = time.monotonic() + 0.005
                while not tree_stopped(w.pid) and time.monotonic() < spin_until:
                    time.sleep(0.0002)
                if not tree_stopped(w.pid):
                    yield Until(
                        lambda: not w.life.alive or tree_stopped(w.pid), time.monotonic() + 1.0
                    )
                if not w.life.alive:
                    return
                if held_connections(w.pid, listeners, ports) == 0:
                    w.life.fire(Event.DRAINED)
                    self._signal(w, signal.SIGKILL)
                    w.kill_at = time.monotonic() + 5.0
                    yield Until(lambda: not w.life.alive)
                    return
                self._signal(w, signal.SIGCONT)
                yield self.sleep(0.02)
            if not w.life.alive:
                return
            log.warning(
                "slot %d pid %d: still holds connections after %gs; sending %s",
                w.slot.index,
                w.pid,
                cfg.grace,
                signal.Signals(cfg.stop_signal).name,
            )
            self._signal(w, signal.SIGCONT)
        w.life.fire(Event.DRAINED)
        self._signal(w, cfg.stop_signal)
        self._signal(w, signal.SIGCONT)
        w.kill_at = time.monotonic() + (cfg.grace if cfg.drain == "signal" else 5.0)
        yield Until(lambda: not w.life.alive)

    def _drain_all(self, workers: Iterable[Worker]) -> Until:
        workers = list(workers)
        for w in workers:
            self.start_task(self._drain(w))
        return Until(lambda: all(not w.life.alive for w in workers))

    def reload(self, outcome: Outcome) -> Outcome:
        if self.stopping:
            raise ControlError("the supervisor is stopping; nothing to reload")
        self._refuse_if_busy()
        new_cfg = reloaded(self.cfg, self.cli)
        self.busy = "reload"
        self.start_task(self._reload_task(new_cfg, outcome))
        return outcome

    def _settled(self, workers: list[Worker]) -> Callable[[], bool]:
        """All ready, or one already died, or we are stopping: time to decide."""
        return lambda: (
            all(w.state is State.READY for w in workers)
            or any(not w.life.alive for w in workers)
            or self.stopping
        )

    def _refuse_if_busy(self) -> None:
        if not self.started_up:
            raise ControlError("the workers are still starting; try again when status says ready")
        if self.busy:
            raise ControlError(f"a {self.busy} is already in progress; wait for it to finish")

    def _summary(self) -> str:
        ready = sum(1 for s in self.slots if (w := s.serving()) and w.state is State.READY)
        return f"{ready} of {len(self.slots)} workers ready, generation {self.generation}"

    # ---- steering ---------------------------------------------------------------------------

    def _setup_steering(self) -> None:
        if self.cfg.migrate:
            self._set_migrate_req()
        self.steering = Steering.create(
            self.cfg.steering,
            [spec.address.proto for spec in self.cfg.listen],
            {slot.index: list(slot.socks) for slot in self.slots},
            on_event=lambda text: self.history.event("steering", text),
        )
        if self.steering is None and not self.owns_sockets:
            log.warning(
                "--via reuseport: each copy binds its own socket; one that exits (a reload, a "
                "crash) takes its socket with it, and the kernel %s; no steering",
                "hands what was queued on it to the others (tcp_migrate_req=1)"
                if migrate_req() == 1
                else "resets what was queued on it (tcp_migrate_req is not 1: --migrate "
                "sets it; or use --via auto, where portshard keeps the sockets)",
            )
            return
        if self.steering is None:
            log.info("steering: off: the kernel hashes over every slot")
            return
        log.info(
            "steering: %s (%s); a dead worker's queue %s",
            self.steering.backend,
            self.steering.why,
            "is handed to the other slots"
            if self.steering.can_migrate()
            else "waits for its replacement (tcp_migrate_req=0; --migrate sets it)",
        )

    def _set_migrate_req(self) -> None:
        """--migrate: net.ipv4.tcp_migrate_req=1 in this network namespace (root only)."""
        value = migrate_req()
        if value is None:
            log.warning("--migrate: this kernel has no net.ipv4.tcp_migrate_req (Linux < 5.14)")
            return
        if value == 1:
            log.info("--migrate: net.ipv4.tcp_migrate_req is already 1 in this network namespace")
            return
        try:
            with open("/proc/sys/net/ipv4/tcp_migrate_req", "w") as f:
                f.write("1")
        except OSError as exc:
            log.warning(
                "--migrate: cannot set net.ipv4.tcp_migrate_req (%s): needs root or "
                "CAP_NET_ADMIN; continuing without",
                exc.strerror or exc,
            )
            return
        log.warning(
            "--migrate: set net.ipv4.tcp_migrate_req from %d to 1 for this whole network "
            "namespace (every program's closing listeners now hand their queued connections "
            "to the rest of their group); it stays set after portshard exits",
            value,
        )

    def _health(self, slot: Slot) -> Health:
        if slot.removing:
            return Health.REMOVING
        states = {w.state for w in slot.live()}
        if State.READY in states:
            # Out for new TCP connections while an old worker goes, so that its queue empties
            # and freeze-check-kill catches it idle; at most HANDOVER_MAX s: an old worker that
            # holds long-lived connections is not caught idle anyway (it waits for --grace),
            # and meanwhile its slot's new worker should serve.
            now = time.monotonic()
            retiring = any(
                w.state in (State.DRAINING, State.STOPPING)
                and now - (w.retiring_since or now) < HANDOVER_MAX
                for w in slot.live()
            )
            return Health.HANDOVER if retiring else Health.READY
        if State.DRAINING in states or State.STOPPING in states:
            return Health.DRAINING
        if State.STARTING in states:
            return Health.STARTING
        return Health.DOWN

    def _steer(self, now: float) -> None:
        """Tell steering each slot's health (every turn of the loop: a dead or ready worker
        changes the table at once); it samples the queues itself when due."""
        if self.steering is None or self.stopping:
            return
        views = []
        for slot in self.slots:
            w = slot.serving()
            views.append((slot.index, w.pid if w else None, self._health(slot)))
        self.steering.step(now, views)

    def _rescue_queue(self, slot: Slot, pid: int) -> None:
        """A slot lost its only worker: take it out of the table now and, where the kernel can
        migrate a closing listener's queue, replace its listener so that the connections
        queued on it go to the other slots instead of waiting for the replacement."""
        if self.steering is None:
            return
        self._steer(time.monotonic())
        if self.systemd:
            return  # systemd may hold a copy of the socket: closing ours would not close it
        for i, spec in enumerate(self.cfg.listen):
            old = slot.socks[i]
            if spec.address.proto is not Proto.TCP or old.fileno() in self.held:
                continue
            if not self.steering.can_migrate():
                queued = inspect.queue_depth(old).queued
                if queued:
                    log.warning(
                        "slot %d pid %d: %d connection(s) queued on its socket wait for the "
                        "replacement (no migration: tcp_migrate_req=0 and no eBPF steering)",
                        slot.index,
                        pid,
                        queued,
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
                )
                continue
            if new is not None:
                slot.socks[i] = new

    def _sample(self) -> None:
        """Once a second: each slot's queue depth and the connections its worker holds (from
        the kernel's in-flight counts where eBPF steering has them, at a cost per slot; else
        walked per connection, less often as they grow: steering/held.py)."""
        ports = self._tcp_ports()
        workers = {slot.index: w for slot in self.slots if (w := slot.serving()) is not None}
        in_flight = self.steering.in_flight() if self.steering is not None else None
        if in_flight is None and self._held_walk.due(now := time.monotonic()):
            # Most of the time a worker holds no socket but its listeners: no table walk.
            busy = [
                w.pid
                for w in workers.values()
                if ports and inspect.sockets_of(w.pid) - self._listeners_of(w)
            ]
            try:
                walked = inspect.connections_by_pid(busy, ports=ports) if busy else {}
            except (OSError, inspect.InspectError):
                walked = {}
            self._held_walk.done(now, walked, time.monotonic() - now)
        counts = self._held_walk.counts
        self._rate_new_connections()
        rows = []
        for slot in self.slots:
            w = workers.get(slot.index)
            queued = sum(
                inspect.queue_depth(sock).queued
                for sock in slot.socks
                if sock.type == socket.SOCK_STREAM
            )
            conns = counts.get(w.pid, 0) if w is not None and ports else None
            if in_flight is not None and w is not None and ports:
                conns = max(0, in_flight.get(slot.index, 0) - queued)
            self._connections[slot.index] = conns
            rows.append(
                {
                    "slot": slot.index,
                    "pid": w.pid if w else None,
                    "state": w.state.value if w else "empty",
                    "queued": queued,
                    "connections": conns,
                    "cpu": worker_cpu(w.pid) if w else None,
                    "new_per_s": self._new_per_s.get(slot.index),
                }
            )
        self.history.add(rows)

    def _rate_new_connections(self) -> None:
        """New connections per second for each slot, where the eBPF steering program counts
        them (the kernel keeps no per-listener count; classic BPF cannot count)."""
        totals = self.steering.handed() if self.steering is not None else None
        now = time.monotonic()
        if totals is None:
            self._handed = None
            self._new_per_s = {}
            return
        if self._handed is not None:
            then, before = self._handed
            dt = max(now - then, 1e-3)
            self._new_per_s = {
                slot: round(max(0, total - before.get(slot, total)) / dt, 1)
                for slot, total in totals.items()
            }
        self._handed = (now, totals)

    def _store_sockets(self, slots: Iterable[Slot]) -> None:
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

    def _finish(self, outcome: Outcome, error: str = "") -> None:
        what = self.busy or "change"
        if error:
            self.history.event(f"{what}_failed", error)
        else:
            self.history.event(what, f"{what} done: {self._summary()}")
        outcome.done = True
        self.busy = None
        self.systemd.ready(self._summary() + (f"; last change failed: {error}" if error else ""))
        outcome.ok = not error
        outcome.error = error
        if error:
            log.error("%s", error)
        for conn in outcome.waiters:
            if self.control is not None:
                reply = protocol.reply_error(error) if error else protocol.reply_ok(self.status())
                self.control.reply(conn, reply)

    def _reload_task(self, new_cfg: Config, outcome: Outcome) -> Task:
        self.generation += 1
        gen = self.generation
        slots = [s for s in self.slots if not s.removing]
        log.info("reload to generation %d: %d slots, %d at a time", gen, len(slots), new_cfg.surge)
        self.systemd.reloading()
        self.history.event("reload", f"reload to generation {gen} started")
        for start in range(0, len(slots), new_cfg.surge):
            batch = slots[start : start + new_cfg.surge]
            news: list[Worker] = []
            for slot in batch:
                try:
                    news.append(self._spawn(slot, "reload", new_cfg))
                except SupervisorError as exc:
                    self._abort_reload(news, outcome, f"reload failed at slot {slot.index}: {exc}")
                    return
            previous = {slot.index: slot.cfg for slot in batch}
            for w in news:
                w.slot.cfg = new_cfg  # its readiness is judged by the new settings
            ok = yield Until(self._settled(news), time.monotonic() + new_cfg.ready_timeout + 0.5)
            bad = [w for w in news if w.state is not State.READY]
            if not ok or bad or self.stopping:
                w = bad[0] if bad else news[0]
                why = (
                    "the supervisor is stopping"
                    if self.stopping
                    else f"it exited ({w.describe_exit()})"
                    if not w.life.alive
                    else f"it was not ready within {new_cfg.ready_timeout:g}s "
                    f"(--ready {new_cfg.ready})"
                )
                for slot in batch:
                    slot.cfg = previous[slot.index]  # the old worker keeps its settings
                self._abort_reload(
                    news,
                    outcome,
                    f"reload failed at slot {w.slot.index}: the new worker (pid {w.pid}) did not "
                    f"become ready: {why}; the old workers keep serving",
                )
                return
            olds = [o for slot in batch for o in slot.live() if o not in news and not o.deliberate]
            for slot in batch:
                slot.generation = gen
                slot.backoff = Backoff()
            yield self._drain_all(olds)
        self.cfg = new_cfg
        self.reloads["ok"] += 1
        log.info("reload to generation %d done", gen)
        self._finish(outcome)

    def _abort_reload(self, news: list[Worker], outcome: Outcome, error: str) -> None:
        for w in news:
            if w.life.alive:
                w.deliberate = True
                if w.state is not State.STOPPING:
                    w.life.fire(Event.STOP)
                self._signal(w, signal.SIGKILL)
        self.reloads["failed"] += 1
        self._finish(outcome, error)

    def scale(self, count: int, outcome: Outcome) -> Outcome:
        if self.stopping:
            raise ControlError("the supervisor is stopping")
        if not 1 <= count <= 1024:
            raise ControlError(f"scale {count}: the worker count must be 1-1024")
        self._refuse_if_busy()
        self.busy = "scale"
        self.start_task(self._scale_task(count, outcome))
        return outcome

    def _scale_task(self, count: int, outcome: Outcome) -> Task:
        current = [s for s in self.slots if not s.removing]
        log.info("scale %d -> %d", len(current), count)
        if count > len(current):
            added: list[Worker] = []
            for index in range(len(self.slots), len(self.slots) + count - len(current)):
                try:
                    slot = Slot(index, self._open_slot_sockets(index), self.cfg)
                    slot.generation = self.generation
                    self.slots.append(slot)
                    if self.steering is not None:  # out of the table until its worker is ready
                        self.steering.add_slot(slot.index, slot.socks)
                    added.append(self._spawn(slot, "scale"))
                except PortshardError as exc:
                    self._finish(outcome, f"scale up failed at slot {index}: {exc}")
                    return
            ok = yield Until(self._settled(added), time.monotonic() + self.cfg.ready_timeout + 0.5)
            if not ok or any(w.state is not State.READY for w in added):
                self._finish(outcome, "scale up: a new worker did not become ready; see the log")
                return
            self.cfg = _with_workers(self.cfg, count)
            self._store_sockets(self.slots[len(current) :])
            self._finish(outcome)
            return
        removed = current[count:]
        for slot in removed:
            slot.removing = True
            slot.respawn_at = None
        # Steer new connections to the slots that stay (they come first in listen order),
        # let the removed slots' queues empty, drain their workers, then close their sockets.
        # With steering on, the removed slots leave its table (UDP too: only their flows move).
        own = self.owns_sockets
        if self.steering is not None:
            self._steer(time.monotonic())
        elif own:
            for i, spec in enumerate(self.cfg.listen):
                if spec.address.proto is Proto.TCP:
                    cbpf.attach_first_k(self.slots[0].socks[i], count)
        yield self.sleep(0.05)  # handshakes already under way finish into the old queues
        yield Until(
            lambda: all(queue_empty(s) or not s.live() for s in removed),
            time.monotonic() + self.cfg.grace,
        )
        yield self._drain_all(w for s in removed for w in s.live())
        yield Until(lambda: all(queue_empty(s) for s in removed), time.monotonic() + 1.0)
        for slot in removed:
            for spec, sock in zip(self.cfg.listen, slot.socks, strict=own):
                self.systemd.unstore(store_name(spec.name, slot.index))
                self.held.discard(sock.fileno())
                sock.close()
            self.slots.remove(slot)
            if self.steering is not None:
                self.steering.remove_slot(slot.index)
        for i, spec in enumerate(self.cfg.listen):
            if spec.address.proto is Proto.TCP and self.steering is None and own:
                cbpf.detach(self.slots[0].socks[i])
        self.cfg = _with_workers(self.cfg, count)
        self._finish(outcome)

    def stop(self, code: int = 0) -> None:
        if self.stopping:
            return
        self.stopping = True
        for slot in self.slots:
            slot.respawn_at = None
        self.start_task(self._stop_task(code))

    def _stop_task(self, code: int) -> Task:
        # New SYNs are dropped; connections the kernel already accepted are served. Sockets
        # systemd holds too are left alone: their queues wait for the next supervisor.
        self.systemd.stopping()
        closing = [
            sock
            for slot in self.slots
            for sock, spec in zip(slot.socks, self.cfg.listen, strict=self.owns_sockets)
            if spec.address.proto is Proto.TCP and sock.fileno() not in self.held
        ]
        for sock in closing:
            cbpf.drop_syns(sock)
        yield Until(
            lambda: (
                all(inspect.queue_depth(sock).queued == 0 for sock in closing)
                or not any(s.live() for s in self.slots)
            ),
            time.monotonic() + self.cfg.grace,
        )
        yield self._drain_all(w for s in self.slots for w in s.live())
        yield from self._wait_all_exited(code)

    def _wait_all_exited(self, code: int) -> Task:
        yield Until(lambda: all(not s.live() for s in self.slots))
        log.info("stopped")
        self.exit_code = 1 if self.fatal else code

    # ---- control ----------------------------------------------------------------------------

    def _on_request(self, request: dict[str, Any], conn: Connection) -> bytes | None:
        cmd = request["cmd"]
        if cmd == "status":
            return protocol.reply_ok(self.status())
        if cmd == "stop":
            self.stop()
            return protocol.reply_ok({"stopping": True})
        if cmd == "reload":
            outcome = self.reload(Outcome())
        else:
            count = request.get("workers")
            if isinstance(count, bool) or not isinstance(count, int):
                raise ControlError(f"scale needs an integer 'workers', not {count!r}")
            outcome = self.scale(count, Outcome())
        if request.get("wait"):
            outcome.waiters.append(conn)
            return None
        return protocol.reply_ok({"started": True})

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        listen_info = [
            {"name": spec.name, "address": str(addr), "proto": addr.proto.value, "port": addr.port}
            for spec, addr in zip(self.cfg.listen, self.bound, strict=True)
        ]
        slots = []
        for slot in self.slots:
            w = slot.serving()
            queues: dict[str, Any] = {}
            for spec, sock in zip(self.cfg.listen, slot.socks, strict=self.owns_sockets):
                if spec.address.proto is Proto.TCP:
                    depth = inspect.queue_depth(sock)
                    queues[spec.name] = {"queued": depth.queued, "backlog": depth.backlog}
            slots.append(
                {
                    "slot": slot.index,
                    "pid": w.pid if w else None,
                    "state": (
                        "removing"
                        if slot.removing
                        else w.state.value
                        if w
                        else "backoff"
                        if slot.respawn_at
                        else "empty"
                    ),
                    "restarts": slot.restarts,
                    "generation": slot.generation,
                    "uptime": round(now - w.started, 3) if w else None,
                    "mode": w.mode if w else None,
                    "queue": queues,
                    "connections": self._connections.get(slot.index),
                    "new_per_s": self._new_per_s.get(slot.index),
                    "new_total": self._handed[1].get(slot.index) if self._handed else None,
                    "steering": self.steering.slot_status(slot.index) if self.steering else None,
                    "workers": [
                        {"pid": x.pid, "state": x.state.value, "generation": x.generation}
                        for x in slot.live()
                    ],
                }
            )
        return {
            "name": self.cfg.name,
            "pid": os.getpid(),
            "uptime": round(now - self.started, 3),
            "generation": self.generation,
            "stopping": self.stopping,
            "ready": self.started_up,
            "reloads": dict(self.reloads),
            "listen": listen_info,
            "workers": len([s for s in self.slots if not s.removing]),
            "slots": slots,
            "metrics": f"{self.web.url}/metrics" if self.web else None,
            "dashboard": f"{self.web.url}/" if self.web else None,
            "kernel": listen_drop_counters(),
            "steering": (
                self.steering.status()
                if self.steering
                else {"backend": "off", "why": f"--steering {self.cfg.steering}"}
            ),
            "steering_changes": self.steering.changes if self.steering else 0,
        }


def _with_workers(cfg: Config, count: int) -> Config:
    from dataclasses import replace

    return replace(cfg, workers=count)


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


def queue_empty(slot: Slot) -> bool:
    for sock in slot.socks:
        if sock.type == socket.SOCK_STREAM and inspect.queue_depth(sock).queued:
            return False
    return True


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (via /proc/PID/task/*/children; cheap, no /proc scan)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{current}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
            except OSError:
                continue
    return tree


def tree_stopped(pid: int) -> bool:
    """Every process of the tree is stopped (state T), or gone."""
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("T", "t", "Z", "X"):
            return False
    return True


def held_connections(pid: int, listeners: set[int], ports: set[int]) -> int:
    """Client connections (local port one of ``ports``) that the process tree holds.

    First the tree's own fd tables (microseconds): no socket besides the listeners means
    nothing is held. Only otherwise walk the socket table (sock_diag, filtered by state in
    the kernel) for live connections on our ports (a DB connection does not count).
    """
    tree = process_tree(pid)
    if not set().union(*(inspect.sockets_of(member) for member in tree)) - listeners:
        return 0
    return sum(inspect.connections_by_pid(tree, ports=ports).values())


def slot_inodes(slot: Slot) -> set[int]:
    return {os.fstat(sock.fileno()).st_ino for sock in slot.socks}


_TICKS = os.sysconf("SC_CLK_TCK")


def worker_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) the process has used, from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS
