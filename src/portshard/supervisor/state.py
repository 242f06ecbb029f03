"""Everything that decides a worker's lifecycle lives in this file, as data.

A worker is one incarnation of a slot (one process). Its states::

    STARTING --ready--> READY --drain--> DRAINING --drained--> STOPPING --exit--> EXITED
        |                 |                 |                     |
        +--stop/timeout---+------stop-------+                     +--grace_expired (SIGKILL)
        +--exit--> EXITED (failed boot)     +--exit--> EXITED

An illegal event raises IllegalTransition and leaves the state unchanged. The supervisor loop
asks this table what to do and then does it; no process is needed to test the table.

The backoff policy for respawning a slot is here too, pure, on a clock passed in.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = [
    "TRANSITIONS",
    "Action",
    "Backoff",
    "Event",
    "IllegalTransition",
    "Lifecycle",
    "State",
]


class State(enum.Enum):
    STARTING = "starting"  # spawned, not ready yet; may already accept
    READY = "ready"  # serving
    DRAINING = "draining"  # no new work wanted; waiting for in-hand work to finish
    STOPPING = "stopping"  # stop (or kill) signal sent; waiting for exit
    EXITED = "exited"  # reaped; terminal


class Event(enum.Enum):
    READY = "ready"  # readiness observed (sd_notify, waiting in accept, delay)
    READY_TIMEOUT = "ready_timeout"  # not ready by the deadline
    DRAIN = "drain"  # a replacement is ready, or the slot is being removed
    DRAINED = "drained"  # holds no connection any more (or gave up waiting)
    STOP = "stop"  # stop at once (supervisor shutting down)
    GRACE_EXPIRED = "grace_expired"  # the stop signal was not obeyed in time
    EXIT = "exit"  # the process exited (pidfd readable)


class Action(enum.Enum):
    NONE = "none"
    SIGNAL_STOP = "signal_stop"  # send the configured stop signal, start the grace timer
    KILL = "kill"  # SIGKILL the process group
    BEGIN_DRAIN = "begin_drain"  # stop new work reaching it, watch its connections
    REAP = "reap"  # record the exit; the loop decides on respawn


TRANSITIONS: dict[tuple[State, Event], tuple[State, Action]] = {
    (State.STARTING, Event.READY): (State.READY, Action.NONE),
    (State.STARTING, Event.READY_TIMEOUT): (State.STOPPING, Action.KILL),
    (State.STARTING, Event.STOP): (State.STOPPING, Action.SIGNAL_STOP),
    (State.STARTING, Event.DRAIN): (State.DRAINING, Action.BEGIN_DRAIN),
    (State.STARTING, Event.EXIT): (State.EXITED, Action.REAP),
    (State.READY, Event.DRAIN): (State.DRAINING, Action.BEGIN_DRAIN),
    (State.READY, Event.STOP): (State.STOPPING, Action.SIGNAL_STOP),
    (State.READY, Event.EXIT): (State.EXITED, Action.REAP),
    (State.DRAINING, Event.DRAINED): (State.STOPPING, Action.SIGNAL_STOP),
    (State.DRAINING, Event.STOP): (State.STOPPING, Action.SIGNAL_STOP),
    (State.DRAINING, Event.GRACE_EXPIRED): (State.STOPPING, Action.KILL),
    (State.DRAINING, Event.EXIT): (State.EXITED, Action.REAP),
    (State.STOPPING, Event.GRACE_EXPIRED): (State.STOPPING, Action.KILL),
    (State.STOPPING, Event.STOP): (State.STOPPING, Action.NONE),
    (State.STOPPING, Event.READY): (State.STOPPING, Action.NONE),  # late readiness: ignore
    (State.STOPPING, Event.EXIT): (State.EXITED, Action.REAP),
    (State.DRAINING, Event.READY): (State.DRAINING, Action.NONE),
    (State.READY, Event.READY): (State.READY, Action.NONE),  # READY=1 sent twice
}


class IllegalTransition(Exception):
    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"event {event.value!r} is not allowed in state {state.value!r}")
        self.state = state
        self.event = event


@dataclass
class Lifecycle:
    """The state of one worker; ``fire`` is the only way to change it."""

    state: State = State.STARTING

    def fire(self, event: Event) -> Action:
        try:
            new_state, action = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise IllegalTransition(self.state, event) from None
        self.state = new_state
        return action

    @property
    def alive(self) -> bool:
        return self.state is not State.EXITED


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
