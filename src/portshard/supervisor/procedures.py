"""The supervisor's procedures: boot, reload, scale, retire one worker, stop.

Each is a generator over a :class:`Fleet` that yields ``Until`` waits (``tasks.py``) and fires
events; the scheduler steps it on every loop turn. Boot, reload and scale run in the fleet's
cancel scope: a stop throws ``Cancelled`` into them at their wait, and each undoes what it
must (a reload kills its not-yet-ready replacements and reports). Retiring a worker and the
stop itself are never cancelled. Nothing here touches a process or a socket: the fleet's
effects layer does.

Invariant (a reload): a slot has at most two workers, and the old one is retired only after
the new one is ready.
"""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import Callable, Generator, Iterable
from typing import TYPE_CHECKING

from ..errors import PortshardError
from .config import Config
from .state import Backoff, Event, SlotEvent, State, SupervisorEvent, SupervisorState
from .tasks import Cancelled, Task, Until
from .worker import Slot, Worker

if TYPE_CHECKING:  # the fleet starts these procedures; they only call back into it
    from .fleet import Fleet, Outcome

log = logging.getLogger("portshard.supervisor")

__all__ = [
    "await_exit",
    "boot",
    "drain",
    "drain_all",
    "drain_host",
    "reload",
    "resume",
    "scale",
    "stop",
]

FREEZE_SPIN = 0.005  # s to wait inline for a tree to stop (usually microseconds)
FREEZE_WAIT = 1.0  # s to wait for it at most; a tree not stopped by then is not looked at
GRACEFUL_WAIT = 1.0  # s of handover in which an idle frozen worker may get its stop signal
HOLD_SETTLE = 0.05  # s a hold waits for handshakes under way before it looks at the queue
HOLD_MAX = 0.8  # s a hold lasts at most: less than a SYN's first retransmission timeout (1 s)
# A busy UDP worker (a datagram may be in hand) stays frozen UDP_FROZEN s, then runs UDP_THAWED
# s to finish it, and is looked at again: while it runs it reads the socket it shares with its
# slot's new worker (and socat's RECVFROM,fork, two trees on one socket, loses datagrams then).
UDP_FROZEN = 0.015
UDP_THAWED = 0.005
CLIENTS_EXIT = 2.0  # s the supervisor waits for `drain --wait` clients to exit before it does


def boot(fleet: Fleet) -> Task:
    fleet.generation = 1
    for slot in fleet.slots:
        slot.generation = 1
        if fleet.spawn_or_fail(slot, "boot") is None:
            return
    try:
        yield Until(lambda: all(_serving_ready(s) for s in fleet.slots))
    except Cancelled:
        return
    _booted(fleet, "boot")


def _booted(fleet: Fleet, how: str) -> None:
    """Every slot serves: say so, give systemd its copies, tell who waits (boot or resume)."""
    log.info("all %d workers ready%s", len(fleet.slots), "" if how == "boot" else f" ({how}d)")
    fleet.history.event(how, f"{len(fleet.slots)} workers ready")
    fleet.fx.store(fleet.slots)
    fleet.fire_supervisor(SupervisorEvent.BOOTED)
    if fleet.on_ready is not None:
        fleet.on_ready()


def resume(fleet: Fleet, then_reload: bool = False) -> Task:
    """Boot from a predecessor's workers (issue 15: an upgrade or an adoption): start only the
    slots that have none; once every slot's worker is ready, retire the ones a reload was
    retiring when the predecessor went (and extra ones). ``then_reload``: --listen changed, so
    a reload gives every worker the new set of sockets."""
    for slot in fleet.slots:
        if not slot.live() and fleet.spawn_or_fail(slot, "respawn") is None:
            return

    def settled() -> bool:  # every slot serves, and a replacement left starting is judged
        starting = any(w.state is State.STARTING for s in fleet.slots for w in s.live())
        return not starting and all(_serving_ready(s) for s in fleet.slots)

    try:
        yield Until(settled)
    except Cancelled:
        return
    for slot in fleet.slots:
        serving = slot.serving()
        for w in slot.live():
            if w is not serving and (w.resume_retiring or w.state is State.READY):
                fleet.retire(w)
    _booted(fleet, "resume")
    if then_reload:
        from .fleet import Outcome

        log.info("--listen changed in the upgrade: reloading so that every worker gets it")
        fleet.reload(Outcome())


