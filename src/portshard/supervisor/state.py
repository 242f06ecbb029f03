"""Everything that moves a state in the supervisor lives in this file, as data.

Three machines, each a table ``(state, event) -> (new state, actions)``:

- a worker (one incarnation of a slot: one process)::

    STARTING --ready--> READY --drain--> DRAINING --idle/drained--> STOPPING --exit--> EXITED
        |                 |                 |   (freeze, thaw)          |
        +--ready_timeout / kill ------------+--------kill-------------->+--timer (SIGKILL)
        +--exit--> EXITED (any live state)

- a slot (the sockets that outlive its workers): EMPTY, SERVING, BACKOFF (waiting to respawn
  a crashed worker), REMOVING (scaled away), CLOSED;
- the supervisor: BOOTING, RUNNING, CHANGING (a reload or scale runs), DRAINING (``portshard
  drain``: health says draining, the sockets still accept for the settle time), STOPPING,
  STOPPED::

    RUNNING --drain--> DRAINING --settled (or stop)--> STOPPING --all_exited--> STOPPED
    (a deadline passed while DRAINING or STOPPING kills every worker)

``fire()`` returns the actions; the supervisor carries out exactly those (one effects layer,
``Fleet.apply``), so where this table and the code could disagree there is nothing to
disagree about. An illegal event raises :class:`IllegalTransition` and changes nothing. Timers
(a worker's kill deadline, a slot's respawn time) are state data next to the state.

The backoff policy for respawning a slot is here too, pure, on uptimes passed in.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = [
    "SHOWN_STATES",
    "SLOT_TABLE",
    "SUPERVISOR_TABLE",
    "WORKER_TABLE",
    "Action",
    "Backoff",
    "Event",
    "IllegalTransition",
    "Lifecycle",
    "Machine",
    "SlotEvent",
    "SlotState",
    "State",
    "SupervisorEvent",
    "SupervisorState",
]


class State(enum.Enum):
    """A worker's state."""

    STARTING = "starting"  # spawned, not ready yet; may already accept
    READY = "ready"  # serving
    DRAINING = "draining"  # no new work wanted; waiting for in-hand work to finish
    STOPPING = "stopping"  # stop (or kill) signal sent; waiting for exit
    EXITED = "exited"  # reaped; terminal


class Event(enum.Enum):
    """What happens to a worker."""

    READY = "ready"  # readiness observed (sd_notify, waiting in accept, delay)
    READY_TIMEOUT = "ready_timeout"  # not ready by the deadline: a failure, not a retirement
    DRAIN = "drain"  # retire it: a replacement is ready, the slot goes, or we stop
    FREEZE = "freeze"  # --drain freeze: stop its tree to look at what it holds
    THAW = "thaw"  # ... it holds a connection: let it run on
    IDLE = "idle"  # frozen and holding no connection: its stop signal, then --grace to exit
    IDLE_KILL = "idle_kill"  # ... the same with --drain freeze-kill: SIGKILL it now
    DRAINED = "drained"  # retire it with the stop signal (--drain signal, or freeze gave up)
    KILL = "kill"  # kill it now (a failed reload's replacement, SIGQUIT, a second SIGTERM)
    TIMER = "timer"  # its kill deadline passed
    EXIT = "exit"  # the process exited (pidfd readable)


class Action(enum.Enum):
    """What the effects layer does; one enum for the three machines."""

    KILL = "kill"  # SIGKILL the worker's process group
    STOP_SIGNAL = "stop_signal"  # the slot's --stop-signal to the group, then SIGCONT
    FREEZE = "freeze"  # SIGSTOP the group
    THAW = "thaw"  # SIGCONT the group
    ARM_KILL_TIMER = "arm_kill_timer"  # kill at now + its stop timeout unless it exited
    ARM_GRACE_TIMER = "arm_grace_timer"  # kill at now + --grace unless it exited
    DISARM_KILL_TIMER = "disarm_kill_timer"
    REAP = "reap"  # collect the exit status, close the pidfd, kill what is left of the group
    ARM_RESPAWN = "arm_respawn"  # respawn the slot at now + its backoff delay
    DISARM_RESPAWN = "disarm_respawn"
    SPAWN = "spawn"  # start the slot's next worker
    CLOSE_SOCKETS = "close_sockets"  # the slot's sockets (scale down)
    CANCEL_PROCEDURES = "cancel_procedures"  # boot, reload, scale: their cancel scope
    CANCEL_RESPAWNS = "cancel_respawns"  # CANCEL every slot (no respawn while stopping)
    BEGIN_STOP = "begin_stop"  # the graceful stop procedure
    KILL_ALL = "kill_all"  # KILL every live worker
    AWAIT_EXIT = "await_exit"  # stopped once every worker has exited
    NOTIFY_READY = "notify_ready"  # sd_notify READY=1 with a summary
    BEGIN_DRAIN = "begin_drain"  # the host drain: health says draining, settle, then SETTLED
    ARM_DEADLINE = "arm_deadline"  # the drain's deadline (if one was asked; the earlier wins)
    DISARM_DEADLINE = "disarm_deadline"


