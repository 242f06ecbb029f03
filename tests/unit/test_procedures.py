"""Boot, reload, scale, stop and crash handling against a fake effects layer and a fake clock.

No process and no socket: the fake records what the lifecycle asked the world to do (signals,
spawns, closed slots, replies, sd_notify), and the test plays the world's part (a worker
becomes ready, holds a connection, exits). Each test runs in milliseconds.
"""

from __future__ import annotations

import signal
import socket
from typing import Any

import pytest

from portshard.control.server import Connection
from portshard.errors import ConfigError, ControlError
from portshard.supervisor import procedures
from portshard.supervisor.config import Config, load
from portshard.supervisor.drain import DrainRequest, parse_request
from portshard.supervisor.fleet import Fleet, Outcome
from portshard.supervisor.state import SlotState, State, SupervisorState
from portshard.supervisor.worker import Slot, Worker

CLI: dict[str, Any] = {"command": ("srv",), "listen": ("tcp://:0",)}


def exited(code: int) -> int:
    return code << 8  # a wait status: exited with ``code``


def killed(sig: int) -> int:
    return sig


class FakeEffects:
    """The world, as the lifecycle sees it; the test moves the clock and the processes."""

    def __init__(self) -> None:
        self.clock = 100.0
        self.next_pid = 1000
        self.busy_queues: set[int] = set()  # slots whose accept queue is never empty
        self.unshielded: set[int] = set()  # slots steering does not keep new connections off
        self.signals: list[tuple[int, int]] = []  # (pid, signal)
        self.ready: set[int] = set()  # pids that look ready
        self.holding: set[int] = set()  # pids whose tree holds a client connection
        self.unstoppable: set[int] = set()  # pids whose tree does not stop when frozen
        self.spawn_error: dict[int, str] = {}  # slot -> the error its next spawn raises
        self.closed: list[int] = []
        self.notes: list[tuple[str, str]] = []
        self.replies: list[tuple[Connection, bytes]] = []
        self.rescued: list[int] = []
        self.syns_dropped_at: float | None = None  # when the stop's SYN-drop filter went on
        self.holdable = True  # hold() can keep new connections off a slot (sockets ours, TCP)
        self.holds: list[tuple[int, bool, float]] = []  # (slot, on, when)
        self.listening: set[int] = set()  # pids whose tree still has its slot's socket open
        self.clients = False  # a drain --wait client is still running

    def now(self) -> float:
        return self.clock

    def spawn(self, slot: Slot, role: str, cfg: Config, generation: int) -> Worker:
        if slot.index in self.spawn_error:
            raise ConfigError(self.spawn_error[slot.index])  # e.g. the --user lookup failed
        self.next_pid += 1
        return Worker(slot, self.next_pid, -1, generation, role, self.clock)

    def signal(self, w: Worker, sig: int) -> None:
        self.signals.append((w.pid, sig))

    def reap(self, w: Worker) -> None:
        pass  # the test set w.status

    def is_ready(self, w: Worker, now: float) -> bool:
        return w.pid in self.ready

    def became_ready(self, w: Worker) -> None:
        pass

    def tree_stopped(self, w: Worker, spin: float) -> bool:
        return w.pid not in self.unstoppable

    def holds_connections(self, w: Worker) -> bool:
        return w.pid in self.holding

    def open_slot(self, index: int) -> list[socket.socket]:
        return []

    def close_slot(self, slot: Slot) -> None:
        self.closed.append(slot.index)

    def queue_empty(self, slot: Slot) -> bool:
        return slot.index not in self.busy_queues

    def steers(self) -> bool:
        return not self.unshielded

    def shielded(self, slot: Slot) -> bool:
        return slot.index not in self.unshielded

    def can_hold(self, slot: Slot) -> bool:
        return self.holdable

    def hold(self, slot: Slot, on: bool) -> None:
        self.holds.append((slot.index, on, self.clock))

    def tree_listens(self, w: Worker) -> bool:
        return w.pid in self.listening

    def drop_syns(self) -> list[socket.socket]:
        self.syns_dropped_at = self.clock
        return []

    def queues_empty(self, socks: list[socket.socket]) -> bool:
        return True

    def store(self, slots: list[Slot]) -> None:
        pass

    def steer(self) -> None:
        pass

    def add_to_steering(self, slot: Slot) -> None:
        pass

    def rescue(self, slot: Slot, pid: int) -> None:
        self.rescued.append(slot.index)

    def first_k(self, count: int) -> None:
        pass

    def all_slots(self) -> None:
        pass

    def notify(self, what: str, text: str = "") -> None:
        self.notes.append((what, text))

    def reply(self, conn: Connection, data: bytes) -> None:
        self.replies.append((conn, data))

    def clients_gone(self, conns: list[Connection]) -> bool:
        return not self.clients

    def sent(self, pid: int) -> list[int]:
        return [sig for p, sig in self.signals if p == pid]


