"""The lifecycle machines and the respawn backoff, without processes: what each event does."""

from __future__ import annotations

import pytest

from portshard.supervisor.state import (
    SLOT_TABLE,
    SUPERVISOR_TABLE,
    Action,
    Backoff,
    Event,
    IllegalTransition,
    Lifecycle,
    Machine,
    SlotEvent,
    SlotState,
    State,
    SupervisorEvent,
    SupervisorState,
)


def walk(life: Lifecycle, *steps: tuple[Event, float]) -> list[tuple[Action, ...]]:
    return [life.fire(event, now) for event, now in steps]


def test_a_reload_retires_the_old_worker_by_freeze_check_kill() -> None:
    life = Lifecycle()
    assert life.fire(Event.READY, 1.0) == () and life.state is State.READY
    assert life.ready_at == 1.0 and not life.retiring
    assert life.fire(Event.DRAIN, 5.0) == () and life.state is State.DRAINING
    assert life.retiring and life.retired_at == 5.0
    # Frozen, holds a connection: thawed; frozen again, idle: its stop signal (queued while
    # frozen, then SIGCONT), with --grace to exit before the kill timer fires.
    assert walk(life, (Event.FREEZE, 5.0), (Event.THAW, 5.0), (Event.FREEZE, 5.1)) == [
        (Action.FREEZE,),
        (Action.THAW,),
        (Action.FREEZE,),
    ]
    assert life.fire(Event.IDLE, 5.1) == (Action.STOP_SIGNAL, Action.ARM_GRACE_TIMER)
    assert life.state is State.STOPPING
    assert life.fire(Event.EXIT, 5.2) == (Action.DISARM_KILL_TIMER, Action.REAP)
    assert not life.alive


def test_signal_drain_sends_the_stop_signal_then_kills_when_the_timer_fires() -> None:
    life = Lifecycle(State.READY)
    life.fire(Event.DRAIN)
    assert life.fire(Event.DRAINED) == (Action.STOP_SIGNAL, Action.ARM_KILL_TIMER)
    assert life.fire(Event.TIMER) == (Action.DISARM_KILL_TIMER, Action.KILL)
    assert life.state is State.STOPPING


def test_not_ready_in_time_is_killed_and_its_exit_is_a_failure() -> None:
    life = Lifecycle()
    assert life.fire(Event.READY_TIMEOUT) == (Action.KILL,)
    assert life.state is State.STOPPING
    assert not life.retiring  # its exit is a crash, not a retirement
    assert life.ready_at is None


@pytest.mark.parametrize("state", [State.STARTING, State.READY, State.DRAINING, State.STOPPING])
def test_kill_works_from_every_live_state_and_is_a_retirement(state: State) -> None:
    life = Lifecycle(state)
    assert life.fire(Event.KILL, 3.0) == (Action.KILL,)
    assert life.state is State.STOPPING and life.retiring


def test_late_readiness_is_ignored_and_does_not_count_as_ready() -> None:
    life = Lifecycle()
    life.fire(Event.DRAIN)
    assert life.fire(Event.READY, 9.0) == () and life.state is State.DRAINING
    assert life.ready_at is None


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (State.STARTING, Event.DRAINED),  # only a draining worker is retired by signal
        (State.READY, Event.FREEZE),  # a serving worker is never frozen
        (State.READY, Event.IDLE),
        (State.STARTING, Event.TIMER),  # no kill timer before it stops
        (State.EXITED, Event.EXIT),  # reaped once
        (State.EXITED, Event.KILL),  # nothing to kill
        (State.STOPPING, Event.DRAIN),
    ],
)
def test_an_illegal_event_raises_and_changes_nothing(state: State, event: Event) -> None:
    life = Lifecycle(state)
    life.retired_at = None
    with pytest.raises(IllegalTransition) as info:
        life.fire(event, 7.0)
    assert life.state is state and life.retired_at is None and life.ready_at is None
    assert state.value in str(info.value) and event.value in str(info.value)


def test_exited_is_terminal() -> None:
    for event in Event:
        with pytest.raises(IllegalTransition):
            Lifecycle(State.EXITED).fire(event)


def test_a_crashed_slot_backs_off_then_respawns() -> None:
    slot = Machine(SLOT_TABLE, SlotState.EMPTY)
    assert slot.fire(SlotEvent.SPAWNED) == () and slot.state is SlotState.SERVING
    assert slot.fire(SlotEvent.CRASHED) == (Action.ARM_RESPAWN,)
    assert slot.state is SlotState.BACKOFF
    assert slot.fire(SlotEvent.RESPAWN_DUE) == (Action.DISARM_RESPAWN, Action.SPAWN)
    assert slot.fire(SlotEvent.SPAWNED) == () and slot.state is SlotState.SERVING