class SlotState(enum.Enum):
    EMPTY = "empty"  # no worker and none coming (boot not yet, or a failed start)
    SERVING = "serving"  # has a live worker (its state is what status shows)
    BACKOFF = "backoff"  # its worker crashed; respawn at the slot's respawn time
    REMOVING = "removing"  # scaled away: its workers retire, then its sockets close
    CLOSED = "closed"  # its sockets are closed; it is gone


class SlotEvent(enum.Enum):
    SPAWNED = "spawned"
    EMPTIED = "emptied"  # its last worker exited and none is to follow
    CRASHED = "crashed"  # its last worker exited unexpectedly: back off, then respawn
    RESPAWN_DUE = "respawn_due"
    CANCEL = "cancel"  # the supervisor stops: no respawn
    REMOVE = "remove"
    CLOSE = "close"


class SupervisorState(enum.Enum):
    BOOTING = "booting"
    RUNNING = "running"
    CHANGING = "changing"  # a reload or a scale runs (one at a time)
    DRAINING = "draining"  # portshard drain: no new connections wanted; accepting to settle
    STOPPING = "stopping"
    STOPPED = "stopped"


class SupervisorEvent(enum.Enum):
    BOOTED = "booted"  # every slot's first worker is ready
    CHANGE = "change"  # a reload or scale starts
    CHANGED = "changed"  # ... and ended (done or failed)
    STOP = "stop"  # graceful stop (SIGTERM, `stop`, a fatal error)
    DRAIN = "drain"  # a host drain (portshard drain): health turns to draining at once
    SETTLED = "settled"  # ... its settle time is over: stop taking new connections
    DEADLINE = "deadline"  # ... its deadline passed: kill every worker
    QUIT = "quit"  # kill every worker now (SIGQUIT, a second SIGTERM)
    ALL_EXITED = "all_exited"


_A = Action
_S, _E = State, Event
_LIVE = (_S.STARTING, _S.READY, _S.DRAINING, _S.STOPPING)

WORKER_TABLE: dict[tuple[State, Event], tuple[State, tuple[Action, ...]]] = {
    (_S.STARTING, _E.READY): (_S.READY, ()),
    (_S.STARTING, _E.READY_TIMEOUT): (_S.STOPPING, (_A.KILL,)),
    (_S.STARTING, _E.DRAIN): (_S.DRAINING, ()),
    (_S.READY, _E.READY): (_S.READY, ()),  # READY=1 sent twice
    (_S.READY, _E.DRAIN): (_S.DRAINING, ()),
    (_S.DRAINING, _E.READY): (_S.DRAINING, ()),  # late readiness: ignore
    (_S.DRAINING, _E.FREEZE): (_S.DRAINING, (_A.FREEZE,)),
    (_S.DRAINING, _E.THAW): (_S.DRAINING, (_A.THAW,)),
    # Idle and still frozen: the stop signal is queued before SIGCONT, so a program that dies
    # on it dies before it can accept again, and one that handles it runs its shutdown.
    (_S.DRAINING, _E.IDLE): (_S.STOPPING, (_A.STOP_SIGNAL, _A.ARM_GRACE_TIMER)),
    (_S.DRAINING, _E.IDLE_KILL): (_S.STOPPING, (_A.KILL, _A.ARM_KILL_TIMER)),
    (_S.DRAINING, _E.DRAINED): (_S.STOPPING, (_A.STOP_SIGNAL, _A.ARM_KILL_TIMER)),
    (_S.STOPPING, _E.READY): (_S.STOPPING, ()),
    (_S.STOPPING, _E.TIMER): (_S.STOPPING, (_A.DISARM_KILL_TIMER, _A.KILL)),
    **{(s, _E.KILL): (_S.STOPPING, (_A.KILL,)) for s in _LIVE},
    **{(s, _E.EXIT): (_S.EXITED, (_A.DISARM_KILL_TIMER, _A.REAP)) for s in _LIVE},
}
RETIRING_EVENTS = frozenset({_E.DRAIN, _E.KILL})  # after these an exit is expected