def _serving_ready(slot: Slot) -> bool:
    w = slot.serving()
    return w is not None and w.state is State.READY


# ---- retiring a worker ---------------------------------------------------------------------


def drain(fleet: Fleet, w: Worker) -> Task:
    """Retire ``w`` without losing what it holds; ends when it has exited."""
    if w.state in (State.STARTING, State.READY):
        fleet.fire(w, Event.DRAIN)
        fleet.fx.steer()  # its slot out now, not at the end of this loop turn: the first look
        # can find it shielded (measured: 0.08-0.23 s from drain to idle under load, before)
    if w.state is State.DRAINING:
        cfg = w.slot.cfg
        if cfg.drain in ("freeze", "freeze-kill"):
            yield from _freeze_check_kill(fleet, w, fleet.fx.now() + cfg.grace)
        if w.state is State.DRAINING:  # --drain signal, or freeze found no idle moment
            fleet.fire(w, Event.DRAINED)
    yield Until(lambda: not w.life.alive)


def _freeze_check_kill(fleet: Fleet, w: Worker, deadline: float) -> Generator[Until, bool, None]:
    """Freeze, check, retire: a stopped task leaves the accept wait queue, so the queue goes to
    the slot's other worker; if the frozen tree holds no connection, nothing can be lost.

    It gets its stop signal (its shutdown runs) only while no new connection can reach its
    slot's socket: a server that handles the signal (node's default handler, aiohttp, uvicorn)
    accepts what reaches the shared socket before it exits or stops listening, and closes it
    unread (measured: node 1 reset in ~10k exchanges over 5 reloads in 1 of 3 runs, aiohttp 3
    empty in 8.5k). Steering keeps new connections off the slot while it hands over; where it
    cannot (steering off, a single slot, or no idle moment within GRACEFUL_WAIT s, when the
    slot is back in), the slot's socket drops new SYNs for the moment the old worker needs to
    stop listening (``_hold_and_signal``). Where it cannot do that either (``--via
    reuseport``: the worker's own socket; a UDP socket; a kernel that refuses us a socket
    filter), the idle frozen tree is killed:
    nothing lost, and its shutdown does not run."""
    fx = fleet.fx
    graceful_until = fx.now() + GRACEFUL_WAIT
    stopped = True
    datagrams = any(s.type == socket.SOCK_DGRAM for s in w.slot.socks)
    while w.state is State.DRAINING and fx.now() < deadline:
        fleet.fire(w, Event.FREEZE)
        stopped = fx.tree_stopped(w, FREEZE_SPIN)
        if not stopped:
            stopped = yield Until(
                lambda: not w.life.alive or fx.tree_stopped(w, 0.0), fx.now() + FREEZE_WAIT
            )
        if w.state is not State.DRAINING:
            return  # exited or killed meanwhile
        if not stopped:
            # A tree that still runs may accept between the look and its stop signal, and
            # die on it with that request: before, the look went ahead after this wait.
            log.warning(
                "slot %d pid %d: its tree did not stop within %gs of being frozen; letting it "
                "run and looking again",
                w.slot.index,
                w.pid,
                FREEZE_WAIT,
                extra=w.fields,
            )
        elif not fx.holds_connections(w):
            if w.slot.cfg.drain == "freeze-kill":
                fleet.fire(w, Event.IDLE_KILL)
                return
            # else: steering takes the slot out at its next turn, or its queue empties: look again
            if fx.shielded(w.slot) and fx.queue_empty(w.slot):
                fleet.fire(w, Event.IDLE)
                return
            if fx.now() >= graceful_until or not (fx.steers() or fleet.stopping):
                if fx.can_hold(w.slot):
                    yield from _hold_and_signal(fleet, w)
                    return
                log.info(
                    "slot %d pid %d: idle, but nothing keeps new connections off its slot "
                    "(--via reuseport, a UDP socket, or no socket filter allowed); killing it "
                    "frozen (nothing lost; its shutdown does not run)",
                    w.slot.index,
                    w.pid,
                    extra=w.fields,
                )
                fleet.fire(w, Event.IDLE_KILL)
                return
        if datagrams:  # it shares its socket with the new worker: run it only to finish
            yield Until(lambda: not w.life.alive, fx.now() + UDP_FROZEN)
            if w.state is not State.DRAINING:
                return
        fleet.fire(w, Event.THAW)
        yield fleet.scheduler.sleep(UDP_THAWED if datagrams else 0.02)
    if w.state is State.DRAINING:
        cfg = w.slot.cfg
        log.warning(
            "slot %d pid %d: %s after %gs; sending %s",
            w.slot.index,
            w.pid,
            "still holds connections" if stopped else "its tree still did not stop when frozen",
            cfg.grace,
            signal.Signals(cfg.stop_signal).name,
            extra=w.fields,
        )
        fleet.fire(w, Event.THAW)


