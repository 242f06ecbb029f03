"""Issue 15: no single point of failure. `portshard upgrade` replaces the supervisor keeping every
socket and worker; a supervisor that dies leaves its workers serving, and the next `portshard
run` with the same control socket adopts them; nobody adopting them stops them after
--orphan-timeout. Real supervisors, real workers, loopback, port 0, bounded loads."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from bench.load.loadgen import Load

from portshard.control.client import request
from portshard.errors import ControlError
from portshard.linux import cgroup, syscalls
from portshard.steering import cbpf
from tests.conftest import wait_until
from tests.integration.test_supervisor import udp_clients, udp_slots
from tests.supervisor_fixture import FDWORKER, Running, no_process_left, settle, warden_pids

WORKER_ENV = {"WORK_MS": "1"}


class Fleet:
    """Supervisors started for one test on one control socket (a restart reuses it); at the
    end every one is stopped, and whatever a killed one left (a warden, workers) is killed."""

    def __init__(self, tmp: Path) -> None:
        self.control = tmp / "up.sock"
        self.tag = f"--tag={uuid.uuid4().hex[:12]}"
        self.started: list[Running] = []

    def run(
        self,
        *args: str,
        wait: bool = True,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
    ) -> Running:
        log = self.control.with_name(f"up{len(self.started)}.log")
        name = ("--name", f"up-{self.tag[-12:]}")  # its own cgroup home, whoever else runs
        env = {**WORKER_ENV, **(env or {})}
        command = command or [*FDWORKER, self.tag]
        sup = Running([*name, *args, "--", *command], self.control, env, log)
        self.started.append(sup)
        if wait:
            sup.wait_ready()
        return sup

    def warden_pids(self) -> list[int]:
        return warden_pids(self.control)

    def home(self, sup: Running) -> Path:
        """``sup``'s cgroup home (the cgroup mechanism's)."""
        assert sup.proc is not None
        base = Path(cgroup.detect().base or "")
        return next(base.glob(f"up-{self.tag[-12:]}.{sup.proc.pid}"))

    def close(self) -> None:
        for sup in self.started:
            sup.close()
        for pid in self.warden_pids():
            os.kill(pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", "--", self.tag], check=False)
        # A supervisor killed with no warden (--orphan-timeout 0) leaves its groups for the
        # next start of its name to sweep; this test's name has no next start.
        from portshard.linux import cgroup

        base = cgroup.detect().base
        for home in Path(base).glob(f"up-{self.tag[-12:]}.*") if base else ():
            cgroup.Cgroup(str(home)).remove(wait=2.0)


@pytest.fixture
def fleet(short_tmp: Path) -> Iterator[Fleet]:
    f = Fleet(short_tmp)
    yield f
    f.close()


def kill9(sup: Running) -> None:
    assert sup.proc is not None
    sup.proc.kill()
    sup.wait_exit(5)


def exited(pid: int) -> bool:
    """Gone, or a zombie (its parent, now init or a subreaper, has not reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def served(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(b"GET / HTTP/1.0\r\n\r\n")
        return c.recv(4096).decode(errors="replace")


def test_five_upgrades_under_load_fail_nothing(fleet: Fleet) -> None:
    sup = fleet.run("-w", "4", "--listen", "tcp://127.0.0.1:0")
    before = sup.status()
    pids = sup.pids()
    with Load("127.0.0.1", sup.port, concurrency=16, max_seconds=120) as load:
        load.wait_for(200)
        for _ in range(5):
            res = sup.ctl("upgrade")
            assert "upgraded" in res.stdout
            load.wait_for(load.count() + 100)
    st = sup.status()
    print(f"upgrades: {load.count()} requests, failed {load.by_kind()}")
    assert not load.failed, load.by_kind()
    assert st["pid"] == before["pid"]  # exec in place
    assert sup.pids() == pids  # every worker kept
    assert st["supervisor"]["generation"] == 6 and st["supervisor"]["upgrades"] == 5
    assert st["supervisor"]["began"] == "upgrade"
    sup.ctl("reload")  # the upgraded supervisor drives its workers
    assert set(sup.pids()).isdisjoint(pids)
    sup.close()
    assert sup.proc is not None and sup.proc.returncode == 0
    wait_until(lambda: no_process_left(fleet.tag), 5, "workers gone")
    assert not fleet.warden_pids()


def test_an_upgrade_that_cannot_start_leaves_the_old_one_serving(
    fleet: Fleet, short_tmp: Path
) -> None:
    conf = short_tmp / "ps.toml"
    conf.write_text('listen = ["tcp://127.0.0.1:0"]\nworkers = 2\n')
    sup = fleet.run("-c", str(conf))
    port = sup.port
    conf.write_text("workers = [this is not toml\n")
    res = sup.ctl("upgrade", check=False)
    assert res.returncode != 0
    assert "would not start" in res.stderr and "ps.toml" in res.stderr, res.stderr
    assert "goes on" in res.stderr and "Traceback" not in res.stderr
    st = sup.status()
    assert st["supervisor"]["generation"] == 1 and "ps.toml" in st["supervisor"]["upgrade_error"]
    assert served(port)  # still serving
    conf.write_text('listen = ["tcp://127.0.0.1:0"]\nworkers = 2\n')
    sup.ctl("upgrade")
    assert sup.status()["supervisor"]["generation"] == 2


def test_a_killed_supervisor_is_adopted_by_the_next_run_and_nothing_fails(fleet: Fleet) -> None:
    args = ("-w", "4", "--listen", "tcp://127.0.0.1:0")
    first = fleet.run(*args)
    port, pids = first.port, first.pids()
    with Load("127.0.0.1", port, concurrency=8, max_seconds=120) as load:
        load.wait_for(200)
        kill9(first)
        during = load.count()
        with pytest.raises(ControlError, match="its warden keeps its workers serving: run"):
            request(str(fleet.control), "status", timeout=10)  # not "a stale socket"
        settle(2.0)  # nobody supervises: the workers serve on
        served_alone = load.count() - during
        second = fleet.run(*args)
        st = second.status()
        assert [s["pid"] for s in st["slots"]] == pids, first.text() + second.text()
        assert all(w.get("adopted") for s in st["slots"] for w in s["workers"])
        assert st["supervisor"]["adoptions"] == 1 and st["supervisor"]["began"] == "adoption"
        second.ctl("reload", "--wait")
        load.wait_for(load.count() + 100)
    print(
        f"crash: {load.count()} requests ({served_alone} with no supervisor), "
        f"failed {load.by_kind()}"
    )
    assert served_alone > 50
    assert not load.failed, load.by_kind()
    assert set(second.pids()).isdisjoint(pids)
    assert "adopted 4 running worker(s)" in second.text()
    second.close()
    wait_until(lambda: no_process_left(fleet.tag), 5, "workers gone")
    wait_until(lambda: not fleet.warden_pids(), 5, "wardens gone")


def test_a_rerun_naming_the_bound_port_keeps_the_sockets_it_adopts(fleet: Fleet) -> None:
    # Started on port 0, run again on the port its log and status showed: the same socket.
    # It was a new address: new sockets beside the adopted ones, every worker replaced by a
    # reload, and the old sockets closed with their queues (a reset in each of 3 runs).
    first = fleet.run("-w", "2", "--steering", "off", "--listen", "tcp://127.0.0.1:0")
    port, pids = first.port, first.pids()
    with Load("127.0.0.1", port, concurrency=8, max_seconds=120) as load:
        load.wait_for(100)
        kill9(first)
        second = fleet.run("-w", "2", "--steering", "off", "--listen", f"tcp://127.0.0.1:{port}")
        load.wait_for(load.count() + 300)
        st = second.status()
    assert not load.failed, load.by_kind()
    assert st["listen"][0]["port"] == port
    assert [s["pid"] for s in st["slots"]] == pids, second.text()
    assert st["reloads"]["ok"] == 0 and "--listen changed" not in second.text()


def test_an_adopted_slot_sheds_the_syn_filter_a_dying_supervisor_left(fleet: Fleet) -> None:
    # A supervisor killed while it held new connections off a slot (a reload's hold, with
    # steering off) leaves the SYN-drop filter on that slot's socket. The next supervisor
    # holds nothing off it: with the filter left, every connection the kernel hashed there
    # timed out. The test puts that filter on slot 1's socket (through its worker's fd 3).
    args = ("-w", "2", "--steering", "off", "--listen", "tcp://127.0.0.1:0")
    first = fleet.run(*args)
    port, victim = first.port, first.pids()[1]
    pidfd = os.pidfd_open(victim)
    try:
        with socket.socket(fileno=syscalls.pidfd_getfd(pidfd, 3)) as copy:
            cbpf.drop_syns(copy)  # the socket's filter, whoever holds it
    finally:
        os.close(pidfd)
    kill9(first)
    second = fleet.run(*args)
    assert second.pids() == first.pids()
    answers = [served(port).split()[-3] for _ in range(40)]  # "slot pid gen"
    assert set(answers) == {"0", "1"}, answers


def test_an_adoption_with_steering_off_drops_the_first_k_program_a_scale_down_left(
    fleet: Fleet,
) -> None:
    # Killed in a scale down with steering off, a supervisor leaves its "first k sockets"
    # program on the group; the adopter kept every slot (all "ready" in status), and those
    # past k got no connection at all (seen: 400 requests, 2 of 4 workers). The test attaches
    # that program as the scale down 4 -> 2 does (through slot 0's worker's fd 3).
    args = ("-w", "4", "--steering", "off", "--listen", "tcp://127.0.0.1:0")
    first = fleet.run(*args)
    port, pids = first.port, first.pids()
    pidfd = os.pidfd_open(pids[0])
    try:
        with socket.socket(fileno=syscalls.pidfd_getfd(pidfd, 3)) as copy:
            cbpf.attach_first_k(copy, 2)  # the group's program, whoever holds a socket
    finally:
        os.close(pidfd)
    kill9(first)
    second = fleet.run(*args)
    assert second.pids() == pids
    answers: set[str] = set()
    for _ in range(400):  # plain hashing: each of 4 slots within 400 is all but certain
        answers.add(served(port).split()[-3])  # "slot pid gen"
        if len(answers) == 4:
            break
    assert answers == {"0", "1", "2", "3"}, answers


STRAY = """
import socket, sys
import portshard
sock = portshard.listen(f"tcp://127.0.0.1:{sys.argv[1]}")
print("listening", flush=True)
while True:
    conn, _ = sock.accept()
    conn.recv(100)
    conn.sendall(b"HTTP/1.0 200 OK\\r\\n\\r\\nstray 0 0")
    conn.close()
"""


@pytest.mark.skipif(
    cgroup.detect().mechanism is not cgroup.Mechanism.MOUNTED, reason="worker groups to find"
)
def test_an_adopter_kills_a_worker_its_predecessor_had_not_recorded(fleet: Fleet) -> None:
    # The warden gets the manifest at most every 0.1 s: a supervisor killed 0.6 s into a
    # scale 2 -> 4 had started a worker its manifest did not name yet. The adopter did not
    # know it: it served on (144 of 400 requests), in no status, past every reload. The test
    # makes such a worker: a process in a new worker group of the home, on a socket of the
    # port's group.
    first = fleet.run("-w", "2", "--steering", "off", "--listen", "tcp://127.0.0.1:0")
    port, pids = first.port, first.pids()
    assert first.proc is not None
    home = fleet.home(first)
    group = home / "slot2-99"
    group.mkdir()
    stray = subprocess.Popen(
        [sys.executable, "-c", STRAY, str(port), fleet.tag], stdout=subprocess.PIPE, text=True
    )
    try:
        assert stray.stdout is not None and stray.stdout.readline().startswith("listening")
        (group / "cgroup.procs").write_text(str(stray.pid))
        kill9(first)
        second = fleet.run("-w", "2", "--steering", "off", "--listen", "tcp://127.0.0.1:0")
        assert second.pids() == pids
        assert stray.wait(10) == -signal.SIGKILL, second.text()
        assert "not yet recorded" in second.text()
        answers = {served(port).split()[-2] for _ in range(40)}  # "slot pid gen"
        assert answers == {str(p) for p in pids}, answers
    finally:
        stray.kill()
        stray.wait()


@pytest.mark.skipif(
    cgroup.detect().mechanism is not cgroup.Mechanism.MOUNTED or not shutil.which("strace"),
    reason="worker groups to find, and strace to hold a worker before its exec",
)
def test_a_scale_ups_new_slot_is_known_to_the_warden_before_its_worker_runs(
    fleet: Fleet,
) -> None:
    # Killed between a scale up's spawn and its next sync, a supervisor left a worker of a
    # slot its warden had never heard of: the adopter stopped that slot and killed the
    # worker (whatever it had accepted was lost). The warden now gets a new slot's sockets
    # before its worker is forked. The test holds the supervisor in that window: strace
    # delays the new worker's execve, which the supervisor waits for (the worker has joined
    # its group by then).
    args = ("-w", "2", "--listen", "tcp://127.0.0.1:0")
    first = fleet.run(*args)
    assert first.proc is not None
    pids = first.pids()
    home = fleet.home(first)
    delay = ["-e", "trace=execve", "-e", "inject=execve:delay_enter=3000000"]  # 3 s
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-o", "/dev/null", *delay, "-p", str(first.proc.pid)],
        stderr=subprocess.DEVNULL,
    )
    try:
        status = Path(f"/proc/{first.proc.pid}/status")
        wait_until(lambda: "TracerPid:\t0\n" not in status.read_text(), 10, "strace attached")
        with pytest.raises(ControlError):  # no answer: it waits for the exec
            request(str(fleet.control), "scale", timeout=1, workers=3, wait=False)

        def new_worker() -> int | None:
            for group in home.glob("slot2-*"):
                members = (group / "cgroup.procs").read_text().split()
                if members:
                    return int(members[0])
            return None

        pid = wait_until(new_worker, 10, "slot 2's worker, before its exec")
        kill9(first)
    finally:
        tracer.terminate()
        tracer.wait(10)
    second = fleet.run(*args)
    log = second.text()
    assert "killing pid(s)" not in log, log
    assert second.pids() == [*pids, pid], log
    assert not exited(pid)


AS_FD3 = """
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.close(int(sys.argv[1]))
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.execv(sys.argv[2], sys.argv[2:])
"""
MOUNTED = cgroup.detect().mechanism is cgroup.Mechanism.MOUNTED


@pytest.mark.parametrize(
    "mechanism",
    [
        pytest.param("cgroup", marks=pytest.mark.skipif(not MOUNTED, reason="no worker groups")),
        "subreaper",
    ],
)
def test_an_unrecorded_worker_of_a_slot_is_drained_not_killed(fleet: Fleet, mechanism: str) -> None:
    # Killed 1 ms into a reload, a supervisor had started a slot's new worker its manifest
    # did not name yet. That worker shares its slot's socket and had accepted connections:
    # the adopter SIGKILLed it, and a request it held failed (1 reset or empty answer in
    # ~6,000, 1 run in 20 under load). The test makes such a worker: a copy of slot 1's
    # worker on slot 1's socket, in a new worker group (or with a $PORTSHARD_TREE of the
    # lineage), serving before the kill. The adopter must drain it: its stop signal, no
    # failed request.
    args = ("-w", "2", "--listen", "tcp://127.0.0.1:0")
    env = {} if mechanism == "cgroup" else {"PORTSHARD_CGROUP": "off"}
    first = fleet.run(*args, env=env)
    port, pids = first.port, first.pids()
    assert first.proc is not None
    pidfd = os.pidfd_open(pids[1])
    try:
        fd = syscalls.pidfd_getfd(pidfd, 3)  # slot 1's socket
    finally:
        os.close(pidfd)
    with open(f"/proc/{pids[1]}/environ", "rb") as f:
        worker_env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    stray_env = {**os.environ, **WORKER_ENV, "PORTSHARD_SLOT": "1", "GEN": "stray"}
    if mechanism == "subreaper":
        lineage = worker_env[b"PORTSHARD_TREE"].decode().partition("#")[0]
        stray_env["PORTSHARD_TREE"] = f"{lineage}#1.unrecorded"
    stray = subprocess.Popen(
        [sys.executable, "-c", AS_FD3, str(fd), *FDWORKER, fleet.tag], pass_fds=(fd,), env=stray_env
    )
    os.close(fd)
    try:
        if mechanism == "cgroup":
            home = fleet.home(first)
            (home / "slot1-99").mkdir()
            (home / "slot1-99" / "cgroup.procs").write_text(str(stray.pid))
        with Load("127.0.0.1", port, concurrency=8, max_seconds=120) as load:
            wait_until(
                lambda: any(r.body.endswith(" stray") for r in load.results),
                20,
                "the stray serving",
            )
            kill9(first)
            second = fleet.run(*args, env=env)
            assert sorted(second.pids()) == sorted(pids)
            assert stray.wait(20) == 0, second.text()  # its stop signal, not SIGKILL
            load.wait_for(load.count() + 100)
        log = second.text()
        assert f"slot 1 pid {stray.pid}: a worker the supervisor that died" in log, log
        assert "retiring it once every slot serves" in log, log
        assert not load.failed, (load.by_kind(), log)
        assert served(port).split()[-2] in {str(p) for p in pids}
    finally:
        stray.kill()
        stray.wait()


def test_a_reloads_old_worker_that_exits_while_nobody_supervises_is_not_called_lost(
    fleet: Fleet,
) -> None:
    # Killed while a reload's old worker was stopping (its replacement ready in the same
    # slot), the rerun found the old one gone and said "its slot starts a new one": the slot
    # kept, and served with, the replacement; nothing was started.
    args = ("-w", "2", "--drain", "signal", "--listen", "tcp://127.0.0.1:0")
    first = fleet.run(*args, env={"STOP_DELAY": "1.5"})
    old = first.pids()

    def stopping() -> int | None:
        workers = [w for s in first.status()["slots"] for w in s["workers"]]
        return next((w["pid"] for w in workers if w["state"] == "stopping"), None)

    first.ctl("reload", "--no-wait")
    retiring = wait_until(stopping, 20, "an old worker stopping")
    settle(0.3)  # the warden's manifest (at most every 0.1 s) names it
    kill9(first)
    wait_until(lambda: exited(retiring), 10, "the old worker's exit")
    second = fleet.run(*args)
    pids = second.pids()
    log = second.text()
    assert retiring in old and retiring not in pids, log
    assert f"pid {retiring}: exited while the supervisor was away (it was stopping)" in log
    assert "starts a new one" not in log and "started (" not in log, log


def test_an_adopter_carries_on_the_drain_its_predecessor_had_begun(fleet: Fleet) -> None:
    # Killed during a drain's settle time, the rerun served as if no drain had been asked:
    # health said serving again and the leaving host took new connections until whatever
    # stops it killed it. Now it drains on for what was left of the settle time, then stops.
    args = ("-w", "2", "--listen", "tcp://127.0.0.1:0")
    first = fleet.run(*args)
    port = first.port
    first.ctl("drain", "--settle", "4")
    wait_until(lambda: first.status()["state"] == "draining", 5, "draining")
    settle(0.3)  # the warden's manifest says so
    kill9(first)
    began = time.monotonic()
    second = fleet.run(*args, wait=False)

    def state() -> str | None:
        try:
            return str(request(second.control, "status", timeout=10)["state"])
        except ControlError:
            return None  # not listening yet

    assert wait_until(state, 20, "the adopter up") == "draining", second.text()
    if time.monotonic() - began < 2.5:  # what is left of the settle time: still served
        assert served(port)
    assert second.wait_exit(30) == 0, second.text()
    assert "was draining: carrying on" in second.text()
    wait_until(lambda: no_process_left(fleet.tag), 10, "every worker gone")
    assert not fleet.warden_pids()


def test_without_cgroups_an_adopter_kills_a_worker_its_predecessor_had_not_recorded(
    fleet: Fleet,
) -> None:
    # The same under the subreaper mechanism (no cgroup names a tree): the adopter found
    # nothing, and the unrecorded worker served on. Workers carry $PORTSHARD_TREE there; the
    # test's stray carries one of the lineage that the manifest does not name.
    args = ("-w", "2", "--steering", "off", "--listen", "tcp://127.0.0.1:0")
    env = {"PORTSHARD_CGROUP": "off"}
    first = fleet.run(*args, env=env)
    port, pids = first.port, first.pids()
    assert "child subreaper" in first.text()
    with open(f"/proc/{pids[0]}/environ", "rb") as f:
        tree = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    lineage = tree[b"PORTSHARD_TREE"].decode().partition("#")[0]
    stray = subprocess.Popen(
        [sys.executable, "-c", STRAY, str(port), fleet.tag],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PORTSHARD_TREE": f"{lineage}#2.unrecorded"},
    )
    try:
        assert stray.stdout is not None and stray.stdout.readline().startswith("listening")
        kill9(first)
        second = fleet.run(*args, env=env)
        assert sorted(second.pids()) == sorted(pids)
        assert stray.wait(10) == -signal.SIGKILL, second.text()
        assert f"killing pid(s) {stray.pid}: a worker of slot 2, which" in second.text()
    finally:
        stray.kill()
        stray.wait()


def test_workers_nobody_adopts_serve_for_the_bound_then_stop(fleet: Fleet) -> None:
    sup = fleet.run("-w", "2", "--listen", "tcp://127.0.0.1:0", "--orphan-timeout", "2")
    port = sup.port
    kill9(sup)
    killed = time.monotonic()
    assert served(port)  # the workers go on serving
    wait_until(lambda: no_process_left(fleet.tag), 15, "the orphaned workers to stop")
    gone = time.monotonic() - killed
    print(f"orphans: stopped {gone:.2f}s after the supervisor died (bound 2s)")
    assert gone >= 1.5
    wait_until(lambda: not fleet.warden_pids(), 5, "the warden to exit")
    log = sup.text()
    assert "nobody adopted the workers" in log and "2 stopped by their stop signal" in log, log
    with pytest.raises(OSError):
        served(port)
    ours = f"up-{fleet.tag[-12:]}."
    left = [p for p in Path("/run/portshard/cgroup2/portshard").glob(ours + "*")]
    assert not left  # no group of ours left behind
    assert not fleet.control.exists()  # nor the dead supervisor's control socket


def test_udp_flows_never_move_across_upgrades_and_a_crash(fleet: Fleet) -> None:
    args = ("-w", "4", "--listen", "udp://127.0.0.1:0")
    sup = fleet.run(*args)
    port = sup.port
    with udp_clients(200) as clients:
        first = udp_slots(port, clients)
        assert len(set(first)) >= 3

        def moved() -> int:
            return sum(a != b for a, b in zip(first, udp_slots(port, clients), strict=True))

        total = 0
        for _ in range(3):
            sup.ctl("upgrade")
            total += moved()
        kill9(sup)
        total += moved()
        fleet.run(*args)
        total += moved()
        print(f"udp: 200 flows, 3 upgrades, 1 crash + adoption: {total} moved")
        assert total == 0


def test_udp_flows_stay_when_a_worker_dies_with_its_supervisor(fleet: Fleet) -> None:
    # The supervisor killed just after a reload (its warden's table from the last handover,
    # one slot's buckets still lent) together with slot 1's worker: the adopter put the
    # handed-over slot back in and slot 1 out in one assignment, and once slot 1 was
    # respawned two healthy slots had swapped a third of their flows for good (2 runs in 4;
    # the deterministic case is test_steering_table's). Every flow must end where it was.
    args = ("-w", "4", "--listen", "udp://127.0.0.1:0")
    sup = fleet.run(*args)
    assert sup.proc is not None
    port = sup.port
    with udp_clients(200) as clients:
        first = udp_slots(port, clients)
        sup.reload()
        pids = sup.pids()
        os.kill(sup.proc.pid, signal.SIGSTOP)
        os.kill(pids[1], signal.SIGKILL)
        kill9(sup)
        second = fleet.run(*args)
        wait_until(
            lambda: all(
                [w["state"] for w in s["workers"]] == ["ready"] for s in second.status()["slots"]
            ),
            20,
            "every slot serving",
        )
        after = udp_slots(port, clients)
        moved = [f"{a}>{b}" for a, b in zip(first, after, strict=True) if a != b]
        print(f"udp: 200 flows, a worker and its supervisor killed: {len(moved)} moved")
        assert not moved, (sorted(set(moved)), second.text())


def test_a_killed_warden_is_replaced_and_still_keeps_the_workers(fleet: Fleet) -> None:
    args = ("-w", "2", "--listen", "tcp://127.0.0.1:0")
    sup = fleet.run(*args)
    (warden,) = wait_until(fleet.warden_pids, 5, "the warden")
    os.kill(warden, signal.SIGKILL)
    replaced = wait_until(lambda: [p for p in fleet.warden_pids() if p != warden], 10, "another")
    assert "the warden (pid" in sup.text() and "starting another" in sup.text()
    settle(0.3)  # it has been given everything again
    pids = sup.pids()
    kill9(sup)
    second = fleet.run(*args)
    assert second.pids() == pids
    wait_until(lambda: replaced[0] not in fleet.warden_pids(), 10, "the old warden to go")


def test_a_worker_spawned_while_the_warden_is_replaced_outlives_the_supervisor(
    fleet: Fleet,
) -> None:
    # A worker spawned after the warden died and before the supervisor started another (the
    # next sync, up to 0.1 s later: a reload's next slot, a respawn) got the parent-death
    # signal, kept it with the new warden running, and died with a supervisor killed any
    # time later: 3 keep-alive requests failed in a fault campaign, a UDP slot went silent.
    # The test makes the respawn happen in the very turn that sees the warden gone: the
    # supervisor is frozen while the warden and a worker are killed.
    args = ("-w", "2", "--listen", "tcp://127.0.0.1:0")
    sup = fleet.run(*args)
    assert sup.proc is not None
    pids = sup.pids()
    (warden,) = wait_until(fleet.warden_pids, 5, "the warden")
    settle(2.0)  # a worker that ran 2 s is respawned at once, not after a backoff
    os.kill(sup.proc.pid, signal.SIGSTOP)
    try:
        os.kill(warden, signal.SIGKILL)
        os.kill(pids[1], signal.SIGKILL)
        wait_until(lambda: exited(warden) and exited(pids[1]), 5, "both gone")
    finally:
        os.kill(sup.proc.pid, signal.SIGCONT)

    def respawned() -> int | None:
        (slot,) = [s for s in sup.status()["slots"] if s["slot"] == 1]
        ready = [w["pid"] for w in slot["workers"] if w["state"] == "ready"]
        return ready[0] if ready and ready[0] != pids[1] else None

    new = wait_until(respawned, 20, "slot 1 respawned")
    wait_until(lambda: [p for p in fleet.warden_pids() if p != warden], 10, "another warden")
    settle(0.3)  # the warden's manifest names it
    kill9(sup)
    settle(0.5)  # a parent-death signal is sent as the parent exits
    assert not exited(new), sup.text()
    second = fleet.run(*args)
    assert second.pids() == [pids[0], new], second.text()
    assert "gone while the supervisor was away" not in second.text()


def _age(pid: int) -> float:
    """Seconds since ``pid`` started (its /proc start time against the uptime)."""
    with open(f"/proc/{pid}/stat") as f:
        start = int(f.read().rpartition(")")[2].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start / os.sysconf("SC_CLK_TCK")


def test_a_warden_killed_just_after_its_start_is_replaced_at_once(fleet: Fleet) -> None:
    # A warden killed within a second of its own start was started again only a second
    # after that start; a worker spawned meanwhile got the parent-death signal and died with
    # a supervisor killed later (1 request lost in 10 warden runs of the fault campaign,
    # whose boot warden is often under a second old when the fault comes). Here the first
    # warden is killed, then its replacement as soon as it shows, together with a worker
    # (the supervisor frozen meanwhile, so that one turn sees both: the warden first).
    args = ("-w", "2", "--listen", "tcp://127.0.0.1:0")
    sup = fleet.run(*args)
    assert sup.proc is not None
    pids = sup.pids()
    (first,) = wait_until(fleet.warden_pids, 5, "the warden")
    settle(2.0)  # a worker that ran 2 s is respawned at once, not after a backoff
    os.kill(first, signal.SIGKILL)
    (second,) = wait_until(
        lambda: [p for p in fleet.warden_pids() if p != first], 10, "its replacement"
    )
    os.kill(sup.proc.pid, signal.SIGSTOP)
    try:
        age = _age(second)
        os.kill(second, signal.SIGKILL)
        os.kill(pids[1], signal.SIGKILL)
        wait_until(lambda: exited(second) and exited(pids[1]), 5, "both gone")
    finally:
        os.kill(sup.proc.pid, signal.SIGCONT)
    assert age < 0.8, f"the replacement ran {age:.2f}s before its kill: not the case tested"
    wait_until(lambda: [p for p in fleet.warden_pids() if p not in (first, second)], 10, "a third")

    def respawned() -> int | None:
        (slot,) = [s for s in sup.status()["slots"] if s["slot"] == 1]
        ready = [w["pid"] for w in slot["workers"] if w["state"] == "ready"]
        return ready[0] if ready and ready[0] != pids[1] else None

    new = wait_until(respawned, 20, "slot 1 respawned")
    settle(0.3)  # the warden's manifest names it
    kill9(sup)
    settle(0.5)  # a parent-death signal is sent as the parent exits
    assert not exited(new), f"the respawned worker died with its supervisor\n{sup.text()}"
    second_sup = fleet.run(*args)
    assert second_sup.pids() == [pids[0], new], second_sup.text()


def _warden_channel(sup_pid: int) -> socket.socket:
    """A copy of the supervisor's end of its warden's channel (its one AF_UNIX SEQPACKET
    socket: a supervisor that did not adopt holds no other), by pidfd_getfd."""
    pidfd = syscalls.pidfd_open(sup_pid)
    try:
        for name in os.listdir(f"/proc/{sup_pid}/fd"):
            with contextlib.suppress(OSError):
                if not os.readlink(f"/proc/{sup_pid}/fd/{name}").startswith("socket:"):
                    continue
                s = socket.socket(fileno=syscalls.pidfd_getfd(pidfd, int(name)))
                if s.family == socket.AF_UNIX and s.type == socket.SOCK_SEQPACKET:
                    return s
                s.close()
    finally:
        os.close(pidfd)
    raise AssertionError(f"pid {sup_pid} holds no warden channel")


def test_a_warden_whose_channel_is_full_is_killed_and_replaced(fleet: Fleet) -> None:
    # A live warden that does not read (stopped here; a starved one on a busy machine) fills
    # its channel. Left running, it would take our closing the channel for its supervisor's
    # death and stop the workers at --orphan-timeout: it is killed, and another started and
    # given everything. The test fills the channel itself (through a copy of the
    # supervisor's fd) and then scales up: the new slot's sockets go to the warden before
    # its worker is forked, and that send is the one that finds the channel full. Before,
    # the warden was replaced only at the next sync, and the new worker got the
    # parent-death signal (it died with its supervisor, killed later).
    args = ("-w", "2", "--listen", "tcp://127.0.0.1:0")
    sup = fleet.run(*args)
    assert sup.proc is not None
    (stuck,) = wait_until(fleet.warden_pids, 5, "the warden")
    settle(0.5)  # the warden has been given the last change: the scale's send comes next
    os.kill(stuck, signal.SIGSTOP)
    try:
        with _warden_channel(sup.proc.pid) as channel:
            channel.setblocking(False)
            for _ in range(10_000):
                try:
                    channel.send(b"x" * 4096)
                except BlockingIOError:
                    break
            else:
                raise AssertionError("the channel never filled")
        sup.ctl("scale", "3")
        wait_until(lambda: exited(stuck), 5, "the stuck warden killed")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stuck, signal.SIGCONT)
    assert "is lost (its channel" in sup.text(), sup.text()
    wait_until(lambda: [p for p in fleet.warden_pids() if p != stuck], 10, "another warden")
    pids = sup.pids()
    settle(0.3)
    kill9(sup)
    settle(0.5)  # a parent-death signal is sent as the parent exits
    assert not any(exited(p) for p in pids), (pids, sup.text())
    second = fleet.run(*args)
    assert second.pids() == pids, second.text()


def test_a_warden_found_dead_by_its_channel_is_started_again_before_the_next_spawn(
    short_tmp: Path,
) -> None:
    # Found dead by a failed send (a broken pipe: it died after the loop's select) rather
    # than by its pidfd, the warden was started again only a second later: the workers
    # spawned meanwhile got the parent-death signal (7 keep-alive requests lost with a
    # supervisor killed later, in a fault campaign). The link alone, with a real warden.
    import selectors

    from portshard.supervisor.wardenlink import WardenLink

    sel = selectors.DefaultSelector()
    link = WardenLink(sel, str(short_tmp / "w.sock"), "text", lambda: ({"slots": []}, {}))
    try:
        assert link.start(time.monotonic())
        first = link.pid
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: exited(first), 5, "the warden gone")
        link.sync(time.monotonic(), {"slots": [], "changed": 1}, {})  # the pipe is broken
        assert link.alive, "not started again in the sync that found it dead"
        assert link.pid != first
        assert link.revive(time.monotonic())
    finally:
        link.bye()
        sel.close()