class World:
    def __init__(self, workers: int = 2, **cli: Any) -> None:
        self.fx = FakeEffects()
        self.fleet = Fleet(load({**CLI, "workers": workers, **cli}), {**CLI, **cli}, self.fx)
        for i in range(workers):
            self.fleet.slots.append(Slot(i, [], self.fleet.cfg))

    def turn(self, seconds: float = 0.02) -> None:
        self.fx.clock += seconds
        self.fleet.tick(self.fx.clock)

    def pids(self) -> list[int]:
        return [w.pid for s in self.fleet.slots for w in s.live()]

    def serving(self) -> list[int]:
        return [w.pid for s in self.fleet.slots if (w := s.serving()) is not None]

    def exit(self, pid: int, status: int) -> None:
        w = next(w for s in self.fleet.slots for w in s.workers if w.pid == pid)
        w.status = status
        self.fleet.on_exit(w)

    def obey(self) -> None:
        """Every worker that got SIGKILL (or its stop signal) exits."""
        for pid in self.pids():
            if signal.SIGKILL in self.fx.sent(pid) or signal.SIGTERM in self.fx.sent(pid):
                self.exit(pid, killed(signal.SIGKILL))

    def boot(self) -> None:
        self.fleet.scheduler.start(procedures.boot(self.fleet), self.fleet.scope)
        self.fx.ready.update(self.pids())
        self.turn()
        self.turn()
        assert self.fleet.state is SupervisorState.RUNNING


def test_boot_then_every_slot_serves_and_systemd_hears_ready() -> None:
    world = World(3)
    world.boot()
    assert len(world.serving()) == 3 and world.fleet.booted
    assert world.fx.notes == [("ready", "3 of 3 workers ready, generation 1")]


def test_reload_replaces_each_slot_only_after_its_new_worker_is_ready() -> None:
    world = World(2)
    world.boot()
    old = world.pids()
    world.fleet.reload(Outcome())
    world.turn()
    new0 = world.fleet.slots[0].workers[-1].pid
    assert new0 not in old and world.fx.sent(old[0]) == []  # not ready: the old one stays
    world.fx.holding.add(old[0])  # the old one holds a connection: frozen, thawed, waits
    world.fx.ready.add(new0)
    world.turn()
    world.turn()
    assert world.fx.sent(old[0])[:2] == [signal.SIGSTOP, signal.SIGCONT]
    world.fx.holding.discard(old[0])
    world.turn(0.05)
    # frozen and idle: its stop signal is queued before SIGCONT (nothing to lose, and its
    # shutdown runs), with --grace to exit
    assert world.fx.sent(old[0])[-2:] == [signal.SIGTERM, signal.SIGCONT]
    world.obey()
    world.turn()
    new1 = world.fleet.slots[1].workers[-1].pid
    world.fx.ready.add(new1)
    world.turn()
    world.turn(0.05)
    world.obey()
    world.turn()
    assert world.serving() == [new0, new1] and world.fleet.reloads == {"ok": 1, "failed": 0}
    assert world.fleet.state is SupervisorState.RUNNING
    assert all(s.generation == 2 for s in world.fleet.slots)