def _hold_and_signal(fleet: Fleet, w: Worker) -> Generator[Until, bool, None]:
    """``w`` is frozen and idle, and nothing keeps new connections off its slot: its slot's
    socket drops new SYNs (a hold), handshakes under way finish into the queue and the slot's
    new worker (or, at a scale down or with steering off, the others) takes them; then, the
    queue empty, ``w`` gets its stop signal and runs on; the hold ends once no process of its
    tree has the socket open (it stopped listening, or exited), at most HOLD_MAX s after it
    began. A client whose SYN was dropped sends it again after its first retransmission
    timeout (1 s on Linux) and is served then; HOLD_MAX keeps the hold shorter than that."""
    fx = fleet.fx
    slot = w.slot
    began = fx.now()
    try:
        fx.hold(slot, True)
        yield Until(lambda: not w.life.alive, began + HOLD_SETTLE)
        yield Until(lambda: not w.life.alive or fx.queue_empty(slot), began + HOLD_MAX / 2)
        if w.state is not State.DRAINING:
            return
        if not fx.queue_empty(slot):
            log.info(
                "slot %d pid %d: idle, but its slot's queue did not empty while new connections "
                "were held off; killing it frozen (nothing lost; its shutdown does not run)",
                slot.index,
                w.pid,
                extra=w.fields,
            )
            fleet.fire(w, Event.IDLE_KILL)
            return
        fleet.fire(w, Event.IDLE)
        yield Until(lambda: not w.life.alive or not fx.tree_listens(w), began + HOLD_MAX)
    finally:
        fx.hold(slot, False)
    held = fx.now() - began
    still = " (it still has its socket open)" if w.life.alive and fx.tree_listens(w) else ""
    log.info(
        "slot %d pid %d: idle; signalled while new connections were held off its slot for "
        "%.2fs%s (steering did not keep them off: off, one slot, or no handover in time)",
        slot.index,
        w.pid,
        held,
        still,
        extra=w.fields,
    )


def drain_all(fleet: Fleet, workers: Iterable[Worker], *, handed_over: bool = False) -> Until:
    """Retire ``workers`` (those not already on their way out); wait until all have exited,
    or (``handed_over``) until each has exited or was signalled idle: it holds nothing and no
    new connection reaches it, so its own shutdown (hypercorn's, measured 0.3-0.8 s) need not
    hold up the next step of a reload."""
    workers = list(workers)
    for w in workers:
        if w.state in (State.STARTING, State.READY):
            fleet.retire(w)
    if handed_over:
        return Until(lambda: all(not w.life.alive or w.life.shutting_down for w in workers))
    return Until(lambda: all(not w.life.alive for w in workers))


def _settled(workers: list[Worker]) -> Callable[[], bool]:
    """All ready, or one already died: time to decide."""
    return lambda: (
        all(w.state is State.READY for w in workers) or any(not w.life.alive for w in workers)
    )


# ---- reload --------------------------------------------------------------------------------


