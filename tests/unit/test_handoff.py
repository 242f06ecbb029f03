"""Issue 15's pure parts: resuming from a predecessor's workers (a fake effects layer and clock,
as test_procedures.py), the lineage, the upgrade's check command, the warden's wire format
over a real socketpair with real fds."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from portshard.control.paths import warden_address
from portshard.errors import ConfigError, SupervisorError
from portshard.supervisor import handoff, procedures, warden
from portshard.supervisor.config import load
from portshard.supervisor.state import (
    SLOT_TABLE,
    Lifecycle,
    Machine,
    SlotState,
    State,
    SupervisorState,
)
from portshard.supervisor.status import Lineage, Status
from portshard.supervisor.upgrade import check_command
from portshard.supervisor.worker import Worker
from tests.unit.test_procedures import World


def adopted(world: World, slot: int, state: State) -> Worker:
    """A worker of a dead supervisor, restored as handoff.restore does."""
    s = world.fleet.slots[slot]
    world.fx.next_pid += 1
    w = Worker(s, world.fx.next_pid, -1, 1, "boot", world.fx.clock)
    w.life = Lifecycle(state)
    w.child = False
    s.workers.append(w)
    s.machine = Machine(SLOT_TABLE, SlotState.SERVING)
    return w


def test_resume_spawns_only_the_empty_slots_and_retires_what_a_reload_left() -> None:
    world = World(3)
    old = adopted(world, 0, State.READY)
    new = adopted(world, 0, State.STARTING)  # a reload's replacement, left starting
    kept = adopted(world, 1, State.READY)
    world.fleet.scheduler.start(procedures.resume(world.fleet), world.fleet.scope)
    world.turn()
    spawned = world.fleet.slots[2].live()
    assert len(spawned) == 1 and spawned[0].role == "respawn"  # slot 2 had no worker
    world.fx.ready.add(spawned[0].pid)
    world.turn()
    assert world.fleet.state is SupervisorState.BOOTING  # the replacement is not judged yet
    assert world.fx.sent(old.pid) == []
    world.fx.ready.add(new.pid)
    world.turn()
    world.turn(0.05)
    assert world.fleet.state is SupervisorState.RUNNING
    assert signal_sent(world, old.pid) and world.fx.sent(kept.pid) == []
    assert world.fleet.slots[0].serving() is new


def signal_sent(world: World, pid: int) -> bool:
    return bool(world.fx.sent(pid))


def test_lineage_counts_upgrades_and_adoptions_and_survives_json() -> None:
    first = Lineage(since=10.0, first=10.0, version="1")
    up = first.successor("upgrade", "2", 20.0)
    again = Lineage.from_json(up.to_json()).successor("adoption", "2", 30.0)
    assert (again.generation, again.upgrades, again.adoptions) == (3, 1, 1)
    assert again.began == "adoption" and again.first == 10.0 and again.since == 30.0
    assert Lineage.from_json({**again.to_json(), "unknown": 1}) == again


def test_status_json_carries_the_lineage_and_adopted_workers() -> None:
    st = {
        "name": "x",
        "pid": 1,
        "slots": [
            {
                "slot": 0,
                "state": "ready",
                "workers": [{"pid": 5, "state": "ready", "generation": 1, "adopted": 12.5}],
            }
        ],
        "supervisor": Lineage(generation=2, began="adoption", adoptions=1).to_json(),
    }
    back = Status.from_json(st)
    assert back.supervisor is not None and back.supervisor.adoptions == 1
    assert back.slots[0].workers[0].adopted == 12.5
    assert back.to_json()["slots"][0]["workers"][0]["adopted"] == 12.5


def test_check_command_puts_check_after_run_only() -> None:
    argv = ["/py", "-m", "portshard", "run", "-w", "2", "--", "srv", "run"]
    assert check_command(argv) == [
        "/py",
        "-m",
        "portshard",
        "run",
        "--check",
        "-w",
        "2",
        "--",
        "srv",
        "run",
    ]


def test_the_wire_carries_messages_and_fds_in_batches() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pipes = [os.pipe() for _ in range(warden.FDS_PER_MESSAGE + 5)]
    try:
        warden.send(a, {"op": "manifest", "manifest": {"slots": list(range(3000))}})
        warden.send_fds(a, ((f"k{i}", r) for i, (r, _w) in enumerate(pipes)))
        msg, fds = warden.recv(b)
        assert msg == {"op": "manifest", "manifest": {"slots": list(range(3000))}} and not fds
        got: dict[str, int] = {}
        for _ in range(2):
            msg, fds = warden.recv(b)
            assert msg is not None and msg["op"] == "put"
            got.update(zip(msg["keys"], fds, strict=True))
        assert len(got) == len(pipes)
        os.write(pipes[7][1], b"x")  # the copy reads what the original's pipe holds
        assert os.read(got["k7"], 1) == b"x"
        for fd in got.values():
            os.close(fd)
        a.close()
        assert warden.recv(b) == (None, [])  # EOF: the supervisor is gone
    finally:
        b.close()
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_warden_address_is_by_control_path() -> None:
    assert warden_address("/run/x.sock") == warden_address("/run/../run/x.sock")
    assert warden_address("/run/x.sock") != warden_address("/run/y.sock")
    assert warden_address("/run/x.sock").startswith(b"\0portshard/warden/")


def test_an_upgrade_whose_file_turned_invalid_keeps_the_values_it_ran_with(tmp_path: Path) -> None:
    conf = tmp_path / "ps.toml"
    conf.write_text('command = ["srv"]\nlisten = ["tcp://127.0.0.1:0"]\ngrace = 7\n')
    cli = {"config": str(conf)}
    ran = load(cli)
    assert ran.grace == 7 and ran.file_data is not None
    conf.write_text('grace = "soon"\n')  # edited between the upgrade's check and its exec
    with pytest.raises(ConfigError, match="soon"):
        handoff.running_settings(cli, None)  # a plain start: the error, as always
    manifest = json.loads(json.dumps({"file": dict(ran.file_data)}))  # as the memfd has it
    upgrade = handoff.Resume("upgrade", manifest, {})
    assert handoff.running_settings(cli, upgrade).grace == 7
    with pytest.raises(ConfigError):  # an adoption is a new `portshard run`: its file counts
        handoff.running_settings(cli, handoff.Resume("adoption", manifest, {}))
    with pytest.raises(ConfigError):  # an old image that handed no file values on
        handoff.running_settings(cli, handoff.Resume("upgrade", {}, {}))
    conf.write_text('command = ["srv"]\nlisten = ["tcp://127.0.0.1:0"]\ngrace = 9\n')
    assert handoff.running_settings(cli, upgrade).grace == 9  # a valid file is read


@pytest.mark.parametrize("content", [b"{}", b"[1]", b'{"manifest": {}, "fds": 3}', b"nope"])
def test_a_stray_resume_variable_is_refused_with_the_fix(
    content: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A $PORTSHARD_RESUME left in an environment (a shell that copied an upgrade's, a test
    # harness) naming an fd of JSON that is not a manifest raised KeyError out of `run`.
    fd = os.memfd_create("stray", 0)
    os.write(fd, content)
    os.lseek(fd, 0, os.SEEK_SET)
    monkeypatch.setenv(handoff.RESUME_ENV, str(fd))
    with pytest.raises(SupervisorError, match="only `portshard upgrade` sets it"):
        handoff.from_env()


def test_a_resume_variable_naming_stdin_is_refused_and_stdin_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(handoff.RESUME_ENV, "0")
    with pytest.raises(SupervisorError, match="unset it"):
        handoff.from_env()
    os.fstat(0)  # not closed