def test_a_tree_that_did_not_stop_when_frozen_is_not_judged_idle() -> None:
    # A tree still running may accept between the look at what it holds and its stop
    # signal, then die on the signal with that request. Before, the look went ahead once
    # the wait for the freeze (1 s) was over, and the worker was signalled as idle.
    world = World(2)
    world.boot()
    old = world.pids()
    world.fx.unstoppable.add(old[0])
    world.fleet.reload(Outcome())
    world.turn()
    world.fx.ready.add(world.fleet.slots[0].workers[-1].pid)
    for _ in range(4):  # ready, frozen, the wait for the freeze over, frozen again
        world.turn(procedures.FREEZE_WAIT / 2)
    sent = world.fx.sent(old[0])
    assert signal.SIGTERM not in sent and signal.SIGKILL not in sent
    assert sent[:3] == [signal.SIGSTOP, signal.SIGCONT, signal.SIGSTOP]  # thawed, then again
    world.fx.unstoppable.discard(old[0])
    world.turn()
    world.turn()
    assert world.fx.sent(old[0])[-2:] == [signal.SIGTERM, signal.SIGCONT]  # stopped: idle


def test_reload_whose_new_worker_exits_keeps_the_old_and_reports_why() -> None:
    world = World(1)
    world.boot()
    (old,) = world.pids()
    outcome = world.fleet.reload(Outcome())
    world.turn()
    new = world.fleet.slots[0].workers[-1].pid
    world.exit(new, exited(3))
    world.turn()
    assert outcome.done and not outcome.ok
    assert "did not become ready: it exited (exit status 3)" in outcome.error
    assert world.serving() == [old] and world.fx.sent(old) == []
    assert world.fleet.reloads["failed"] == 1


def test_a_second_change_is_refused_while_one_runs() -> None:
    world = World(1)
    with pytest.raises(ControlError, match="still starting"):
        world.fleet.reload(Outcome())
    world.boot()
    world.fleet.reload(Outcome())
    with pytest.raises(ControlError, match="a reload is already in progress"):
        world.fleet.scale(3, Outcome())


def test_scale_down_retires_the_last_slots_and_closes_their_sockets() -> None:
    world = World(3)
    world.boot()
    pids = world.pids()
    outcome = world.fleet.scale(1, Outcome())
    world.turn(0.06)
    world.turn()
    assert [s.state for s in world.fleet.slots[1:]] == [SlotState.REMOVING] * 2
    assert world.fx.sent(pids[0]) == []
    world.turn()
    world.obey()
    world.turn()
    world.turn()
    assert outcome.done and outcome.ok, outcome.error
    assert world.fx.closed == [1, 2] and len(world.fleet.slots) == 1
    assert world.fleet.cfg.workers == 1


def test_scale_up_waits_for_the_new_workers() -> None:
    world = World(1)
    world.boot()
    outcome = world.fleet.scale(2, Outcome())
    world.turn()
    assert not outcome.done
    world.fx.ready.update(world.pids())
    world.turn()
    assert outcome.done and outcome.ok and world.fleet.cfg.workers == 2


def test_stop_cancels_a_reload_and_retires_everyone() -> None:
    world = World(2)
    world.boot()
    olds = world.pids()
    outcome = world.fleet.reload(Outcome())
    world.turn()
    new = world.fleet.slots[0].workers[-1].pid
    world.fleet.stop()
    world.turn()
    assert outcome.done and "the supervisor is stopping" in outcome.error
    assert world.fx.sent(new) == [signal.SIGKILL]  # the unready replacement
    world.turn()
    world.obey()
    world.turn()
    assert all(signal.SIGTERM in world.fx.sent(pid) for pid in olds)  # their shutdown runs
    assert world.fleet.exit_code == 0 and world.fleet.state is SupervisorState.STOPPED
    assert ("stopping", "") in world.fx.notes


