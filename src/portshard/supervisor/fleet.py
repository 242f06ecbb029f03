"""The lifecycle of the whole supervisor: its slots, their workers, and the one place that
carries out what the state machines return.

``Fleet`` holds the state (the supervisor's machine, the slots, the generation) and has the
verbs the loop and the procedures call: :meth:`fire` (a worker event), :meth:`fire_slot`,
:meth:`fire_supervisor`, :meth:`on_exit` (crash handling), :meth:`check` (timers and
readiness), and the requests :meth:`reload`, :meth:`scale`, :meth:`stop`, :meth:`quit`. Every
action a table returns is carried out by :meth:`apply`, through an :class:`Effects`; nothing
here touches a process or a socket itself, so the whole lifecycle runs against a fake.
"""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..control import protocol
from ..control.server import Connection
from ..errors import ControlError, PortshardError
from . import procedures
from .config import Config, plan_reload
from .drain import Drain, DrainRequest
from .effects import Effects
from .history import History
from .state import (
    SUPERVISOR_TABLE,
    Action,
    Event,
    Lifecycle,
    Machine,
    SlotEvent,
    State,
    SupervisorEvent,
    SupervisorState,
)
from .tasks import CancelScope, Scheduler
from .worker import Slot, Worker, log_fields

log = logging.getLogger("portshard.supervisor")

__all__ = ["Fleet", "Outcome"]

STOPPING_REASON = "the supervisor is stopping"
DRAINING_REASON = "the supervisor is draining (portshard drain): it stops soon"


@dataclass
class Outcome:
    """The result of a reload or scale, for a deferred control reply."""

    ok: bool = True
    error: str = ""
    done: bool = False
    waiters: list[Connection] = field(default_factory=list)
    kept: tuple[str, ...] = ()  # settings a reload could not change, and why (for the reply)