def test_a_ready_sent_while_no_supervisor_listens_reaches_the_adopter(
    fleet: Fleet, short_tmp: Path
) -> None:
    # --ready notify: a reload's replacement said READY=1 after its supervisor was killed and
    # before the next one bound the notify address. It was lost: the adopter waited
    # --ready-timeout, then killed the replacement, which had been serving all along
    # (gunicorn in a fault campaign: every such adopter took 30 s to be ready), or, a
    # Python worker using portshard.notify_ready(), the send raised and the worker died.
    # The notify socket itself is handed over now (the warden holds it meanwhile), with
    # what waits in it.
    slow = short_tmp / "slow"
    command = ["sh", "-c", f'[ -e {slow} ] && sleep 2; exec "$@"', "sh", *FDWORKER, fleet.tag]
    args = ("-w", "1", "--ready", "notify", "--ready-timeout", "8")
    args += ("--listen", "tcp://127.0.0.1:0")
    first = fleet.run(*args, command=command)
    (old,) = first.pids()
    slow.touch()
    first.ctl("reload", "--no-wait")

    def replacement() -> int | None:
        (slot,) = first.status()["slots"]
        return next((w["pid"] for w in slot["workers"] if w["pid"] != old), None)

    new = wait_until(replacement, 20, "the replacement starting")
    kill9(first)
    # fdworker says READY=1, then waits in epoll for its sockets. With nobody bound to the
    # notify address, portshard.notify_ready() raised (ECONNREFUSED) and the worker died.
    wchan = Path(f"/proc/{new}/wchan")
    wait_until(lambda: exited(new) or "epoll" in wchan.read_text(), 20, "the replacement serving")
    assert not exited(new), "the replacement died: its READY=1 had nowhere to go"
    slow.unlink()
    second = fleet.run(*args, command=command)

    def replaced() -> bool:
        (slot,) = second.status()["slots"]
        return [(w["pid"], w["state"]) for w in slot["workers"]] == [(new, "ready")]

    try:
        wait_until(replaced, 20, "the replacement ready, the old worker retired")
    except AssertionError:
        raise AssertionError(second.text()) from None
    assert "not ready within" not in second.text()
    assert exited(old)