def test_a_crash_backs_off_then_respawns_and_counts_a_restart() -> None:
    world = World(2)
    world.boot()
    pid = world.fleet.slots[1].serving().pid  # type: ignore[union-attr]
    world.turn(0.5)
    world.exit(pid, exited(1))
    slot = world.fleet.slots[1]
    assert slot.state is SlotState.BACKOFF and slot.shown() is SlotState.BACKOFF
    assert world.fx.rescued == [1]
    world.turn(0.05)
    assert slot.state is SlotState.BACKOFF  # 0.1 s first
    world.turn(0.06)
    assert slot.state is SlotState.SERVING and slot.restarts == 1
    assert slot.serving() is not None and slot.serving().state is State.STARTING  # type: ignore[union-attr]


def test_a_program_that_keeps_crashing_makes_the_supervisor_give_up() -> None:
    world = World(1)
    world.boot()
    for _ in range(5):
        (pid,) = world.pids()
        world.exit(pid, exited(1))
        world.turn(6.0)
    assert world.fleet.fatal is not None and "failed 5 times in a row" in world.fleet.fatal
    assert world.fleet.stopping


def test_a_worker_that_ignores_its_stop_signal_is_killed_when_the_timer_fires() -> None:
    world = World(1, drain="signal", grace=3.0)
    world.boot()
    (pid,) = world.pids()
    world.fleet.stop()
    world.turn()
    world.turn()
    assert world.fx.sent(pid) == [signal.SIGTERM, signal.SIGCONT]
    world.turn(2.9)
    assert signal.SIGKILL not in world.fx.sent(pid)
    world.turn(0.2)
    assert world.fx.sent(pid)[-1] == signal.SIGKILL


def test_boot_failure_stops_with_the_reason() -> None:
    world = World(2)
    world.fleet.scheduler.start(procedures.boot(world.fleet), world.fleet.scope)
    pid = world.pids()[0]
    world.exit(pid, exited(2))
    assert world.fleet.fatal is not None and "exited before it was ready" in world.fleet.fatal
    world.turn()
    world.obey()
    world.turn()
    world.turn()
    assert world.fleet.exit_code == 1


