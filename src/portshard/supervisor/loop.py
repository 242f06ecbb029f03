"""The supervisor: one thread, one selector, the loop that drives the lifecycle.

The selector watches the signal wakeup fd (handlers do nothing; signal numbers arrive as
bytes), the control socket and its connections, the metrics endpoint, the notify socket
(sd_notify), and one pidfd per worker. Each turn: dispatch the ready fds, then tick (timers,
readiness, the procedures, steering, sampling). What the events mean lives in ``fleet.py``
(the lifecycle, over the tables of ``state.py``) and ``procedures.py``; what they do to the
world in ``system.py``.

Invariants:
- A slot's sockets are opened once and stay open for the slot's whole life; every
  incarnation of the slot's worker gets the same sockets. So a crash, restart or reload never
  resets a queued connection or moves a UDP flow.
- During a reload a slot has at most two workers, and the old one is drained only after the
  new one is ready.
- One thread. Nothing blocks but the select.
"""

from __future__ import annotations

import array
import collections
import contextlib
import errno
import logging
import os
import selectors
import signal
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from ..address import Proto
from ..control import protocol
from ..control.server import Connection, ControlServer, default_path
from ..errors import ControlError, InspectError, PortshardError, SupervisorError
from ..health import HealthServer
from ..linux import fdlimit, proc, sockdiag, tcpinfo
from ..linux.cgroup import Trees
from ..linux.proc import cpu_seconds as worker_cpu
from ..steering.controller import Steering, migrate_req
from ..steering.held import HeldWalk
from . import handoff
from .config import Config
from .drain import parse_request as parse_drain
from .fleet import Fleet, Outcome
from .handoff import Resume
from .history import listen_drop_counters
from .state import SlotState
from .status import ListenStatus, QueueStatus, SlotStatus, Status, WorkerStatus
from .succession import Succession
from .system import SystemEffects, expand_placeholders
from .systemd import Activated
from .web import WebServer, parse_metrics_address
from .worker import Slot, Worker

log = logging.getLogger("portshard.supervisor")

__all__ = ["Supervisor", "expand_placeholders"]

TICK = 0.02  # how often conditions are re-checked while something is in progress
SAMPLE_EVERY = 1.0
GUARD_LOG_EVERY = 10.0  # s between log lines about the same failing loop operation
# A second SIGTERM/SIGINT kills every worker, but one this soon after the first is the same
# request delivered twice: GNU `timeout` signals the program and then its own process group
# (the supervisor again), at once. `timeout 60 portshard run ...` killed every worker instead
# of stopping gracefully. A person sending it again is slower than this.
SAME_SIGNAL = 0.1

# Every signal whose default would kill the supervisor (and with it every worker) has a
# meaning or is ignored with a log line. TERM/INT: graceful stop (twice: kill now); QUIT: kill
# now; HUP: reload; USR1: reopen log files; USR2: upgrade (as nginx). The rest are ignored.
HANDLED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
IGNORED = (
    signal.SIGALRM,
    signal.SIGVTALRM,
    signal.SIGPROF,
    signal.SIGIO,
    signal.SIGPWR,
    *range(signal.SIGRTMIN, signal.SIGRTMAX + 1),
)


def reopen_log_files() -> int:
    """Reopen every log file handler's file (after logrotate moved it); return how many."""
    count = 0
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                if handler.stream is not None:
                    handler.stream.close()
                handler.stream = handler._open()
                count += 1
            finally:
                handler.release()
    return count


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:  # a real-time signal
        return f"SIGRTMIN+{signum - signal.SIGRTMIN}"