def test_an_older_adopter_finds_the_notify_address_free(fleet: Fleet) -> None:
    # A downgrade across a crash: a portshard from before the warden held the workers'
    # notify socket sends a bare "adopt", ignores the "notify" fd and binds the manifest's
    # notify address itself. It exited with EADDRINUSE (every run of
    # bench/experiments/downgrade.py against 21804bb^), leaving the workers to
    # --orphan-timeout. The older adopter is played here by its wire exchange and its bind.
    from portshard.control.paths import warden_address
    from portshard.supervisor import warden

    args = ("-w", "2", "--listen", "tcp://127.0.0.1:0")
    first = fleet.run(*args)
    pids = first.pids()
    wait_until(lambda: _answers(warden_address(str(fleet.control))), 10, "the warden's socket")
    kill9(first)
    fds: dict[str, int] = {}
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as c:
        c.settimeout(10)
        c.connect(warden_address(str(fleet.control)))
        warden.send(c, {"op": "adopt"})
        manifest: dict[str, object] = {}
        while True:
            msg, got = warden.recv(c)
            assert msg is not None, first.text()
            if msg["op"] == "manifest":
                manifest = msg["manifest"]
            elif msg["op"] == "put":
                fds.update(zip(msg["keys"], got, strict=True))
            elif msg["op"] == "end":
                break
        try:
            assert "notify" not in fds, sorted(fds)
            notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            notify.bind("\0" + str(manifest["notify"]))  # what it does next
        finally:
            for fd in fds.values():
                os.close(fd)
    # It hung up without "adopted" (as if it failed later): the warden waits on. An adopter
    # of this portshard that finds the address held (here: by the older one, still bound)
    # says so and leaves the workers serving; once it is free, one adopts them.
    assert "letting go of it" in first.text(), first.text()
    with notify:
        refused = fleet.run(*args, wait=False)
        assert refused.wait_exit(30) != 0
    text = refused.text()
    assert "cannot bind the workers' notify address @portshard/" in text, text
    assert "(a downgrade)" in text and "Traceback" not in text, text
    second = fleet.run(*args)
    assert second.pids() == pids, second.text()