def test_a_deferred_reply_reaches_the_waiter() -> None:
    world = World(1)
    world.boot()
    conn = Connection(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    try:
        outcome = Outcome(waiters=[conn])
        world.fleet.reload(outcome)
        world.turn()
        world.exit(world.fleet.slots[0].workers[-1].pid, exited(1))
        world.turn()
        assert [c for c, _ in world.fx.replies] == [conn]
        assert b'"ok": false' in world.fx.replies[0][1] or b'"ok":false' in world.fx.replies[0][1]
    finally:
        conn.sock.close()


def test_one_crash_looping_slot_backs_off_alone_while_the_others_serve() -> None:
    world = World(2)
    world.boot()
    slot = world.fleet.slots[1]
    for _ in range(8):
        (pid,) = [w.pid for w in slot.live()]
        world.exit(pid, exited(1))
        world.turn(6.0)
    assert world.fleet.fatal is None and not world.fleet.stopping
    assert slot.backoff.strikes == 8 and slot.restarts == 8
    assert world.fleet.slots[0].serving().state is State.READY  # type: ignore[union-attr]
    assert any(e.kind == "failing" for e in world.fleet.history.events)
    world.exit(world.fleet.slots[0].serving().pid, exited(1))  # type: ignore[union-attr]
    (pid,) = [w.pid for w in slot.live()]
    world.exit(pid, exited(1))  # now no slot serves: give up
    assert world.fleet.fatal is not None and "giving up" in world.fleet.fatal


def test_a_respawn_that_cannot_start_backs_off_instead_of_ending_the_service() -> None:
    world = World(2)
    world.boot()
    world.exit(world.fleet.slots[1].serving().pid, exited(1))  # type: ignore[union-attr]
    world.fx.spawn_error[1] = "cannot run worker command 'srv': No such file or directory"
    world.turn(0.2)  # the respawn fails at once (a moved command, a --user lookup, EMFILE)
    slot = world.fleet.slots[1]
    assert slot.state is SlotState.BACKOFF and not world.fleet.stopping
    del world.fx.spawn_error[1]
    world.turn(1.0)
    assert slot.state is SlotState.SERVING


def test_a_stop_whose_procedure_raises_still_ends_with_every_worker_killed() -> None:
    world = World(2)
    world.boot()

    def broken() -> list[socket.socket]:
        raise OSError(24, "Too many open files")

    world.fx.drop_syns = broken  # type: ignore[method-assign]
    world.fleet.stop()
    assert all(world.fx.sent(pid) == [signal.SIGKILL] for pid in world.pids())
    world.obey()
    world.turn()
    assert world.fleet.exit_code == 0


def test_a_drain_that_raises_kills_the_worker_rather_than_leave_it_frozen() -> None:
    world = World(1)
    world.boot()
    (old,) = world.pids()
    outcome = world.fleet.reload(Outcome())
    world.turn()

    def broken(w: Worker) -> bool:
        raise RuntimeError("a bug")

    world.fx.ready.update(world.pids())
    world.fx.holds_connections = broken  # type: ignore[method-assign]
    world.turn()
    assert world.fx.sent(old) == [signal.SIGSTOP, signal.SIGKILL]
    world.obey()
    world.turn()
    assert outcome.done and outcome.ok and world.fleet.state is SupervisorState.RUNNING


def test_a_reload_whose_procedure_raises_replies_and_allows_the_next() -> None:
    world = World(1)
    world.boot()

    def broken(what: str, text: str = "") -> None:
        if what == "reloading":
            raise RuntimeError("a bug")

    world.fx.notify = broken  # type: ignore[method-assign]
    outcome = world.fleet.reload(Outcome())
    assert outcome.done and "internal error" in outcome.error
    assert world.fleet.state is SupervisorState.RUNNING
    world.fleet.reload(Outcome())  # not refused as "already in progress"


def test_a_failed_scale_up_takes_its_new_slots_away_again() -> None:
    world = World(1)
    world.boot()
    world.fx.spawn_error[2] = "cannot run worker command 'srv': No such file or directory"
    outcome = world.fleet.scale(3, Outcome())  # slot 1 starts, slot 2 cannot
    assert not outcome.done
    (new,) = [w.pid for w in world.fleet.slots[1].live()]
    assert world.fx.sent(new) == [signal.SIGKILL]
    world.obey()
    world.turn()
    assert outcome.done and "scale up failed at slot 2" in outcome.error
    assert [s.index for s in world.fleet.slots] == [0] and world.fx.closed == [1, 2]
    assert world.fleet.cfg.workers == 1 and world.fleet.state is SupervisorState.RUNNING


def test_a_reload_replaces_a_slot_that_is_backing_off_instead_of_a_second_respawn() -> None:
    world = World(2)
    world.boot()
    world.turn(0.5)
    world.exit(world.fleet.slots[1].serving().pid, exited(1))  # type: ignore[union-attr]
    slot = world.fleet.slots[1]
    assert slot.state is SlotState.BACKOFF
    outcome = world.fleet.reload(Outcome())
    world.fx.ready.update(world.pids())
    for _ in range(20):
        world.turn()
        world.fx.ready.update(world.pids())
        world.obey()
    assert outcome.done and outcome.ok, outcome.error
    assert slot.state is SlotState.SERVING and len(slot.live()) == 1
    assert slot.respawn_at is None


def test_an_idle_old_worker_gets_its_stop_signal_only_once_its_slot_queue_is_empty() -> None:
    # A server that handles its stop signal accepts what is queued on the shared socket before
    # it stops listening and may close it unread: it is signalled only with the queue empty,
    # and killed (frozen, idle: nothing lost) if the slot keeps receiving connections even
    # while new SYNs are dropped.
    world = World(1)
    world.boot()
    (old,) = world.pids()
    world.fx.busy_queues.add(0)
    world.fleet.reload(Outcome())
    world.turn()
    new = world.fleet.slots[0].workers[-1].pid
    world.fx.ready.add(new)
    world.turn()
    world.turn()
    assert signal.SIGTERM not in world.fx.sent(old)  # queued connections: not yet
    world.turn(1.1)
    for _ in range(30):
        world.turn()
    assert world.fx.sent(old)[-1] == signal.SIGKILL  # the slot never emptied: killed idle
    assert signal.SIGTERM not in world.fx.sent(old)
    assert [on for _, on, _ in world.fx.holds] == [True, False]  # the hold ended


# ---- a host drain (portshard drain) ----------------------------------------------------------


def _waiter() -> Connection:
    return Connection(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))