def reload(fleet: Fleet, new_cfg: Config, outcome: Outcome, *, scale_to: int | None = None) -> Task:
    """Replace every slot's worker, ``--surge`` at a time; then, if the file's ``workers``
    changed (``scale_to``), scale to it as ``portshard scale`` would."""
    fleet.generation += 1
    gen = fleet.generation
    slots = [s for s in fleet.slots if not s.removing]
    log.info("reload to generation %d: %d slots, %d at a time", gen, len(slots), new_cfg.surge)
    fleet.fx.notify("reloading")
    fleet.history.event("reload", f"reload to generation {gen} started")
    retired: list[Worker] = []
    for start in range(0, len(slots), new_cfg.surge):
        batch = slots[start : start + new_cfg.surge]
        news: list[Worker] = []
        for slot in batch:
            try:
                news.append(fleet.spawn(slot, "reload", new_cfg))
            except (PortshardError, OSError) as exc:
                _abort_reload(fleet, news, outcome, f"reload failed at slot {slot.index}: {exc}")
                return
        previous = {slot.index: slot.cfg for slot in batch}
        for w in news:
            w.slot.cfg = new_cfg  # its readiness is judged by the new settings
        try:
            yield Until(_settled(news), fleet.fx.now() + new_cfg.ready_timeout + 0.5)
            cancelled = ""
        except Cancelled as exc:
            cancelled = exc.reason
        bad = [w for w in news if w.state is not State.READY]
        if bad or cancelled:
            for slot in batch:
                slot.cfg = previous[slot.index]  # the old worker keeps its settings
            w = bad[0] if bad else news[0]
            why = cancelled or _not_ready_why(w, new_cfg)
            _abort_reload(
                fleet,
                news,
                outcome,
                f"reload failed at slot {w.slot.index}: the new worker (pid {w.pid}) did not "
                f"become ready: {why}; the old workers keep serving",
            )
            return
        olds = [o for slot in batch for o in slot.live() if o not in news and not o.life.retiring]
        retired += olds
        for slot in batch:
            slot.generation = gen
            slot.backoff = Backoff()
        try:  # the next batch starts while these run their shutdown, if they hold nothing
            yield drain_all(fleet, olds, handed_over=True)
        except Cancelled as exc:  # the stop retires the rest
            _abort_reload(fleet, [], outcome, f"reload to generation {gen}: {exc.reason}")
            return
    try:  # done when every old worker has gone
        yield Until(lambda: all(not w.life.alive for w in retired))
    except Cancelled as exc:
        _abort_reload(fleet, [], outcome, f"reload to generation {gen}: {exc.reason}")
        return
    fleet.cfg = new_cfg
    fleet.reloads["ok"] += 1
    log.info("reload to generation %d done", gen)
    if scale_to is not None and scale_to != len([s for s in fleet.slots if not s.removing]):
        yield from scale(fleet, scale_to, outcome)
        return
    fleet.finish(outcome)


def _not_ready_why(w: Worker, cfg: Config) -> str:
    """Timeout or exit: a worker killed for its timeout also exits (by SIGKILL)."""
    if not w.life.alive and not w.life.timed_out:
        return f"it exited ({w.describe_exit()})"
    return f"it was not ready within {cfg.ready_timeout:g}s (--ready {cfg.ready})"


def _abort_reload(fleet: Fleet, news: list[Worker], outcome: Outcome, error: str) -> None:
    for w in news:
        if w.life.alive:
            fleet.fire(w, Event.KILL)
    fleet.reloads["failed"] += 1
    fleet.finish(outcome, error)


# ---- scale ---------------------------------------------------------------------------------


def scale(fleet: Fleet, count: int, outcome: Outcome) -> Task:
    current = [s for s in fleet.slots if not s.removing]
    log.info("scale %d -> %d", len(current), count)
    try:
        if count > len(current):
            yield from _scale_up(fleet, len(current), count, outcome)
        else:
            yield from _scale_down(fleet, current[count:], count, outcome)
    except Cancelled as exc:
        if not outcome.done:
            fleet.finish(outcome, f"scale {len(current)} -> {count}: {exc.reason}")


def _scale_up(fleet: Fleet, before: int, count: int, outcome: Outcome) -> Task:
    added: list[Slot] = []
    error = ""
    for index in range(len(fleet.slots), len(fleet.slots) + count - before):
        try:
            slot = Slot(index, fleet.fx.open_slot(index), fleet.cfg)
        except (PortshardError, OSError) as exc:
            error = f"scale up failed at slot {index}: {exc}"
            break
        slot.generation = fleet.generation
        fleet.slots.append(slot)
        added.append(slot)
        fleet.fx.add_to_steering(slot)  # out of the table until its worker is ready
        try:
            fleet.spawn(slot, "scale")
        except (PortshardError, OSError) as exc:
            error = f"scale up failed at slot {index}: {exc}"
            break
    news = [w for slot in added for w in slot.live()]
    if not error:
        try:
            yield Until(_settled(news), fleet.fx.now() + fleet.cfg.ready_timeout + 0.5)
        except Cancelled as exc:
            error = f"scale up: {exc.reason}"
        if not error and any(w.state is not State.READY for w in news):
            error = "scale up: a new worker did not become ready; see the log"
    if error:
        # Nothing half-done stays: the new slots go again (their workers killed, their
        # sockets closed), so status never counts a slot that has no worker.
        for w in news:
            if w.life.alive:
                fleet.fire(w, Event.KILL)
        for slot in added:
            fleet.fire_slot(slot, SlotEvent.REMOVE)
        if news:  # SIGKILLed: quick; the next change must find the slots gone
            yield Until(lambda: not any(w.life.alive for w in news))
        for slot in added:
            fleet.fire_slot(slot, SlotEvent.CLOSE)
        fleet.finish(outcome, error)
        return
    fleet.with_workers(count)
    fleet.fx.store(fleet.slots[before:])
    fleet.finish(outcome)