class Fleet:
    def __init__(self, cfg: Config, cli: dict[str, Any], fx: Effects) -> None:
        self.cfg = cfg
        self.cli = cli
        self.fx = fx
        self.slots: list[Slot] = []
        self.machine: Machine[SupervisorState, SupervisorEvent] = Machine(
            SUPERVISOR_TABLE, SupervisorState.BOOTING
        )
        self.booted = False  # BOOTED fired once (status "ready" stays true while stopping)
        self.change: str | None = None  # "reload" or "scale" while CHANGING
        self.last_error = ""  # the last change's error, for systemd's status line
        self.fatal: str | None = None
        self.stop_code = 0
        self.exit_code: int | None = None
        self.generation = 0
        self.reloads = {"ok": 0, "failed": 0}
        self.history = History()
        self.scheduler = Scheduler(fx.now)
        self.scope = CancelScope()  # boot, reload and scale run in it; a stop cancels it
        self.on_ready: Callable[[], None] | None = None
        self.report: Callable[[], dict[str, Any]] = dict  # the status, for deferred replies
        self.draining: Drain | None = None  # a host drain asked for (portshard drain)
        self.deadline_at: float | None = None  # its deadline (armed by ARM_DEADLINE)

    @property
    def state(self) -> SupervisorState:
        return self.machine.state

    @property
    def stopping(self) -> bool:
        return self.state in (SupervisorState.STOPPING, SupervisorState.STOPPED)

    # ---- firing events: the only way states change ------------------------------------------

    def fire(self, w: Worker, event: Event) -> None:
        self.apply(w.life.fire(event, self.fx.now()), worker=w)

    def fire_slot(self, slot: Slot, event: SlotEvent) -> None:
        self.apply(slot.machine.fire(event), slot=slot)

    def fire_supervisor(self, event: SupervisorEvent) -> None:
        if event is SupervisorEvent.BOOTED:
            self.booted = True
        self.apply(self.machine.fire(event))

    def apply(
        self, actions: tuple[Action, ...], *, worker: Worker | None = None, slot: Slot | None = None
    ) -> None:
        """Carry out what a table returned (the effects layer's one entry)."""
        for action in actions:
            if worker is not None:
                self._apply_worker(worker, action)
            elif slot is not None:
                self._apply_slot(slot, action)
            else:
                self._apply_supervisor(action)

    def _apply_worker(self, w: Worker, action: Action) -> None:
        fx = self.fx
        if action is Action.KILL:
            fx.signal(w, signal.SIGKILL)
        elif action is Action.STOP_SIGNAL:
            fx.signal(w, w.slot.cfg.stop_signal)
            fx.signal(w, signal.SIGCONT)  # a frozen tree must run to obey it
        elif action is Action.FREEZE:
            fx.signal(w, signal.SIGSTOP)
        elif action is Action.THAW:
            fx.signal(w, signal.SIGCONT)
        elif action is Action.ARM_KILL_TIMER:
            w.life.kill_at = fx.now() + w.stop_timeout
        elif action is Action.ARM_GRACE_TIMER:
            w.life.kill_at = fx.now() + w.slot.cfg.grace
        elif action is Action.DISARM_KILL_TIMER:
            w.life.kill_at = None
        elif action is Action.REAP:
            fx.reap(w)
        else:
            raise AssertionError(f"not a worker action: {action}")

    def _apply_slot(self, slot: Slot, action: Action) -> None:
        if action is Action.ARM_RESPAWN:
            slot.respawn_at = self.fx.now() + slot.delay
        elif action is Action.DISARM_RESPAWN:
            slot.respawn_at = None
        elif action is Action.SPAWN:
            self.spawn_or_fail(slot, "respawn")
        elif action is Action.CLOSE_SOCKETS:
            self.fx.close_slot(slot)
            self.slots.remove(slot)
        else:
            raise AssertionError(f"not a slot action: {action}")

    def _apply_supervisor(self, action: Action) -> None:
        if action is Action.CANCEL_PROCEDURES:
            draining = self.state is SupervisorState.DRAINING
            self.scope.cancel(DRAINING_REASON if draining else STOPPING_REASON)
        elif action is Action.CANCEL_RESPAWNS:
            for slot in self.slots:
                self.fire_slot(slot, SlotEvent.CANCEL)
        elif action is Action.BEGIN_STOP:
            self.scheduler.start(procedures.stop(self), on_error=self._stop_failed)
        elif action is Action.KILL_ALL:
            for slot in self.slots:
                for w in slot.live():
                    self.fire(w, Event.KILL)
        elif action is Action.AWAIT_EXIT:
            self.scheduler.start(procedures.await_exit(self))
        elif action is Action.NOTIFY_READY:
            failed = f"; last change failed: {self.last_error}" if self.last_error else ""
            self.fx.notify("ready", self.summary() + failed)
        elif action is Action.BEGIN_DRAIN:
            assert self.draining is not None
            task = procedures.drain_host(self, self.draining.settle)
            self.scheduler.start(task, on_error=self._drain_failed)
        elif action is Action.ARM_DEADLINE:
            self.deadline_at = self.draining.deadline_at if self.draining else None
        elif action is Action.DISARM_DEADLINE:
            self.deadline_at = None
        else:
            raise AssertionError(f"not a supervisor action: {action}")

    # ---- workers ----------------------------------------------------------------------------

    def spawn(self, slot: Slot, role: str, cfg: Config | None = None) -> Worker:
        generation = self.generation if role in ("reload", "scale", "boot") else slot.generation
        w = self.fx.spawn(slot, role, cfg or slot.cfg, generation)
        slot.workers.append(w)
        self.fire_slot(slot, SlotEvent.SPAWNED)
        return w

    def spawn_or_fail(self, slot: Slot, role: str) -> Worker | None:
        """Spawn; a failure at boot stops the supervisor, a failed respawn (the command was
        moved away, a --user lookup failed, EMFILE) is that slot's crash: it backs off."""
        try:
            return self.spawn(slot, role)
        except (PortshardError, OSError) as exc:
            if role != "respawn":
                self.fail(str(exc))
                return None
            log.error(
                "slot %d: cannot start its worker: %s",
                slot.index,
                exc,
                extra=log_fields(slot.index),
            )
            self.history.event("crash", f"slot {slot.index}: cannot start its worker: {exc}")
            self._back_off(slot, 0.0, own=True, last=f"cannot start: {exc}")
            return None

    def check(self, w: Worker, now: float) -> None:
        """Timers and readiness by observation, every tick."""
        if w.life.kill_at is not None and now >= w.life.kill_at and w.life.alive:
            log.warning(
                "slot %d pid %d: did not stop within the grace time; SIGKILL",
                w.slot.index,
                w.pid,
                extra=w.fields,
            )
            self.fire(w, Event.TIMER)
        if w.state is State.STARTING:
            if self.fx.is_ready(w, now):
                self.fire(w, Event.READY)
                log.info(
                    "slot %d pid %d: ready after %.3fs",
                    w.slot.index,
                    w.pid,
                    now - w.started,
                    extra=w.fields,
                )
                self.fx.became_ready(w)
            elif now - w.started > w.slot.cfg.ready_timeout:
                self._ready_timeout(w)

    def notified_ready(self, pid: int) -> None:
        """READY=1 from ``pid`` (sd_notify)."""
        for slot in self.slots:
            for w in slot.workers:
                if w.pid == pid and w.state is State.STARTING:
                    self.fire(w, Event.READY)
                    log.info(
                        "slot %d pid %d: ready (notify) after %.3fs",
                        slot.index,
                        pid,
                        self.fx.now() - w.started,
                        extra=w.fields,
                    )

    def _ready_timeout(self, w: Worker) -> None:
        cfg = w.slot.cfg
        reason = (
            f"slot {w.slot.index} pid {w.pid}: not ready within {cfg.ready_timeout:g}s "
            f"(--ready {cfg.ready}); "
            + {
                "notify": "the program must send READY=1 to $NOTIFY_SOCKET "
                "(portshard.notify_ready())",
                "accept": "it never waited for connections on its inherited socket (fd 3...); "
                "does it use $LISTEN_FDS, or bind a port of its own?",
                "delay": "raise --ready-timeout",
            }[cfg.ready.kind]
        )
        if w.role == "boot":  # the boot fails with it: fail() logs the reason, once
            self.fire(w, Event.READY_TIMEOUT)
            self.fail(reason)
            return
        log.error("%s; killing it", reason, extra=w.fields)
        self.fire(w, Event.READY_TIMEOUT)

    def on_exit(self, w: Worker) -> None:
        """``w``'s pidfd is readable: reap it, then respawn its slot, back off or give up."""
        self.fire(w, Event.EXIT)
        slot = w.slot
        slot.workers.remove(w)
        if w.life.retiring:
            log.info(
                "slot %d pid %d: retired (%s)%s%s",
                slot.index,
                w.pid,
                w.describe_exit(),
                _handover_times(w.life, self.fx.now()),
                _killed_with_it(w),
                extra=w.fields,
            )
        else:
            log.warning(
                "slot %d pid %d: exited (%s)%s",
                slot.index,
                w.pid,
                w.describe_exit(),
                _left_behind(w) if w.ready else "",
                extra=w.fields,
            )
        if slot.live():
            return
        if w.life.retiring and not (self.stopping or slot.removing):
            # Retired for a replacement that is gone too: it died after it was judged ready,
            # while this one was being retired (its exit, the slot not empty yet, started
            # nothing). Before, the slot stayed empty for good, the reload said done, and
            # status showed a slot with no worker (a fault campaign's worker SIGKILL).
            log.warning(
                "slot %d pid %d: its replacement is gone too; the slot starts a new one",
                slot.index,
                w.pid,
                extra=w.fields,
            )
            self.fx.rescue(slot, w.pid)
            self._back_off(slot, math.inf, own=False, last="its replacement exited")
            return
        if w.life.retiring or self.stopping or slot.removing:
            self.fire_slot(slot, SlotEvent.EMPTIED)
            return
        self.fx.rescue(slot, w.pid)
        if w.role == "reload" and not w.ready:
            self.fire_slot(slot, SlotEvent.EMPTIED)
            return  # a replacement that never became ready: the reload reports it
        if w.role == "boot" and not w.ready:
            self.fire_slot(slot, SlotEvent.EMPTIED)
            why = "the program cannot start; run it by hand to see why"
            if w.left:  # by hand it "works": it forked into the background and returned
                why = _left_behind(w)[2:]
            self.fail(
                f"the worker for slot {slot.index} exited before it was ready "
                f"({w.describe_exit()}): {why}"
            )
            return
        self._crashed(slot, w)

    def _crashed(self, slot: Slot, w: Worker) -> None:
        self.history.event("crash", f"slot {slot.index} pid {w.pid} {w.describe_exit()}")
        uptime = self.fx.now() - w.started if w.ready else 0.0
        self._back_off(
            slot, uptime, own=not (w.ready and w.killed_by_sigkill), last=w.describe_exit()
        )

    def _back_off(self, slot: Slot, uptime: float, *, own: bool, last: str) -> None:
        """Respawn ``slot`` after its backoff delay. A slot that keeps failing goes on retrying
        at the longest delay while another slot serves (its trouble is not an outage); only
        when no other slot has a ready worker does the supervisor give up."""
        backoff = slot.backoff
        delay = backoff.on_exit(uptime, own=own)
        if delay is None:
            if not self._others_ready(slot):
                self.fire_slot(slot, SlotEvent.EMPTIED)
                self.fail(
                    f"the worker for slot {slot.index} failed {backoff.strikes} times in a row "
                    f"within {backoff.healthy_after:g}s of starting (last: {last}); "
                    f"giving up instead of crash-looping; fix the program and start again"
                )
                return
            delay = backoff.cap
            if backoff.strikes == backoff.give_up_after:
                text = (
                    f"slot {slot.index}: its worker failed {backoff.strikes} times in a row within "
                    f"{backoff.healthy_after:g}s of starting (last: {last}); the other slots "
                    f"serve; retrying every {delay:g}s"
                )
                log.error("%s", text, extra=log_fields(slot.index))
                self.history.event("failing", text)
        slot.restarts += 1
        slot.delay = delay
        self.fire_slot(slot, SlotEvent.CRASHED)
        if delay:
            log.warning(
                "slot %d: respawning in %.2fs", slot.index, delay, extra=log_fields(slot.index)
            )

    def _others_ready(self, slot: Slot) -> bool:
        return any(
            (w := s.serving()) is not None and w.state is State.READY
            for s in self.slots
            if s is not slot and not s.removing
        )

    def tick(self, now: float) -> None:
        for slot in list(self.slots):
            for w in list(slot.workers):
                self.check(w, now)
            if slot.respawn_at is not None and now >= slot.respawn_at:
                self.fire_slot(slot, SlotEvent.RESPAWN_DUE)
        if self.deadline_at is not None and now >= self.deadline_at:
            self._deadline_passed()
        self.scheduler.step()

    def deadlines(self) -> list[float]:
        """Every armed timer (the loop sleeps no longer than the nearest)."""
        timers = [w.life.kill_at for s in self.slots for w in s.workers if w.life.kill_at]
        timers += [self.deadline_at] if self.deadline_at is not None else []
        return timers + [s.respawn_at for s in self.slots if s.respawn_at is not None]

    def busy(self) -> bool:
        """Something is in progress (a procedure, a worker to watch for readiness)."""
        return bool(self.scheduler) or any(
            w.state is State.STARTING for s in self.slots for w in s.workers
        )

    # ---- requests ---------------------------------------------------------------------------

    def fail(self, reason: str) -> None:
        if self.fatal is None:
            self.fatal = reason
            log.error("%s", reason)
        self.stop(code=1)

    def stop(self, code: int = 0) -> None:
        if not self.stopping:
            self.stop_code = code
        self.fire_supervisor(SupervisorEvent.STOP)

    def drain(self, req: DrainRequest, waiter: Connection | None = None) -> None:
        """portshard drain (drain.py, procedures.drain_host); a second one, or one during a
        stop, joins: it waits for the same end, and the earlier deadline wins."""
        if self.state is SupervisorState.STOPPED:  # every worker gone, exiting
            raise ControlError("the supervisor has stopped already; nothing to drain")
        now = self.fx.now()
        if self.draining is None:
            self.draining = Drain(req.settle, now)
            log.info("%s", req.describe())
            self.history.event("drain", req.describe())
        self.draining.join(req, now, waiter)
        self.fire_supervisor(SupervisorEvent.DRAIN)

    def _deadline_passed(self) -> None:
        assert self.draining is not None
        log.error("%s", self.draining.expired(sum(len(s.live()) for s in self.slots)))
        self.stop_code = 1
        self.fire_supervisor(SupervisorEvent.DEADLINE)

    def _drain_failed(self, exc: Exception) -> None:
        log.error("drain: internal error; stopping now", exc_info=exc)
        self.stop()

    def quit(self) -> None:
        """Kill every worker now (SIGQUIT, a second SIGTERM)."""
        self.fire_supervisor(SupervisorEvent.QUIT)

    def kill_everything(self) -> None:
        """The loop is dying (an exception): SIGKILL every live worker, no questions."""
        for slot in self.slots:
            for w in slot.live():
                self.fx.signal(w, signal.SIGKILL)

    def _refuse(self, what: str) -> None:
        """Raise the refusal of a reload or scale now, if there is one."""
        state = self.state
        if state is SupervisorState.DRAINING:
            raise ControlError(f"{DRAINING_REASON}; no {what} now")
        if state in (SupervisorState.STOPPING, SupervisorState.STOPPED):
            tail = "; nothing to reload" if what == "reload" else ""
            raise ControlError(f"{STOPPING_REASON}{tail}")
        if state is SupervisorState.BOOTING:
            raise ControlError("the workers are still starting; try again when status says ready")
        if state is SupervisorState.CHANGING:
            raise ControlError(f"a {self.change} is already in progress; wait for it to finish")

    def reload(self, outcome: Outcome) -> Outcome:
        self._refuse("reload")
        plan = plan_reload(self.cfg, self.cli)
        for line in plan.kept:
            log.warning("reload: %s", line)
        if plan.scale_to is not None:
            log.info(
                "reload: workers changed in %r to %d: scaling to it after the reload",
                self.cfg.config_file,
                plan.scale_to,
            )
        outcome.kept = plan.kept
        self.fire_supervisor(SupervisorEvent.CHANGE)
        self.change = "reload"
        self.scheduler.start(
            procedures.reload(self, plan.config, outcome, scale_to=plan.scale_to),
            self.scope,
            self._change_failed(outcome),
        )
        return outcome

    def scale(self, count: int, outcome: Outcome) -> Outcome:
        if self.stopping:
            self._refuse("scale")
        if not 1 <= count <= 1024:
            raise ControlError(f"scale {count}: the worker count must be 1-1024")
        self._refuse("scale")
        self.fire_supervisor(SupervisorEvent.CHANGE)
        self.change = "scale"
        self.scheduler.start(
            procedures.scale(self, count, outcome), self.scope, self._change_failed(outcome)
        )
        return outcome

    # ---- a procedure that raised (a bug, an OS error): contain it -----------------------------

    def boot(self) -> None:
        self.scheduler.start(procedures.boot(self), self.scope, self._boot_failed)

    def resume(self, then_reload: bool = False) -> None:
        """Boot from a predecessor's workers (issue 15)."""
        self.scheduler.start(procedures.resume(self, then_reload), self.scope, self._boot_failed)

    def _boot_failed(self, exc: Exception) -> None:
        log.error("boot: internal error", exc_info=exc)
        self.fail(f"boot failed: {exc!r}")

    def _change_failed(self, outcome: Outcome) -> Callable[[Exception], None]:
        def failed(exc: Exception) -> None:
            log.error("%s: internal error", self.change or "change", exc_info=exc)
            for slot in self.slots:  # a replacement it started and did not judge goes
                for w in slot.live():
                    if w.state is State.STARTING and w.role in ("reload", "scale"):
                        self.fire(w, Event.KILL)
            if not outcome.done:
                self.finish(outcome, f"{self.change or 'change'} failed: internal error {exc!r}")

        return failed

    def _stop_failed(self, exc: Exception) -> None:
        log.error("stop: internal error; killing every worker", exc_info=exc)
        self.kill_everything()
        self.scheduler.start(procedures.await_exit(self))

    def retire(self, w: Worker) -> None:
        """Retire ``w`` (drain it); if that raises, kill it rather than leave it frozen."""

        def failed(exc: Exception) -> None:
            log.error("retiring pid %d: internal error; killing it", w.pid, exc_info=exc)
            if w.life.alive:
                self.fire(w, Event.KILL)

        self.scheduler.start(procedures.drain(self, w), on_error=failed)

    def finish(self, outcome: Outcome, error: str = "") -> None:
        """A reload or scale ended: record it, tell systemd, reply to who waits."""
        what = self.change or "change"
        if error:
            self.history.event(f"{what}_failed", error)
        else:
            self.history.event(what, f"{what} done: {self.summary()}")
        outcome.done = True
        self.change = None
        self.last_error = error
        self.fire_supervisor(SupervisorEvent.CHANGED)
        outcome.ok = not error
        outcome.error = error
        if error:
            log.error("%s", error)
        for conn in outcome.waiters:
            reply = (
                protocol.reply_error(error)
                if error
                else protocol.reply_ok({**self.report(), "kept": list(outcome.kept)})
            )
            self.fx.reply(conn, reply)

    def summary(self) -> str:
        ready = sum(1 for s in self.slots if (w := s.serving()) and w.state is State.READY)
        return f"{ready} of {len(self.slots)} workers ready, generation {self.generation}"

    def with_workers(self, count: int) -> None:
        self.cfg = replace(self.cfg, workers=count)