def test_drain_keeps_serving_for_the_settle_time_then_stops_and_replies() -> None:
    world = World(2)
    world.boot()
    pids = world.pids()
    conn = _waiter()
    try:
        world.fleet.drain(DrainRequest(settle=3.0, wait=True), conn)
        assert world.fleet.state is SupervisorState.DRAINING
        assert ("stopping", "") in world.fx.notes  # systemd hears it at once
        world.turn(2.9)
        assert world.fx.syns_dropped_at is None and world.fx.signals == []  # still accepting
        with pytest.raises(ControlError, match="draining"):
            world.fleet.reload(Outcome())
        world.turn(0.2)
        assert world.fleet.state is SupervisorState.STOPPING
        assert world.fx.syns_dropped_at is not None
        world.turn()
        assert all(signal.SIGTERM in world.fx.sent(pid) for pid in pids)  # idle: its shutdown
        world.fx.clients = True  # `drain --wait` has not read its reply and exited yet
        world.obey()
        world.turn()
        assert world.fleet.state is SupervisorState.STOPPED and world.fleet.exit_code is None
        ((to, reply),) = world.fx.replies
        assert to is conn and b'"drained":true' in reply
        world.turn(1.0)
        assert world.fleet.exit_code is None  # PID 1 in a container: its exit kills the client
        with pytest.raises(ControlError, match="stopped already"):
            world.fleet.drain(DrainRequest())  # meanwhile: refused, not an internal error
        world.fx.clients = False
        world.turn()
        assert world.fleet.exit_code == 0
    finally:
        conn.sock.close()


def test_a_drain_done_in_time_exits_zero_even_if_its_deadline_passes_while_exiting() -> None:
    world = World(1)
    world.boot()
    world.fleet.drain(DrainRequest(settle=1.0, deadline=2.0, wait=True), _waiter())
    world.turn(1.1)
    world.turn()
    world.fx.clients = True  # the client reads its reply slowly
    world.obey()
    world.turn()
    assert world.fleet.state is SupervisorState.STOPPED and world.fleet.deadline_at is None
    world.turn(1.5)  # past the deadline, still waiting for the client
    world.fx.clients = False
    world.turn()
    assert world.fleet.exit_code == 0 and b'"drained":true' in world.fx.replies[0][1]
    world.fx.replies[0][0].sock.close()


def test_a_worker_that_crashes_while_the_drain_settles_is_respawned() -> None:
    world = World(2)
    world.boot()
    world.fleet.drain(DrainRequest(settle=5.0))
    world.turn(2.5)  # ran 2.5 s: respawned at once
    world.exit(world.fleet.slots[0].serving().pid, exited(1))  # type: ignore[union-attr]
    world.turn()
    assert world.fleet.slots[0].state is SlotState.SERVING  # the host still serves
    world.fx.ready.update(world.pids())
    world.turn(3.0)
    assert world.fleet.state is SupervisorState.STOPPING


