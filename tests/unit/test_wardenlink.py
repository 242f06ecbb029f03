"""When a lost warden is started again (``WardenLink._next_start``): at once, unless wardens
keep failing. Pure: wait statuses as ``os.waitpid`` gives them, no process."""

from __future__ import annotations

import selectors
import signal
from collections.abc import Callable, Iterator

import pytest

from portshard.supervisor.wardenlink import QUICK_DEATHS, RESTART_EVERY, WardenLink

Link = Callable[[float], WardenLink]
KILLED = signal.SIGKILL  # a wait status: killed by SIGKILL
EXITED_1 = 1 << 8  # a wait status: exit(1)


@pytest.fixture
def link() -> Iterator[Callable[[float], WardenLink]]:
    """A link that never starts a warden, as if its last one started at ``started``."""
    sel = selectors.DefaultSelector()

    def make(started: float) -> WardenLink:
        w = WardenLink(sel, "/nonexistent/c.sock", "text", lambda: ({}, {}))
        w.started = started
        return w

    yield make
    sel.close()


def test_a_warden_killed_just_after_its_start_is_started_again_at_once(link: Link) -> None:
    w = link(100.0)
    assert w._next_start(100.2, KILLED) == 0.0


def test_a_warden_that_lived_is_started_again_at_once_whatever_ended_it(link: Link) -> None:
    for status in (KILLED, EXITED_1, None):
        assert link(100.0)._next_start(100.0 + RESTART_EVERY + 0.1, status) == 0.0


def test_a_warden_that_exits_by_itself_at_once_waits_out_the_limit(link: Link) -> None:
    w = link(100.0)
    assert w._next_start(100.1, EXITED_1) == 100.0 + RESTART_EVERY


def test_wardens_killed_at_every_start_end_in_the_limit_and_one_that_lives_resets_it(
    link: Link,
) -> None:
    w = link(0.0)
    for i in range(QUICK_DEATHS):
        w.started = 10.0 * i
        assert w._next_start(w.started + 0.1, KILLED) == 0.0, i
    w.started = 100.0
    assert w._next_start(100.1, KILLED) == 100.0 + RESTART_EVERY
    w.started = 200.0
    assert w._next_start(200.0 + RESTART_EVERY, KILLED) == 0.0
    w.started = 300.0
    assert w._next_start(300.1, KILLED) == 0.0
