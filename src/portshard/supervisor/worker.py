"""A worker (one process of a slot, which owns its pid, pidfd and kill) and a slot.

A slot's sockets are opened once and stay open for the slot's whole life; every incarnation
of the slot's worker gets the same sockets. A worker's and a slot's state change only through
their machines (``state.py``); the supervisor carries out what ``fire`` returns.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from typing import TYPE_CHECKING, Any

from ..linux import proc, syscalls
from ..linux.cgroup import Cgroup
from .state import SLOT_TABLE, Backoff, Lifecycle, Machine, SlotEvent, SlotState, State

if TYPE_CHECKING:
    from ..interpose.seccomp import Trap
    from .config import Config

__all__ = ["Slot", "Worker", "log_fields", "signal_tree"]


def log_fields(slot: int, pid: int | None = None) -> dict[str, Any]:
    """``extra=`` for a log record about a slot (and its worker): the JSON log has them as
    fields; the text still starts ``slot N pid P:``."""
    return {"slot": slot} if pid is None else {"slot": slot, "pid": pid}


def signal_tree(pid: int, group: Cgroup | None, sig: int) -> None:
    """Send ``sig`` to a worker: ``pid``'s process group (the process alone if the group is
    not ours to signal, e.g. it changed user, or if it leads none: a process adopted as a
    worker, whose SIGSTOP went nowhere and whose tree never looked stopped). With a cgroup
    (``group``), SIGKILL is also the group's kill and SIGSTOP/SIGCONT its freeze/thaw: the
    whole tree, children that called setsid() included.

    The stop signal (any other) goes to the main process alone when that process handles
    it: a pre-fork master (gunicorn, nginx, hypercorn, uvicorn --workers) stops its
    children its own way, and some children keep the signal's default action while they
    wait for it (hypercorn's die with requests in hand). A main process that does not
    handle it (a shell, a wrapper, a single process that dies on it) gets it with its
    whole group, as before, so the program under a wrapper stops too.

    That main process gets it in its main thread (tgkill) unless that thread blocks it: the
    stop signal is sent while the tree is frozen, and at the thaw any thread may take a
    process-wide signal (each leaves the freezer through the signal code). A Python program
    whose main thread sleeps in a native call while other threads run (granian's master)
    then never runs its handler: measured, 1 of 3 frozen SIGTERMs lost, and the old worker
    waited --grace and a SIGKILL on every reload under load. Unfrozen, the kernel picks the
    main thread itself.

    A main process that does not handle it: its group gets it, and so does every process of
    its tree that left the group (setsid(): a daemonizing child; the cgroup's members, else
    the process tree). Such a process got nothing before: sent while the tree was frozen and
    idle, the signal kills what dies on it before the thaw, but it ran on after the thaw and
    was killed when the main process exited, with whatever it had accepted meanwhile (the
    chaos soak: a setsid child's request, 1 in 28,696; tests/workers/slowstop.py). Without a
    cgroup the same goes for SIGSTOP, SIGCONT and SIGKILL: a freeze that missed such a child
    never saw the tree stopped."""
    if group is not None and sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCONT):
        with contextlib.suppress(OSError):
            if sig == signal.SIGKILL:
                group.kill()
            else:
                group.freeze(sig == signal.SIGSTOP)
    elif sig not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCONT) and proc.catches(pid, sig):
        try:
            if proc.blocks(pid, sig):
                os.kill(pid, sig)
            else:
                syscalls.tgkill(pid, pid, sig)
        except (OSError, AttributeError):  # gone, not ours, or a libc without tgkill
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        return
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):  # not a group leader (a process adopted
        with contextlib.suppress(OSError):  # as a worker), or not ours to signal: itself
            os.kill(pid, sig)
    if group is None or sig not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCONT):
        _signal_escaped(pid, group, sig)


def _signal_escaped(pid: int, group: Cgroup | None, sig: int) -> None:
    """``sig`` to each process of ``pid``'s tree outside its process group (which killpg()
    reached). Frozen, the tree cannot fork meanwhile: the list is whole."""
    try:
        members = group.members() if group is not None else proc.process_tree(pid)
    except OSError:
        return
    for member in members:
        st = proc.stat(member)
        if member != pid and st is not None and st.pgrp != pid:
            with contextlib.suppress(OSError):
                os.kill(member, sig)


# Under the subreaper mechanism no cgroup names a worker's tree: this variable does, in every
# process of it (inherited, daemons too). An adopter finds by it the workers the supervisor
# that died had started and not yet recorded (handoff.adopt_unrecorded).
TREE_ENV = "PORTSHARD_TREE"


def tree_token(lineage: str, slot: int) -> str:
    """A worker's $PORTSHARD_TREE: its lineage (the supervisor's notify address, which
    upgrades and adoptions keep), then its own random part."""
    return f"{lineage.lstrip(chr(0))}#{slot}.{os.urandom(6).hex()}"


class Worker:
    """One process of a slot. It owns its process: :meth:`signal` reaches its process group,
    :meth:`reap` collects its exit status and closes its pidfd."""

    def __init__(
        self, slot: Slot, pid: int, pidfd: int, generation: int, role: str, now: float
    ) -> None:
        self.slot = slot
        self.pid = pid
        self.pidfd = pidfd
        self.generation = generation
        self.role = role  # boot | respawn | reload | scale
        self.life = Lifecycle()
        self.started = now
        self.status: int | None = None  # the wait status, once reaped
        self.mode = "fds"  # how it got its sockets (--via), for status
        self.trap: Trap | None = None  # its seccomp bind() trap (--via seccomp)
        self.cgroup: Cgroup | None = None  # its whole process tree (linux/cgroup.py), if any
        self.child = True  # our child (False: adopted from a supervisor that died)
        self.adopted: float | None = None  # when (wall clock) it was adopted (issue 15)
        self.resume_retiring = False  # it was being retired when its supervisor went
        self.left: list[int] = []  # processes of its tree still running when it was reaped
        self.token: str | None = None  # its $PORTSHARD_TREE, without cgroups (handoff.py)
        self.not_held: set[int] = set()  # its sockets known not to be connections (sockdiag)

    def __repr__(self) -> str:
        return f"<Worker slot {self.slot.index} pid {self.pid} {self.state.value}>"

    @property
    def state(self) -> State:
        return self.life.state

    @property
    def ready(self) -> bool:
        """It was ready at some point."""
        return self.life.ready_at is not None

    @property
    def stop_timeout(self) -> float:
        """How long a stopping worker gets before SIGKILL: --grace after the stop signal with
        --drain signal; 5 s with freeze (which spent its grace looking for an idle moment)."""
        return self.slot.cfg.grace if self.slot.cfg.drain == "signal" else 5.0

    @property
    def fields(self) -> dict[str, Any]:
        return log_fields(self.slot.index, self.pid)

    # ---- its process (only the effects layer calls these) ----------------------------------

    def signal(self, sig: int) -> None:
        """:func:`signal_tree` to its process (and its cgroup, if any)."""
        signal_tree(self.pid, self.cgroup, sig)

    def reap(self) -> None:
        """Collect its exit status and close its pidfd; then kill whatever it left in its
        process group."""
        if self.child:
            try:
                _, self.status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.status = 0
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        if self.cgroup is not None:  # what it left: a program that daemonized (at boot: why)
            with contextlib.suppress(OSError):
                members = self.cgroup.members()
                self.left = [p for p in members if p != self.pid and not proc.dying(p)]
        self.signal(signal.SIGKILL)

    def describe_exit(self) -> str:
        status = self.status
        if status is None:
            return "still running" if self.pidfd >= 0 else "status unknown: not our child"
        if os.WIFSIGNALED(status):
            return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
        return f"exit status {os.WEXITSTATUS(status)}"

    @property
    def killed_by_sigkill(self) -> bool:
        status = self.status
        return (
            status is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        )


class Slot:
    """A slot: its sockets, its workers (at most two during a reload), its machine."""

    def __init__(self, index: int, socks: list[socket.socket], cfg: Config) -> None:
        self.index = index
        self.socks = socks
        self.cfg = cfg  # the settings its current generation runs with
        self.generation = 0
        self.workers: list[Worker] = []
        self.restarts = 0
        self.backoff = Backoff()
        self.machine: Machine[SlotState, SlotEvent] = Machine(SLOT_TABLE, SlotState.EMPTY)
        self.respawn_at: float | None = None  # its respawn timer (armed by ARM_RESPAWN)
        self.delay = 0.0  # the backoff delay ARM_RESPAWN arms

    def __repr__(self) -> str:
        return f"<Slot {self.index} {self.state.value}>"

    @property
    def state(self) -> SlotState:
        return self.machine.state

    @property
    def removing(self) -> bool:
        return self.state in (SlotState.REMOVING, SlotState.CLOSED)

    def live(self) -> list[Worker]:
        return [w for w in self.workers if w.life.alive]

    def serving(self) -> Worker | None:
        """The worker that answers for the slot: the newest ready one, else the newest in the
        first state of starting, draining, stopping."""
        live = self.live()
        for wanted in (State.READY, State.STARTING, State.DRAINING, State.STOPPING):
            for w in reversed(live):
                if w.state is wanted:
                    return w
        return None

    def shown(self) -> State | SlotState:
        """What status shows: removing, else its serving worker's state, else backoff/empty."""
        if self.removing:
            return SlotState.REMOVING
        w = self.serving()
        if w is not None:
            return w.state
        return SlotState.BACKOFF if self.state is SlotState.BACKOFF else SlotState.EMPTY

    def queue_fds(self) -> list[socket.socket]:
        return [s for s in self.socks if s.type == socket.SOCK_STREAM]