def test_a_stop_cancels_a_pending_respawn() -> None:
    slot = Machine(SLOT_TABLE, SlotState.BACKOFF)
    assert slot.fire(SlotEvent.CANCEL) == (Action.DISARM_RESPAWN,)
    assert slot.state is SlotState.EMPTY
    with pytest.raises(IllegalTransition):
        slot.fire(SlotEvent.RESPAWN_DUE)


def test_a_removed_slot_never_respawns_and_closes_its_sockets() -> None:
    slot = Machine(SLOT_TABLE, SlotState.BACKOFF)
    assert slot.fire(SlotEvent.REMOVE) == (Action.DISARM_RESPAWN,)
    assert slot.fire(SlotEvent.CRASHED) == ()  # going anyway
    with pytest.raises(IllegalTransition):
        slot.fire(SlotEvent.SPAWNED)
    assert slot.state is SlotState.REMOVING
    assert slot.fire(SlotEvent.CLOSE) == (Action.CLOSE_SOCKETS,)
    assert slot.state is SlotState.CLOSED


def test_one_change_at_a_time_and_none_while_booting_or_stopping() -> None:
    sup = Machine(SUPERVISOR_TABLE, SupervisorState.BOOTING)
    assert not sup.allows(SupervisorEvent.CHANGE)
    assert sup.fire(SupervisorEvent.BOOTED) == (Action.NOTIFY_READY,)
    sup.fire(SupervisorEvent.CHANGE)
    with pytest.raises(IllegalTransition):
        sup.fire(SupervisorEvent.CHANGE)
    assert sup.state is SupervisorState.CHANGING
    stop = sup.fire(SupervisorEvent.STOP)
    assert Action.CANCEL_PROCEDURES in stop and Action.BEGIN_STOP in stop
    assert sup.fire(SupervisorEvent.STOP) == ()  # a second stop: nothing more
    assert sup.fire(SupervisorEvent.CHANGED) == ()  # no READY=1 to systemd while stopping
    assert not sup.allows(SupervisorEvent.CHANGE)
    assert sup.fire(SupervisorEvent.QUIT) == (Action.KILL_ALL,)
    sup.fire(SupervisorEvent.ALL_EXITED)
    assert sup.state is SupervisorState.STOPPED


def test_backoff_doubles_then_gives_up() -> None:
    b = Backoff(first=0.1, cap=1.0, healthy_after=2.0, give_up_after=5)
    assert [b.on_exit(0.0) for _ in range(4)] == [0.1, 0.2, 0.4, 0.8]
    assert b.on_exit(0.0) is None


def test_backoff_never_gives_up_on_workers_killed_from_outside() -> None:
    # SIGKILLed right after becoming ready (an operator, the OOM killer): respawn with the
    # backoff, but not the program's fault, so the other slots keep serving.
    b = Backoff(first=0.1, cap=1.0, healthy_after=2.0, give_up_after=3)
    assert [b.on_exit(0.1, own=False) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert b.on_exit(0.1) == 1.0
    assert b.on_exit(0.1, own=False) == 1.0  # neither counts nor resets the program's own
    assert b.on_exit(0.1) == 1.0
    assert b.on_exit(0.1) is None


def test_backoff_is_capped() -> None:
    b = Backoff(first=1.0, cap=3.0, give_up_after=100)
    assert [b.on_exit(0.0) for _ in range(4)] == [1.0, 2.0, 3.0, 3.0]


def test_a_healthy_run_resets_the_count() -> None:
    b = Backoff(first=0.1, healthy_after=2.0, give_up_after=3)
    b.on_exit(0.1)
    b.on_exit(0.1)
    assert b.on_exit(5.0) == 0.0  # ran long enough: respawn at once, count reset
    assert b.failures == 0
    assert b.on_exit(0.1) == 0.1


def test_freeze_kill_drain_kills_an_idle_frozen_worker_at_once() -> None:
    # --drain freeze-kill: the fastest retirement; the program's shutdown does not run.
    life = Lifecycle(State.READY)
    life.fire(Event.DRAIN)
    life.fire(Event.FREEZE)
    assert life.fire(Event.IDLE_KILL) == (Action.KILL, Action.ARM_KILL_TIMER)
    assert life.state is State.STOPPING