_L = SlotState
_SE = SlotEvent
SLOT_TABLE: dict[tuple[SlotState, SlotEvent], tuple[SlotState, tuple[Action, ...]]] = {
    (_L.EMPTY, _SE.SPAWNED): (_L.SERVING, ()),
    (_L.SERVING, _SE.SPAWNED): (_L.SERVING, ()),  # a reload's replacement, beside the old one
    (_L.BACKOFF, _SE.SPAWNED): (_L.SERVING, (_A.DISARM_RESPAWN,)),  # a reload's, instead
    (_L.SERVING, _SE.EMPTIED): (_L.EMPTY, ()),
    (_L.EMPTY, _SE.EMPTIED): (_L.EMPTY, ()),
    (_L.SERVING, _SE.CRASHED): (_L.BACKOFF, (_A.ARM_RESPAWN,)),
    (_L.EMPTY, _SE.CRASHED): (_L.BACKOFF, (_A.ARM_RESPAWN,)),  # a respawn that failed at once
    (_L.BACKOFF, _SE.RESPAWN_DUE): (_L.EMPTY, (_A.DISARM_RESPAWN, _A.SPAWN)),
    (_L.BACKOFF, _SE.CANCEL): (_L.EMPTY, (_A.DISARM_RESPAWN,)),
    (_L.EMPTY, _SE.CANCEL): (_L.EMPTY, ()),
    (_L.SERVING, _SE.CANCEL): (_L.SERVING, ()),
    (_L.REMOVING, _SE.CANCEL): (_L.REMOVING, ()),
    (_L.EMPTY, _SE.REMOVE): (_L.REMOVING, ()),
    (_L.SERVING, _SE.REMOVE): (_L.REMOVING, ()),
    (_L.BACKOFF, _SE.REMOVE): (_L.REMOVING, (_A.DISARM_RESPAWN,)),
    (_L.REMOVING, _SE.EMPTIED): (_L.REMOVING, ()),
    (_L.REMOVING, _SE.CRASHED): (_L.REMOVING, ()),  # going anyway: no respawn
    (_L.REMOVING, _SE.CLOSE): (_L.CLOSED, (_A.CLOSE_SOCKETS,)),
}

_P = SupervisorState
_PE = SupervisorEvent
_UP = (_P.BOOTING, _P.RUNNING, _P.CHANGING)
_BEGIN_STOP = (_A.CANCEL_PROCEDURES, _A.CANCEL_RESPAWNS, _A.BEGIN_STOP)
_QUIT = (_A.CANCEL_PROCEDURES, _A.CANCEL_RESPAWNS, _A.KILL_ALL, _A.AWAIT_EXIT)
# A drain cancels a boot, reload or scale (the host is leaving) but keeps respawning crashed
# workers while it still accepts; the stop after the settle time is the ordinary stop.
_BEGIN_DRAIN = (_A.CANCEL_PROCEDURES, _A.ARM_DEADLINE, _A.BEGIN_DRAIN)
_DEADLINE = (_A.DISARM_DEADLINE, _A.CANCEL_RESPAWNS, _A.KILL_ALL)
SUPERVISOR_TABLE: dict[
    tuple[SupervisorState, SupervisorEvent], tuple[SupervisorState, tuple[Action, ...]]
] = {
    (_P.BOOTING, _PE.BOOTED): (_P.RUNNING, (_A.NOTIFY_READY,)),
    (_P.RUNNING, _PE.CHANGE): (_P.CHANGING, ()),
    (_P.CHANGING, _PE.CHANGED): (_P.RUNNING, (_A.NOTIFY_READY,)),
    (_P.STOPPING, _PE.CHANGED): (_P.STOPPING, ()),  # a change cancelled by the stop
    (_P.DRAINING, _PE.CHANGED): (_P.DRAINING, ()),  # ... or by the drain
    **{(s, _PE.STOP): (_P.STOPPING, _BEGIN_STOP) for s in (*_UP, _P.DRAINING)},
    (_P.STOPPING, _PE.STOP): (_P.STOPPING, ()),
    **{(s, _PE.QUIT): (_P.STOPPING, _QUIT) for s in (*_UP, _P.DRAINING)},
    (_P.STOPPING, _PE.QUIT): (_P.STOPPING, (_A.KILL_ALL,)),
    **{(s, _PE.DRAIN): (_P.DRAINING, _BEGIN_DRAIN) for s in _UP},
    (_P.DRAINING, _PE.DRAIN): (_P.DRAINING, (_A.ARM_DEADLINE,)),  # a second one joins
    (_P.STOPPING, _PE.DRAIN): (_P.STOPPING, (_A.ARM_DEADLINE,)),  # ... so does one after a stop
    (_P.DRAINING, _PE.SETTLED): (_P.STOPPING, (_A.CANCEL_RESPAWNS, _A.BEGIN_STOP)),
    (_P.DRAINING, _PE.DEADLINE): (_P.STOPPING, (*_DEADLINE, _A.AWAIT_EXIT)),
    (_P.STOPPING, _PE.DEADLINE): (_P.STOPPING, _DEADLINE),
    (_P.STOPPING, _PE.ALL_EXITED): (_P.STOPPED, (_A.DISARM_DEADLINE,)),  # in time
}