def test_drain_deadline_kills_what_is_left_and_exits_non_zero() -> None:
    world = World(2, grace=30.0)
    world.boot()
    holder = world.pids()[0]
    world.fx.holding.add(holder)  # holds a long connection: freeze-check-kill waits for it
    conn = _waiter()
    try:
        world.fleet.drain(DrainRequest(settle=1.0, deadline=4.0, wait=True), conn)
        world.turn(1.1)
        world.turn()
        world.obey()  # the idle one went
        world.turn(2.0)
        assert world.fleet.slots[0].live() and signal.SIGKILL not in world.fx.sent(holder)
        world.turn(1.0)  # 4 s since the drain
        assert world.fx.sent(holder)[-1] == signal.SIGKILL
        world.obey()
        world.turn()
        world.turn()
        assert world.fleet.exit_code == 1
        ((_, reply),) = world.fx.replies
        assert b"deadline passed with 1 worker(s) still running" in reply
    finally:
        conn.sock.close()


def test_a_stop_during_the_settle_time_stops_at_once() -> None:
    world = World(1)
    world.boot()
    world.fleet.drain(DrainRequest(settle=30.0))
    world.turn()
    world.fleet.stop()
    assert world.fleet.state is SupervisorState.STOPPING and world.fx.syns_dropped_at
    world.turn()
    world.obey()
    world.turn()
    assert world.fleet.exit_code == 0


def test_drain_cancels_a_reload_and_a_second_drain_joins_with_the_earlier_deadline() -> None:
    world = World(1)
    world.boot()
    outcome = world.fleet.reload(Outcome())
    world.turn()
    new = world.fleet.slots[0].workers[-1].pid
    world.fleet.drain(DrainRequest(settle=2.0, deadline=60.0))
    world.turn()
    assert outcome.done and "draining" in outcome.error and world.fx.sent(new) == [signal.SIGKILL]
    world.fleet.drain(DrainRequest(settle=9.0, deadline=10.0))
    assert world.fleet.state is SupervisorState.DRAINING
    assert world.fleet.deadline_at == pytest.approx(world.fx.clock + 10.0)
    world.turn(2.0)  # the first drain's settle time holds
    assert world.fleet.state is SupervisorState.STOPPING


def test_drain_request_checks_its_numbers() -> None:
    assert parse_request({}) == DrainRequest(5.0, None, False)
    assert parse_request({"deadline": 4, "wait": True}) == DrainRequest(2.0, 4.0, True)
    with pytest.raises(ControlError, match="--settle 10 is longer than --deadline 5"):
        parse_request({"settle": 10, "deadline": 5})
    with pytest.raises(ControlError, match="deadline must be a number of seconds, not 'x'"):
        parse_request({"deadline": "x"})
    with pytest.raises(ControlError, match="settle -1 is out of range"):
        parse_request({"settle": -1})


def _reload_one_slot_unshielded(world: World) -> tuple[int, int]:
    world.boot()
    (old,) = world.pids()
    world.fx.unshielded.add(0)
    world.fleet.reload(Outcome())
    world.turn()
    new = world.fleet.slots[0].workers[-1].pid
    world.fx.ready.add(new)
    world.turn()
    world.turn()
    return old, new