OLDER = """
import os, sys
if os.path.exists({mark!r}) and sys.orig_argv[1:3] == ["-m", "portshard"]:
    from portshard.supervisor import handoff  # as before the notify socket was handed over
    handoff.TAKES = ()
    take = handoff.Resume.take
    handoff.Resume.take = lambda self, key: None if key == "notify" else take(self, key)
"""


def test_an_upgrade_to_an_older_portshard_lets_go_of_the_notify_address(
    fleet: Fleet, short_tmp: Path
) -> None:
    # `portshard upgrade` with an older portshard on disk (one that binds the notify
    # address itself: 21804bb^, measured by hand) died of EADDRINUSE in its set-up after the
    # exec, and killed every worker. The older image is played by a sitecustomize that,
    # once the mark exists, makes `portshard run` take no notify socket and say so in its
    # check. --ready notify: the reload after it needs the older image's own notify socket.
    site, mark = short_tmp / "site", short_tmp / "older"
    site.mkdir()
    (site / "sitecustomize.py").write_text(OLDER.format(mark=str(mark)))
    args = ("-w", "2", "--ready", "notify", "--listen", "tcp://127.0.0.1:0")
    sup = fleet.run(*args, env={"PYTHONPATH": str(site)})
    pids = sup.pids()
    mark.touch()
    res = sup.ctl("upgrade", check=False, timeout=60)
    assert "upgraded" in res.stdout, sup.text()
    assert "does not take the workers' notify socket" in sup.text()
    assert sup.pids() == pids
    sup.reload()
    assert set(sup.pids()).isdisjoint(pids), sup.text()