def _scale_down(fleet: Fleet, removed: list[Slot], count: int, outcome: Outcome) -> Task:
    # Steer new connections to the slots that stay (they come first in listen order), let
    # the removed slots' queues empty, retire their workers, then close their sockets. With
    # steering on, the removed slots leave its table (UDP too: only their flows move).
    fx = fleet.fx
    for slot in removed:
        fleet.fire_slot(slot, SlotEvent.REMOVE)
    fx.first_k(count)
    yield fleet.scheduler.sleep(0.05)  # handshakes already under way finish into the old queues
    yield Until(
        lambda: all(fx.queue_empty(s) or not s.live() for s in removed),
        fx.now() + fleet.cfg.grace,
    )
    yield drain_all(fleet, (w for s in removed for w in s.live()))
    yield Until(lambda: all(fx.queue_empty(s) for s in removed), fx.now() + 1.0)
    for slot in removed:
        fleet.fire_slot(slot, SlotEvent.CLOSE)
    fx.all_slots()
    fleet.with_workers(count)
    fleet.finish(outcome)


# ---- stop ----------------------------------------------------------------------------------


def stop(fleet: Fleet) -> Task:
    """New SYNs are dropped; connections the kernel already accepted are served. Sockets
    systemd holds too are left alone: their queues wait for the next supervisor."""
    fx = fleet.fx
    fx.notify("stopping")
    closing = fx.drop_syns()
    yield Until(
        lambda: fx.queues_empty(closing) or not any(s.live() for s in fleet.slots),
        fx.now() + fleet.cfg.grace,
    )
    yield drain_all(fleet, (w for s in fleet.slots for w in s.live()))
    yield from await_exit(fleet)


def await_exit(fleet: Fleet) -> Task:
    yield Until(lambda: all(not s.live() for s in fleet.slots))
    log.info("stopped")
    if fleet.state is not SupervisorState.STOPPED:  # SIGQUIT during a stop waits too
        fleet.fire_supervisor(SupervisorEvent.ALL_EXITED)
    waiters = fleet.draining.waiters if fleet.draining else []
    if fleet.draining is not None:  # tell who waits for the drain
        reply = fleet.draining.reply(fleet.fx.now(), fleet.fatal)
        for conn in waiters:
            fleet.fx.reply(conn, reply)
    if waiters:
        # In a container the supervisor is PID 1: its exit kills every process of the PID
        # namespace, a preStop hook's `portshard drain --wait` too (kubelet would report the
        # hook failed). Let the waiting clients read the reply and exit first, briefly.
        yield Until(lambda: fleet.fx.clients_gone(waiters), fleet.fx.now() + CLIENTS_EXIT)
    fleet.exit_code = 1 if fleet.fatal else fleet.stop_code


# ---- a host drain --------------------------------------------------------------------------


def drain_host(fleet: Fleet, settle: float) -> Task:
    """Health says draining from now (the state is DRAINING); the sockets keep accepting for
    ``settle`` s, so what the balancers send before they notice is served; then the stop. A
    stop, a quit or the deadline meanwhile ends the wait (the state moved on)."""
    fleet.fx.notify("stopping")
    yield Until(lambda: fleet.state is not SupervisorState.DRAINING, fleet.fx.now() + settle)
    if fleet.state is SupervisorState.DRAINING:
        log.info("drain: settle time over; taking no new connections")
        fleet.fire_supervisor(SupervisorEvent.SETTLED)
