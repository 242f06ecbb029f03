"""The worker lifecycle table and the respawn backoff, without processes."""

from __future__ import annotations

import pytest

from portshard.supervisor.state import (
    TRANSITIONS,
    Action,
    Backoff,
    Event,
    IllegalTransition,
    Lifecycle,
    State,
)


def test_happy_path_through_a_reload() -> None:
    life = Lifecycle()
    assert life.fire(Event.READY) is Action.NONE and life.state is State.READY
    assert life.fire(Event.DRAIN) is Action.BEGIN_DRAIN and life.state is State.DRAINING
    assert life.fire(Event.DRAINED) is Action.SIGNAL_STOP and life.state is State.STOPPING
    assert life.fire(Event.GRACE_EXPIRED) is Action.KILL and life.state is State.STOPPING
    assert life.fire(Event.EXIT) is Action.REAP and life.state is State.EXITED
    assert not life.alive


def test_not_ready_in_time_is_killed() -> None:
    life = Lifecycle()
    assert life.fire(Event.READY_TIMEOUT) is Action.KILL
    assert life.state is State.STOPPING


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("event", list(Event))
def test_every_pair_is_either_in_the_table_or_illegal_and_changes_nothing(
    state: State, event: Event
) -> None:
    life = Lifecycle(state)
    if (state, event) in TRANSITIONS:
        new_state, action = TRANSITIONS[(state, event)]
        assert life.fire(event) is action
        assert life.state is new_state
    else:
        with pytest.raises(IllegalTransition) as info:
            life.fire(event)
        assert life.state is state
        assert state.value in str(info.value) and event.value in str(info.value)


def test_exited_is_terminal() -> None:
    assert not any(state is State.EXITED for state, _ in TRANSITIONS)


def test_every_live_state_can_exit() -> None:
    for state in State:
        if state is not State.EXITED:
            assert TRANSITIONS[(state, Event.EXIT)] == (State.EXITED, Action.REAP)


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