def _left_behind(w: Worker) -> str:
    """What a worker that exited after it was ready left running in its tree: a program that
    put a server in the background and returned. Every such exit respawns the slot and kills
    the server it left (a worker is its whole tree), and the log said only "exited (exit
    status 0)", every time."""
    if not w.left:
        return ""
    return (
        f"; it left pid {' '.join(map(str, w.left))} running (killed now): the program put "
        f"itself in the background (daemonized); run it in the foreground (nginx: "
        f"'daemon off;'; many servers: a --foreground or --no-daemon option)"
    )


def _killed_with_it(w: Worker) -> str:
    """The processes of a retired worker's tree still running when its main process exited:
    killed then, with whatever they held (named, so that a lost request can be traced)."""
    if not w.left:
        return ""
    return f"; {', '.join(f'pid {p}' for p in w.left)} of its tree still ran: killed"


def _handover_times(life: Lifecycle, now: float) -> str:
    """Where a drained worker's retirement went: finding it idle (the freeze-check), then its
    own shutdown after its stop signal (issue 12: hypercorn's, ~1 s on a busy machine)."""
    if life.idle_at is None or life.retired_at is None:
        return ""
    return (
        f"; found idle {life.idle_at - life.retired_at:.2f}s after its drain began, "
        f"exited {now - life.idle_at:.2f}s after its stop signal"
    )