def test_orphan_timeout_zero_keeps_the_old_rule_workers_die_with_it(fleet: Fleet) -> None:
    sup = fleet.run("-w", "2", "--listen", "tcp://127.0.0.1:0", "--orphan-timeout", "0")
    assert not fleet.warden_pids()
    kill9(sup)
    wait_until(lambda: no_process_left(fleet.tag), 5, "workers to die with their supervisor")


NOTIFY_AFTER = """
import os, sys, time, portshard
go, out = sys.argv[1], sys.argv[2]
portshard.notify_ready()  # the supervisor listens: this worker is ready
if os.fork():  # a pre-fork server: the parent-death signal is the parent's only
    time.sleep(60)
    sys.exit(0)
deadline = time.monotonic() + 30
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.02)
try:
    said = [portshard.notify_ready(), portshard.notify("STATUS=still here")]
except Exception as exc:
    said = [type(exc).__name__]
with open(out, "w") as f:
    f.write(repr(said))
"""


def test_notify_with_no_supervisor_and_no_warden_does_not_crash_the_worker(
    fleet: Fleet, short_tmp: Path
) -> None:
    # --orphan-timeout 0: no warden holds the notify socket, so once the supervisor is gone
    # nobody is bound to its address. A worker's process that outlives it (a pre-fork
    # server's child: the parent-death signal is its parent's) calling
    # portshard.notify_ready() got an ActivationError (ECONNREFUSED) and, like most programs,
    # died of it. Now: False, and one warning naming the address, why and what to do.
    go, out = short_tmp / "go", short_tmp / "said"
    script = short_tmp / "late.py"
    script.write_text(NOTIFY_AFTER)
    command = [sys.executable, str(script), str(go), str(out), fleet.tag]
    args = ("-w", "1", "--ready", "notify", "--orphan-timeout", "0")
    sup = fleet.run(*args, "--listen", "tcp://127.0.0.1:0", command=command)
    kill9(sup)
    go.touch()
    said = wait_until(lambda: out.exists() and out.read_text(), 10, "the worker's answer")
    assert said == "[False, False]", said
    warnings = [x for x in sup.text().splitlines() if "nobody listens" in x]
    assert len(warnings) == 1, sup.text()
    assert "@portshard/" in warnings[0] and "--orphan-timeout" in warnings[0], warnings