def test_an_idle_old_worker_of_an_unshielded_slot_is_signalled_while_new_syns_are_dropped() -> None:
    # Steering off (or one slot): nothing keeps new connections off the slot's shared socket,
    # so its SYNs are dropped (clients retry) until the signalled worker has closed it; a
    # server that handles its stop signal then cannot accept anything on its way out.
    world = World(1)
    old, _ = _reload_one_slot_unshielded(world)
    (slot, on, began), *rest = world.fx.holds
    assert (slot, on) == (0, True) and not rest
    assert world.fx.sent(old)[-1] == signal.SIGSTOP  # frozen while handshakes finish
    world.fx.listening.add(old)
    for _ in range(4):
        world.turn()
    assert world.fx.sent(old)[-2:] == [signal.SIGTERM, signal.SIGCONT]  # queued before thawing
    assert len(world.fx.holds) == 1  # still listening: still held
    world.fx.listening.discard(old)
    world.turn()
    (_, off, ended) = world.fx.holds[-1]
    assert not off and ended - began <= procedures.HOLD_MAX
    world.exit(old, exited(0))
    world.turn()
    assert signal.SIGKILL not in world.fx.sent(old)


def test_a_hold_ends_within_its_bound_even_if_the_old_worker_keeps_its_socket() -> None:
    # A client whose SYN was dropped retries after 1 s: the hold must end before that.
    world = World(1)
    old, _ = _reload_one_slot_unshielded(world)
    world.fx.listening.add(old)
    for _ in range(60):
        world.turn()
    (_, _, began), (_, off, ended) = world.fx.holds
    assert not off and ended - began <= procedures.HOLD_MAX + 0.05
    assert signal.SIGTERM in world.fx.sent(old) and signal.SIGKILL not in world.fx.sent(old)


def test_an_idle_old_worker_whose_slot_cannot_be_held_is_killed_not_signalled() -> None:
    # --via reuseport (the worker's own socket) or a UDP socket: killed frozen and idle, it
    # loses nothing (its shutdown does not run).
    world = World(1)
    world.fx.holdable = False
    old, _ = _reload_one_slot_unshielded(world)
    assert world.fx.sent(old)[-1] == signal.SIGKILL and signal.SIGTERM not in world.fx.sent(old)
    assert not world.fx.holds


def test_a_reload_starts_the_next_slot_while_an_idle_old_worker_runs_its_shutdown() -> None:
    # An old worker signalled idle holds nothing and gets no new connection: the next slot's
    # replacement starts during its shutdown; the reload is done only once every old one exits.
    world = World(2)
    world.boot()
    old = world.pids()
    outcome = world.fleet.reload(Outcome())
    world.turn()
    world.fx.ready.add(world.fleet.slots[0].workers[-1].pid)
    world.turn()
    world.turn()
    assert world.fx.sent(old[0])[-2:] == [signal.SIGTERM, signal.SIGCONT]
    world.turn()
    assert len(world.fleet.slots[1].workers) == 2  # started while old[0] still runs
    world.fx.ready.add(world.fleet.slots[1].workers[-1].pid)
    world.turn()
    world.turn()
    assert world.fx.sent(old[1])[-2:] == [signal.SIGTERM, signal.SIGCONT]
    world.exit(old[1], exited(0))
    world.turn()
    assert not outcome.done  # old[0] is still running its shutdown
    world.exit(old[0], exited(0))
    world.turn()
    assert outcome.done and outcome.ok and world.fleet.reloads["ok"] == 1


def test_a_reload_waits_for_an_old_worker_that_was_signalled_holding_connections() -> None:
    # --drain signal: the old worker may serve long-lived connections for --grace; the next
    # slot waits for it (it may still be serving: as before).
    world = World(2, drain="signal")
    world.boot()
    old = world.pids()
    world.fleet.reload(Outcome())
    world.turn()
    world.fx.ready.add(world.fleet.slots[0].workers[-1].pid)
    world.turn()
    world.turn()
    assert signal.SIGTERM in world.fx.sent(old[0])
    for _ in range(3):
        world.turn()
    assert len(world.fleet.slots[1].workers) == 1
    world.exit(old[0], exited(0))
    world.turn()
    assert len(world.fleet.slots[1].workers) == 2