class Supervisor:
    def __init__(
        self,
        cfg: Config,
        cli: dict[str, Any],
        activated: Activated | None = None,
        *,
        capture_output: bool = False,
        resume: Resume | None = None,
        log_format: str = "text",
        on_bound: Callable[[], None] | None = None,
    ) -> None:
        self.on_bound = on_bound  # called once the slots' sockets are bound (PortLocks)
        self.sel = selectors.DefaultSelector()
        self.fx = SystemEffects(self.sel, activated, capture_output=capture_output)
        self.fleet = Fleet(cfg, cli, self.fx)
        self.fx.fleet = self.fleet
        self.fleet.report = lambda: self.status().to_json()
        self.activated = activated
        self.web: WebServer | None = None
        self.health: HealthServer | None = None
        self.started = time.monotonic()
        self._next_sample = 0.0
        self._next_tick = 0.0  # a whole tick is due (else a wake-up is steering's own look)
        self._held_walk = HeldWalk()  # per-connection counts: less often as they grow
        self._connections: dict[int, int | None] = {}  # slot -> connections, last sample
        self._handed: tuple[float, dict[int, int]] | None = None  # eBPF counters, last sample
        self._new_per_s: dict[int, float] = {}  # slot -> new connections/s, last second
        self._guard_log: dict[str, tuple[float, int]] = {}  # operation -> last log, held
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop_signalled = -SAME_SIGNAL  # when SIGTERM/SIGINT began the graceful stop
        # When each SIGTERM/SIGINT not yet handled arrived: the loop may take longer than
        # SAME_SIGNAL to come to the second of two sent 20 ms apart on a busy machine.
        self._stops_arrived: collections.deque[float] = collections.deque(maxlen=64)
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._old_handlers: dict[int, Any] = {}
        self.resume = resume
        self.control_path = cfg.control or default_path(cfg.name)
        self.succession = Succession(self, resume, log_format)  # issue 15
        self.fx.warden = self.succession.warden

    @property
    def cfg(self) -> Config:
        return self.fleet.cfg

    @property
    def notify_socket(self) -> socket.socket:
        """The workers' NOTIFY_SOCKET (handed over with the manifest, issue 15)."""
        return self._notify

    # ---- set-up and tear-down -------------------------------------------------------------

    def _setup(self) -> None:
        fleet, fx = self.fleet, self.fx
        resume = self.resume
        if resume is not None:
            fx.trees = Trees.adopt(self.cfg.name, resume.manifest["trees"]["home"])
            fleet.slots.extend(handoff.restore(resume, self))
            if resume.how == "adoption":
                handoff.adopt_unrecorded(resume, self, fleet.slots)
        else:
            fx.trees = Trees.open(self.cfg.name)
            for i in range(self.cfg.workers):
                fleet.slots.append(Slot(i, fx.open_slot(i), self.cfg))
        if self.on_bound is not None:
            self.on_bound()
        log.info("worker trees: %s (%s)", fx.trees.mechanism.value, fx.trees.detected.why)
        if self.activated:
            self.activated.close_unused()
        self._setup_steering()
        path = self.control_path
        inherited = resume.take("control") if resume is not None else None
        fx.control = ControlServer(
            path,
            self.sel,
            self._on_request,
            private_dir=self.cfg.control is None,
            inherited=socket.socket(fileno=inherited) if inherited is not None else None,
        )
        if self.cfg.metrics:
            self.web = WebServer(
                parse_metrics_address(self.cfg.metrics),
                self.sel,
                self.status,
                fleet.history.to_json,
                inherited=handoff.endpoint(resume, "metrics", self.cfg.metrics),
            )
            log.info("metrics on %s/metrics, dashboard on %s/", self.web.url, self.web.url)
        if self.cfg.health:
            address = parse_metrics_address(self.cfg.health, "--health")
            self.health = HealthServer(
                address,
                self.sel,
                lambda: self.status().health_snapshot(),
                inherited=handoff.endpoint(resume, "health", self.cfg.health),
            )
            log.info("health on %s/healthz (and HAProxy's agent check)", self.health.url)
        fx.notify_name = (
            "\0" + resume.manifest["notify"]
            if resume is not None
            else f"\0portshard/{os.getpid()}/{os.urandom(6).hex()}"
        )
        notify = resume.take("notify") if resume is not None else None
        if notify is not None:  # the predecessor's, with what was sent while none read it
            self._notify.close()
            self._notify = socket.socket(fileno=notify)
        else:
            self._bind_notify(fx.notify_name)
        self._notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._notify.setblocking(False)
        self.sel.register(self._notify, selectors.EVENT_READ, self._on_notify)
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._on_wakeup)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (*HANDLED, *IGNORED):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        # An upgrade's exec left them blocked (upgrade.py): what arrived meanwhile comes now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals())
        self.succession.start_warden()
        log.info(
            "listening on %s with %d workers; control socket %s",
            ", ".join(str(a) for a in fx.bound),
            len(fleet.slots),
            path,
        )

    def _bind_notify(self, name: str) -> None:
        try:
            self._notify.bind(name)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or self.resume is None:
                raise
            # A predecessor (or its warden) that did not hand the socket over and still holds
            # it: a newer portshard's that does not know us (a downgrade).
            raise SupervisorError(
                f"cannot bind the workers' notify address @{name[1:]}: another process holds "
                f"it ({exc.strerror}), most likely the warden of a newer portshard that did "
                f"not hand it over (a downgrade); its workers serve on: adopt them with that "
                f"portshard (or a newer one), or stop them and start afresh"
            ) from None

    @staticmethod
    def signals() -> set[int]:
        """Every signal the loop handles or ignores with a log line."""
        return {*HANDLED, *IGNORED}

    def _teardown(self) -> None:
        if not self.succession.abandoned:
            self.succession.warden.bye()
        signal.set_wakeup_fd(-1)
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        if self.fx.control is not None:
            self.fx.control.shutdown()
        if self.web is not None:
            self.web.close()
        if self.health is not None:
            self.health.close_all()
        if self.fx.steering is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(self.fx.steering.wake)
            self.fx.steering.close()
        if self.fx.trees is not None and not self.succession.abandoned:
            self.fx.trees.close()  # (abandoned: the warden keeps them)
        if self.fx.output is not None:
            self.fx.output.close()
        for slot in self.fleet.slots:
            for sock in slot.socks:
                sock.close()
        for s in (self._notify, self._wake_r, self._wake_w):
            s.close()
        self.sel.close()

    # ---- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped; return the exit code (0 after a requested stop)."""
        fleet = self.fleet
        try:
            self._setup()
            if self.resume is None:
                fleet.boot()
            else:
                kept = handoff.kept_keys(self.resume, self.cfg)
                fleet.resume(then_reload=kept != self.resume.manifest["listen"])
                if (drain := handoff.unfinished_drain(self.resume)) is not None:
                    log.warning("the supervisor that died was draining: carrying on")
                    fleet.drain(drain)
                self.resume = None
            timeout = 0.0
            while fleet.exit_code is None:
                events = self.sel.select(timeout)
                for key, mask in events:
                    self._guard(f"handling fd {key.fd}", key.data, mask)
                if events or time.monotonic() >= self._next_tick:
                    self._tick()
                    timeout = self._timeout()
                else:  # woken only for steering's next look: the rest is not due
                    timeout = self._steer_tick()
        except BaseException as exc:
            if not self.succession.abandon(exc):
                fleet.kill_everything()
            raise
        finally:
            self._teardown()
        return fleet.exit_code

    def _timeout(self) -> float:
        now = time.monotonic()
        timeout = TICK if self.fleet.busy() or self.succession.upgrade is not None else 1.0
        for d in self.fleet.deadlines():
            timeout = min(timeout, max(0.0, d - now))
        self._next_tick = now + timeout
        if self.fx.steering is not None and not self.fleet.stopping:
            timeout = min(timeout, self.fx.steering.due(now))
        return timeout

    def _tick(self) -> None:
        now = time.monotonic()
        self._guard("checking workers", self.fleet.tick, now)
        self._guard("steering", self.fx.steer)
        self._guard("updating the warden", self.succession.sync, now)
        if self.succession.upgrade is not None:
            self._guard("upgrading", self.succession.poll_upgrade)
        if self.fx.control is not None:
            self._guard("expiring control connections", self.fx.control.expire, now)
        if now >= self._next_sample:
            self._next_sample = now + SAMPLE_EVERY
            self._guard("sampling", self._sample)
        for endpoint in (self.web, self.health):
            if endpoint is not None:
                self._guard(f"expiring {endpoint.name} connections", endpoint.expire, now)

    def _steer_tick(self) -> float:
        """A wake-up for steering's next look (every 20-100 ms under load) and nothing else:
        no event came and no timer of the fleet is due, so checking the workers, the control
        connections and the endpoints can wait for the next whole tick (at most 1 s, or
        TICK while something is in progress: as without steering). Returns the next timeout."""
        steering = self.fx.steering
        try:
            look = steering is None or steering.peek(time.monotonic())
        except Exception:  # a bug: the guarded step below runs instead, and logs it
            look = True
        if look:
            self._guard("steering", self.fx.steer)
            self._guard("updating the warden", self.succession.sync, time.monotonic())
        # Nothing of the fleet's changed (no event), so neither did its timers: the next
        # whole tick stays where _timeout put it.
        now = time.monotonic()
        timeout = max(0.0, self._next_tick - now)
        if steering is not None and not self.fleet.stopping:
            timeout = min(timeout, steering.due(now))
        return timeout

    def _guard(self, what: str, fn: Callable[..., object], *args: object) -> None:
        """Run one operation of the loop; an error in it is logged (at most once per
        ``GUARD_LOG_EVERY`` s for the same operation) and ends only that operation: the
        service keeps serving (EMFILE, a /proc we may not read, a bug). Only a stop ends it."""
        try:
            fn(*args)
        except Exception as exc:
            now = time.monotonic()
            last, held = self._guard_log.get(what, (-GUARD_LOG_EVERY, 0))
            if now - last < GUARD_LOG_EVERY:
                self._guard_log[what] = (last, held + 1)
                return
            self._guard_log[what] = (now, 0)
            more = f" ({held} more in the last {GUARD_LOG_EVERY:g}s)" if held else ""
            log.error("error while %s: %r%s; carrying on", what, exc, more, exc_info=True)

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
            if pid is not None and b"READY=1" in data.split(b"\n"):
                self.fleet.notified_ready(pid)

    def _on_signal(self, signum: int, _frame: object) -> None:
        """The Python-level handler (the wake-up fd carries the signal to the loop): notes when
        a stop signal arrived, in the main thread between two bytecodes, soon after."""
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._stops_arrived.append(time.monotonic())

    def _on_wakeup(self, _mask: int) -> None:
        try:
            data = self._wake_r.recv(512)
        except BlockingIOError:
            return
        for signum in array.array("B", data):
            name = _signal_name(signum)
            if signum in (signal.SIGTERM, signal.SIGINT):
                now = self._stops_arrived.popleft() if self._stops_arrived else time.monotonic()
                if self.fleet.stopping and now - self._stop_signalled < SAME_SIGNAL:
                    log.info(
                        "%s again %.0f ms after the first: the same request (`timeout` sends it "
                        "twice); send it again to kill every worker now",
                        name,
                        (now - self._stop_signalled) * 1000,
                    )
                elif self.fleet.stopping:
                    log.warning("second %s: killing every worker now", name)
                    self.fleet.quit()
                else:
                    log.info("%s: stopping gracefully", name)
                    self._stop_signalled = now
                    self.fleet.stop()
            elif signum == signal.SIGQUIT:
                log.warning("SIGQUIT: killing every worker now")
                self.fleet.quit()
            elif signum == signal.SIGHUP:
                log.info("SIGHUP: reloading")
                try:
                    self.fleet.reload(Outcome())
                except PortshardError as exc:
                    log.error("reload refused: %s", exc)
            elif signum == signal.SIGUSR1:
                log.info("SIGUSR1: reopened %d log file(s)", reopen_log_files())
            elif signum == signal.SIGUSR2:
                log.info("SIGUSR2: upgrading")
                try:
                    self.succession.begin_upgrade(None)
                except PortshardError as exc:
                    log.error("upgrade refused: %s", exc)
            else:
                log.info("%s: ignored (it means nothing to portshard)", name)

    # ---- steering ---------------------------------------------------------------------------

    def _setup_steering(self) -> None:
        if self.cfg.migrate:
            self._set_migrate_req()
        self.fx.steering = steering = Steering.create(
            self.cfg.steering,
            [spec.address.proto for spec in self.cfg.listen],
            {slot.index: list(slot.socks) for slot in self.fleet.slots},
            on_event=lambda text: self.fleet.history.event("steering", text),
            seed=self.succession.steering_seed(),
            inherited=self.succession.inherited_maps(),
            listen_group=self.fx.trees.listen_group() if self.fx.trees else None,
        )
        if steering is None and not self.fx.owns_sockets:
            log.warning(
                "--via reuseport: each copy binds its own socket; one that exits (a reload, a "
                "crash) takes its socket with it, and the kernel %s; no steering",
                "hands what was queued on it to the others (tcp_migrate_req=1)"
                if migrate_req() == 1
                else "resets what was queued on it (tcp_migrate_req is not 1: --migrate "
                "sets it; or use --via auto, where portshard keeps the sockets)",
            )
            return
        if steering is None:
            if self.resume is not None:
                # A predecessor killed in a scale down left its "first k sockets" program on
                # the group (or ran a steering program: an upgrade may turn it off): the
                # adopted slots past k got no connection at all while status said ready.
                self.fx.all_slots()
            log.info("steering: off: the kernel hashes over every slot")
            return
        # Idle, the first connection queued on a listener wakes the loop (a steering look
        # at once, not up to an idle interval later: issue 11's "found within 100 ms").
        self.sel.register(steering.wake, selectors.EVENT_READ, self._on_steering_wake)
        log.info(
            "steering: %s (%s); a dead worker's queue %s",
            steering.backend,
            steering.why,
            "is handed to the other slots"
            if steering.can_migrate()
            else "waits for its replacement (tcp_migrate_req=0; --migrate sets it)",
        )

    def _on_steering_wake(self, _mask: int) -> None:
        if self.fx.steering is not None:
            self.fx.steering.woken(time.monotonic())

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

    # ---- sampling ----------------------------------------------------------------------------

    def _sample(self) -> None:
        """Once a second: each slot's queue depth and the connections its worker holds (from
        the kernel's in-flight counts where eBPF steering has them, at a cost per slot; else
        walked per connection, less often as they grow: steering/held.py)."""
        ports = self.fx.tcp_ports()
        workers = {slot.index: w for slot in self.fleet.slots if (w := slot.serving()) is not None}
        steering = self.fx.steering
        in_flight = steering.in_flight() if steering is not None else None
        if in_flight is None and self._held_walk.due(now := time.monotonic()):
            # Most of the time a worker holds no socket but its listeners: no table walk.
            busy = [w.pid for w in workers.values() if ports and self._holds_sockets(w)]
            try:
                walked = sockdiag.connections_by_pid(busy, ports=ports) if busy else {}
            except (OSError, InspectError):
                walked = {}
            self._held_walk.done(now, walked, time.monotonic() - now)
        counts = self._held_walk.counts
        self._rate_new_connections()
        rows = []
        for slot in self.fleet.slots:
            w = workers.get(slot.index)
            queued = sum(tcpinfo.queue_depth(sock).queued for sock in slot.queue_fds())
            conns = counts.get(w.pid, 0) if w is not None and ports else None
            if in_flight is not None and w is not None and ports:
                conns = max(0, in_flight.get(slot.index, 0) - queued)
            self._connections[slot.index] = conns
            rows.append(
                {
                    "slot": slot.index,
                    "pid": w.pid if w else None,
                    "state": w.state.value if w else SlotState.EMPTY.value,
                    "queued": queued,
                    "connections": conns,
                    "cpu": worker_cpu(w.pid) if w else None,  # None if unreadable
                    "new_per_s": self._new_per_s.get(slot.index),
                }
            )
        self.fleet.history.add(rows)

    def _holds_sockets(self, w: Worker) -> bool:
        """``w`` holds a socket besides its listeners (a /proc we may not read, e.g. a
        non-dumpable worker of a non-root supervisor, or EMFILE: count it, look closer)."""
        try:
            return bool(proc.sockets_of(w.pid) - self.fx.listeners_of(w))
        except (OSError, InspectError):
            return True

    def _rate_new_connections(self) -> None:
        """New connections per second for each slot, where the eBPF steering program counts
        them (the kernel keeps no per-listener count; classic BPF cannot count)."""
        steering = self.fx.steering
        totals = steering.handed() if steering is not None else None
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

    # ---- control and status -----------------------------------------------------------------

    def _on_request(self, request: dict[str, Any], conn: Connection) -> bytes | None:
        cmd = request["cmd"]
        if cmd == "status":
            return protocol.reply_ok(self.status().to_json())
        if cmd == "stop":
            self.fleet.stop()
            return protocol.reply_ok({"stopping": True})
        if cmd == "upgrade":
            self.succession.begin_upgrade(conn)
            return None
        if cmd == "drain":
            drain = parse_drain(request)
            self.fleet.drain(drain, conn if drain.wait else None)
            return None if drain.wait else protocol.reply_ok({"draining": True})
        # The outcome carries the reply: a change that fails at once (the spawn fails) has
        # finished before we return, and its waiter must still hear about it.
        outcome = Outcome()
        if cmd == "reload":
            self.fleet.reload(outcome)
        else:
            count = request.get("workers")
            if isinstance(count, bool) or not isinstance(count, int):
                raise ControlError(f"scale needs an integer 'workers', not {count!r}")
            if count > len(self.fleet.slots):
                captured = self.fx.output is not None
                too_few = fdlimit.refusal(count, len(self.cfg.listen), captured=captured)
                if too_few is not None:
                    raise ControlError(f"scale {count}: {too_few}")
            self.fleet.scale(count, outcome)
        kept = {"kept": list(outcome.kept)}
        if not request.get("wait"):
            return protocol.reply_ok({"started": True, **kept})
        if outcome.done:
            if outcome.error:
                return protocol.reply_error(outcome.error)
            return protocol.reply_ok({**self.status().to_json(), **kept})
        outcome.waiters.append(conn)
        return None

    def status(self) -> Status:
        now = time.monotonic()
        fleet, fx, steering = self.fleet, self.fx, self.fx.steering
        listen = tuple(
            ListenStatus(spec.name, str(addr), addr.proto.value, addr.port)
            for spec, addr in zip(self.cfg.listen, fx.bound, strict=True)
        )
        return Status(
            name=self.cfg.name,
            pid=os.getpid(),
            uptime=round(now - self.started, 3),
            generation=fleet.generation,
            stopping=fleet.stopping,
            ready=fleet.booted,
            reloads_ok=fleet.reloads["ok"],
            reloads_failed=fleet.reloads["failed"],
            listen=listen,
            workers=len([s for s in fleet.slots if not s.removing]),
            slots=tuple(self._slot_status(slot, now) for slot in fleet.slots),
            metrics=f"{self.web.url}/metrics" if self.web else None,
            dashboard=f"{self.web.url}/" if self.web else None,
            kernel=listen_drop_counters(),
            steering=(
                steering.status()
                if steering
                else {"backend": "off", "why": f"--steering {self.cfg.steering}"}
            ),
            steering_changes=steering.changes if steering else 0,
            state=fleet.state,
            health=self.health.url if self.health else None,
            supervisor=self.succession.lineage,
        )

    def _slot_status(self, slot: Slot, now: float) -> SlotStatus:
        w = slot.serving()
        queues: dict[str, QueueStatus] = {}
        for spec, sock in zip(self.cfg.listen, slot.socks, strict=self.fx.owns_sockets):
            if spec.address.proto is Proto.TCP:
                depth = tcpinfo.queue_depth(sock)
                queues[spec.name] = QueueStatus(depth.queued, depth.backlog)
        steering = self.fx.steering
        return SlotStatus(
            slot=slot.index,
            pid=w.pid if w else None,
            state=slot.shown(),
            restarts=slot.restarts,
            generation=slot.generation,
            uptime=round(now - w.started, 3) if w else None,
            mode=w.mode if w else None,
            queue=queues,
            connections=self._connections.get(slot.index),
            new_per_s=self._new_per_s.get(slot.index),
            new_total=self._handed[1].get(slot.index) if self._handed else None,
            steering=steering.slot_status(slot.index) if steering else None,
            workers=tuple(
                WorkerStatus(x.pid, x.state, x.generation, x.adopted) for x in slot.live()
            ),
            failures=slot.backoff.strikes,
        )