def test_a_second_supervisor_on_a_live_one_is_refused(fleet: Fleet) -> None:
    fleet.run("-w", "1", "--listen", "tcp://127.0.0.1:0")
    second = fleet.run("-w", "1", "--listen", "tcp://127.0.0.1:0", wait=False)
    assert second.wait_exit(20) != 0
    text = second.text()
    assert "already running" in text, text
    assert "Traceback" not in text


PRINTER = [
    "sh",
    "-c",
    'i=0; while [ $i -lt 2000 ]; do i=$((i+1)); echo "line $i"; sleep 0.01; done',
]


def test_json_logs_a_worker_writing_lines_survives_the_crash(short_tmp: Path) -> None:
    """--log-format json: the workers' output is a pipe the supervisor read. With it gone,
    the warden reads it (no SIGPIPE), and the next supervisor reads it again."""
    control = short_tmp / "j.sock"
    tag = uuid.uuid4().hex[:12]
    args = ["--name", f"j-{tag}", "-w", "1", "--ready", "delay:0.2", "--log-format", "json"]
    args += ["--listen", "tcp://127.0.0.1:0", "--", *PRINTER[:2], PRINTER[2] + f" # {tag}"]
    first = Running(args, control, log=short_tmp / "j0.log")
    second: Running | None = None
    try:
        first.wait_ready()
        (pid,) = first.pids()
        kill9(first)
        settle(1.0)  # ~100 lines written with nobody but the warden reading
        assert Path(f"/proc/{pid}").exists(), "the worker died with its supervisor"
        second = Running(args, control, log=short_tmp / "j1.log")
        second.wait_ready()
        assert second.pids() == [pid]
        settle(0.3)
        warden_lines = [x for x in first.text().splitlines() if f'"pid": {pid}' in x]
        new_lines = [x for x in second.text().splitlines() if '"stream": "stdout"' in x]
        assert warden_lines and new_lines, (first.text(), second.text())
        assert all('"slot": 0' in x for x in new_lines)
    finally:
        for sup in (first, second):
            if sup is not None:
                sup.close()
        subprocess.run(["pkill", "-9", "-f", tag], check=False)