# What `status` shows for a slot: its serving worker's state, else the slot's own; in this
# order (the metrics' label values, the table's colours).
SHOWN_STATES: tuple[State | SlotState, ...] = (
    State.STARTING,
    State.READY,
    State.DRAINING,
    State.STOPPING,
    SlotState.BACKOFF,
    SlotState.EMPTY,
    SlotState.REMOVING,
)


class IllegalTransition(Exception):
    def __init__(self, state: enum.Enum, event: enum.Enum) -> None:
        super().__init__(f"event {event.value!r} is not allowed in state {state.value!r}")
        self.state = state
        self.event = event


S = TypeVar("S", bound=enum.Enum)
E = TypeVar("E", bound=enum.Enum)


class Machine(Generic[S, E]):
    """A state and its table; :meth:`fire` is the only way to change the state."""

    def __init__(self, table: Mapping[tuple[S, E], tuple[S, tuple[Action, ...]]], state: S):
        self.table = table
        self.state = state

    def allows(self, event: E) -> bool:
        return (self.state, event) in self.table

    def fire(self, event: E) -> tuple[Action, ...]:
        try:
            new_state, actions = self.table[(self.state, event)]
        except KeyError:
            raise IllegalTransition(self.state, event) from None
        self.state = new_state
        return actions


class Lifecycle(Machine[State, Event]):
    """A worker's state and the data its transitions record (on the clock passed in)."""

    def __init__(self, state: State = State.STARTING) -> None:
        super().__init__(WORKER_TABLE, state)
        self.ready_at: float | None = None  # when it became ready (None: never was)
        self.retired_at: float | None = None  # when we began to retire it (drain or kill)
        self.kill_at: float | None = None  # its kill timer (armed by ARM_KILL_TIMER)
        self.timed_out = False  # killed for not being ready in time (its exit says SIGKILL)
        self.shutting_down = False  # found idle and given its stop signal: its shutdown runs
        self.idle_at: float | None = None  # when it was found idle and signalled

    def fire(self, event: Event, now: float = 0.0) -> tuple[Action, ...]:
        before = self.state
        actions = super().fire(event)
        if before is State.STARTING and self.state is State.READY:
            self.ready_at = now
        if event is Event.READY_TIMEOUT:
            self.timed_out = True
        if event is Event.IDLE:
            self.shutting_down = True
            self.idle_at = now
        if event in RETIRING_EVENTS and self.retired_at is None:
            self.retired_at = now
        return actions

    @property
    def alive(self) -> bool:
        return self.state is not State.EXITED

    @property
    def retiring(self) -> bool:
        """We are retiring it (drain or kill): its exit is expected, not a crash."""
        return self.retired_at is not None


@dataclass
class Backoff:
    """When to respawn a slot whose worker died, and when to give up.

    A worker that ran for at least ``healthy_after`` seconds resets the count. Each quick
    failure doubles the delay (``first`` .. ``cap``). ``give_up_after`` quick failures that are
    the program's own (it exited before it was ready, or exited or crashed by itself) mean it
    cannot run, and the supervisor stops instead of spinning. A ready worker killed from
    outside (SIGKILL: an operator, a chaos test, the OOM killer) is respawned with the backoff
    but never makes the supervisor give up: the other slots are serving, and stopping them
    all would turn one slot's trouble into an outage.
    """

    first: float = 0.1
    cap: float = 5.0
    healthy_after: float = 2.0
    give_up_after: int = 5
    failures: int = field(default=0)  # quick exits since the last healthy run: the delay
    strikes: int = field(default=0)  # ... of which the program's own: giving up

    def on_exit(self, uptime: float, *, own: bool = True) -> float | None:
        """Record an exit after ``uptime`` s (``own``: the program's fault, see above);
        return the respawn delay, or None to give up."""
        if uptime >= self.healthy_after:
            self.failures = self.strikes = 0
            return 0.0
        self.failures += 1
        self.strikes += own
        if self.strikes >= self.give_up_after:
            return None
        return float(min(self.cap, self.first * 2.0 ** (self.failures - 1)))