def test_a_supervisor_killed_during_a_reload_is_adopted_and_nothing_fails(fleet: Fleet) -> None:
    """The worst moment: old workers frozen for their drain, replacements starting. The
    warden thaws the frozen ones; the next supervisor retires what the reload was retiring."""
    args = ("-w", "4", "--listen", "tcp://127.0.0.1:0")
    first = fleet.run(*args)
    with Load("127.0.0.1", first.port, concurrency=8, max_seconds=120) as load:
        load.wait_for(200)
        first.ctl("reload", "--no-wait")
        wait_until(
            lambda: any(len(s["workers"]) > 1 for s in first.status()["slots"]), 10, "a handover"
        )
        kill9(first)
        settle(1.0)
        second = fleet.run(*args)
        try:
            wait_until(
                lambda: all(len(s["workers"]) == 1 for s in second.status()["slots"]),
                30,
                "the retirements to finish",
            )
        except AssertionError:
            raise AssertionError(first.text() + second.text()) from None
        second.ctl("reload", "--wait")
        load.wait_for(load.count() + 100)
    print(f"killed mid-reload: {load.count()} requests, failed {load.by_kind()}")
    if load.failed:  # when, against both supervisors' logs (wall clock)
        skew = time.time() - time.monotonic()
        when = [time.strftime("%H:%M:%S", time.localtime(r.start + skew)) for r in load.failed]
        when = [
            f"{w}.{int((r.start + skew) % 1 * 1000):03d}"
            for w, r in zip(when, load.failed, strict=True)
        ]
        raise AssertionError(f"{load.by_kind()} at {when}\n{first.text()}{second.text()}")
    second.close()
    wait_until(lambda: no_process_left(fleet.tag), 5, "workers gone")


def _answers(address: str) -> bool:
    """The warden's socket takes connections (its process exists a moment before it does)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as c:
        try:
            c.connect(address)
        except OSError:
            return False
    return True


def test_garbage_at_the_warden_is_refused_and_it_carries_on(fleet: Fleet) -> None:
    from portshard.control.paths import warden_address
    from portshard.supervisor import warden

    args = ("-w", "1", "--listen", "tcp://127.0.0.1:0")
    sup = fleet.run(*args)
    (pid,) = wait_until(fleet.warden_pids, 5, "the warden")
    wait_until(lambda: _answers(warden_address(str(fleet.control))), 10, "the warden's socket")
    for junk in (b"", b"\x00" * 100, b"not zlib", warden.zlib.compress(b"[1, 2")):
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as c:
            c.connect(warden_address(str(fleet.control)))
            if junk:
                c.send(junk)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as c:  # a real ask: refused
        c.connect(warden_address(str(fleet.control)))
        c.settimeout(5)
        warden.send(c, {"op": "adopt"})
        msg, _ = warden.recv(c)
        assert msg is not None and msg["op"] == "refused" and "running" in msg["why"]
    assert fleet.warden_pids() == [pid]
    kill9(sup)
    assert fleet.run(*args).status()["supervisor"]["adoptions"] == 1


def test_workers_that_die_while_nobody_supervises_leave_their_queue_to_the_next(
    fleet: Fleet,
) -> None:
    """The warden holds every slot socket: with the supervisor and every worker gone,
    connections wait in the queues (up to the backlog) and the next supervisor serves them."""
    args = ("-w", "2", "--listen", "tcp://127.0.0.1:0")
    sup = fleet.run(*args)
    port, pids = sup.port, sup.pids()
    kill9(sup)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: no_process_left(fleet.tag), 5, "the workers to die")
    with Load("127.0.0.1", port, concurrency=4, max_requests=40, timeout=30) as load:
        settle(1.0)  # they connect (the kernel accepts into the queues) and wait
        assert load.count() == 0
        second = fleet.run(*args)
        load.wait_for(40)
    assert not load.failed, load.by_kind()
    assert "gone while the supervisor was away" in second.text()
    assert set(second.pids()).isdisjoint(pids)


def test_an_upgrade_changes_listen_keeping_the_sockets_that_stay(
    fleet: Fleet, short_tmp: Path
) -> None:
    """What a reload cannot change: a --listen address added by the upgrade gets sockets and
    every worker gets the new set (a reload starts by itself); the one that stays keeps its
    sockets and queues: nothing fails on it."""
    conf = short_tmp / "ps.toml"
    conf.write_text('listen = ["web=tcp://127.0.0.1:0"]\nworkers = 2\n')
    sup = fleet.run("-c", str(conf))
    web = sup.port
    with Load("127.0.0.1", web, concurrency=8, max_seconds=120) as load:
        load.wait_for(100)
        conf.write_text(
            'listen = ["web=tcp://127.0.0.1:0", "admin=tcp://127.0.0.1:0"]\nworkers = 2\n'
        )
        sup.ctl("upgrade")
        wait_until(lambda: sup.status()["reloads"]["ok"] == 1, 60, "the reload after it")
        load.wait_for(load.count() + 100)
    st = sup.status()
    assert [x["name"] for x in st["listen"]] == ["web", "admin"]
    assert st["listen"][0]["port"] == web
    assert not load.failed, load.by_kind()
    assert served(st["listen"][1]["port"])  # the new address serves (fdworker: every socket)


def test_metrics_and_health_keep_their_port_across_an_upgrade_and_a_crash(fleet: Fleet) -> None:
    """--metrics and --health on port 0: a balancer and Prometheus keep their address."""
    import urllib.request

    args = ("-w", "1", "--metrics", "127.0.0.1:0", "--health", "127.0.0.1:0")
    args += ("--listen", "tcp://127.0.0.1:0")
    sup = fleet.run(*args)
    before = sup.status()
    urls = (before["metrics"], before["health"])

    def answered() -> None:
        with urllib.request.urlopen(urls[0], timeout=5) as r:
            assert b"portshard_" in r.read()
        with urllib.request.urlopen(urls[1] + "/healthz", timeout=5) as r:
            assert r.status == 200

    answered()
    sup.ctl("upgrade")
    assert (sup.status()["metrics"], sup.status()["health"]) == urls
    answered()
    kill9(sup)
    second = fleet.run(*args)
    assert (second.status()["metrics"], second.status()["health"]) == urls
    answered()


def test_signals_sent_while_the_new_image_starts_wait_for_it(fleet: Fleet) -> None:
    """exec resets signal handlers: a SIGHUP or SIGTERM in the new image's first second would
    kill it; they are blocked across the exec and handled once it runs."""
    sup = fleet.run("-w", "1", "--listen", "tcp://127.0.0.1:0")
    assert sup.proc is not None
    sup.proc.send_signal(signal.SIGUSR2)
    wait_until(lambda: "upgrade: exec" in sup.text(), 30, "the exec")
    sup.proc.send_signal(signal.SIGHUP)  # now: while the new image imports
    wait_until(lambda: "SIGHUP: reloading" in sup.text(), 30, "the reload it asked for")
    assert sup.proc.poll() is None, sup.text()
    assert sup.wait_ready()["supervisor"]["upgrades"] == 1


def test_an_upgrade_whose_client_hung_up_still_happens(fleet: Fleet) -> None:
    # Ctrl-C on `portshard upgrade` while the new portshard checks the settings: the server
    # closed the connection, its fd was -1 at the exec, and the upgrade died of EBADF
    # ("error while upgrading ... carrying on") with no word to anyone.
    sup = fleet.run("-w", "1", "--listen", "tcp://127.0.0.1:0")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect(str(fleet.control))
        c.sendall(b'{"v": 1, "cmd": "upgrade"}\n')
    wait_until(lambda: "upgrade: exec" in sup.text() or "Error" in sup.text(), 30, "the exec")
    st = sup.wait_ready(30)
    assert st["supervisor"]["upgrades"] == 1, sup.text()
    assert "error while upgrading" not in sup.text()


SLOW_WARDEN = """
import time
with open("/proc/self/cmdline", "rb") as f:
    if b"portshard.supervisor.warden" in f.read().split(b"\\0"):
        time.sleep(4)  # an interpreter that takes long to start (a busy machine)
"""


def test_an_adopter_waits_for_a_warden_still_starting(fleet: Fleet, short_tmp: Path) -> None:
    # A supervisor killed before its warden's interpreter was up (0.2 s idle, seconds under
    # load): the next start found no warden answering, booted anew beside the workers it
    # should have adopted, and served with new ones (seen once in a fresh clone's make test,
    # test_worker_tree's adoption). The test makes the warden slow to start with a
    # sitecustomize that only the warden's command line trips.
    from portshard.control.paths import warden_address

    site = short_tmp / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_WARDEN)
    args = ("-w", "2", "--listen", "tcp://127.0.0.1:0")
    first = fleet.run(*args, env={"PYTHONPATH": str(site)})
    pids = first.pids()
    assert fleet.warden_pids() and not _answers(warden_address(str(fleet.control)))
    kill9(first)
    second = fleet.run(*args)
    assert second.pids() == pids, second.text()
    assert "adopted 2 running worker(s)" in second.text(), second.text()
