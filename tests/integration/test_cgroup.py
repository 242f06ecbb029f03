"""A worker is its whole process tree (issue 14 item 5, issue 12 item 1), on the real kernel.

- linux/cgroup.py: a worker spawned into its own cgroup2 group (joined before exec) whose
  child calls setsid(): killing the worker's process group misses that child, killing the
  group does not; freezing the group stops the whole tree; the mount and the groups are gone
  afterwards.
- linux/waiting.py: a plain pre-fork server (the master in wait(), 2 children in accept) is
  "waiting for work" as a tree, not as the master alone.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from portshard.linux import cgroup, proc, waiting
from portshard.linux.sockdiag import listener_cgroups
from portshard.linux.tcpinfo import socket_inode
from portshard.supervisor.spawn import SpawnSpec, spawn
from tests.conftest import ROOT, Procs, wait_until

PREFORK = [sys.executable, str(ROOT / "tests" / "workers" / "prefork.py")]
needs_cgroup2 = pytest.mark.skipif(
    cgroup.detect().mechanism is cgroup.Mechanism.SUBREAPER,
    reason=f"no cgroup2 for this user here: {cgroup.detect().why}",
)


@pytest.fixture
def trees() -> Iterator[cgroup.Trees]:
    was_mounted = cgroup._is_cgroup2(cgroup.MOUNT_POINT)
    t = cgroup.Trees.open(f"test-{uuid.uuid4().hex[:8]}")
    home = t.home
    try:
        yield t
    finally:
        t.close()
        assert home is None or not os.path.exists(home), "the supervisor's groups are removed"
        if not was_mounted:
            assert not cgroup._is_cgroup2(cgroup.MOUNT_POINT), "the mount we made is gone"


def read_pids(path: Path) -> list[int]:
    wait_until(path.exists, 10, "the pre-fork master's children")
    return [int(x) for x in path.read_text().split()]


def gone(pid: int) -> bool:
    return not proc.alive(pid)


def start_escaping_worker(
    trees: cgroup.Trees, listener: socket.socket, tmp: Path
) -> tuple[int, int, list[int], cgroup.Cgroup]:
    group = trees.create("slot0")
    assert group is not None
    pids_to = tmp / "kids"
    env = {**os.environ, "SETSID": "1", "PIDS_TO": str(pids_to)}
    spawned = spawn(SpawnSpec(PREFORK, env, [listener.fileno()], ["tcp"], cgroup=group))
    kids = read_pids(pids_to)
    return spawned.pid, spawned.pidfd, kids, group


@needs_cgroup2
def test_killing_the_group_kills_a_child_that_escaped_with_setsid(
    trees: cgroup.Trees, listener: socket.socket, short_tmp: Path
) -> None:
    pid, pidfd, kids, group = start_escaping_worker(trees, listener, short_tmp)
    try:
        wait_until(lambda: all(proc.stat(k) and proc.stat(k).session == k for k in kids), 10)  # type: ignore[union-attr]
        assert sorted(group.members()) == sorted([pid, *kids]), "joined before exec: all in"
        assert group.populated()
        os.killpg(pid, signal.SIGKILL)  # what a process-group stop reaches
        os.waitpid(pid, 0)
        time.sleep(0.1)
        assert all(proc.alive(k) for k in kids), "setsid children escape the process group"
        assert group.populated()
        group.kill()
        wait_until(lambda: not group.populated(), 5, "the group to empty")
        assert all(gone(k) for k in kids)
        assert group.remove()
    finally:
        os.close(pidfd)
        for k in kids:
            if proc.alive(k):
                os.kill(k, signal.SIGKILL)


@needs_cgroup2
def test_freeze_stops_the_whole_tree(
    trees: cgroup.Trees, listener: socket.socket, short_tmp: Path
) -> None:
    pid, pidfd, kids, group = start_escaping_worker(trees, listener, short_tmp)
    port = listener.getsockname()[1]
    try:
        group.freeze()
        wait_until(group.frozen, 5, "frozen")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            client.sendall(b"GET / HTTP/1.0\r\n\r\n")
            client.settimeout(0.3)
            with pytest.raises(TimeoutError):
                client.recv(100)  # nobody of the tree runs to answer
            assert sorted(group.members()) == sorted([pid, *kids])
            group.thaw()
            client.settimeout(5)
            assert int(client.recv(100).split(b"\r\n\r\n")[1]) in kids
    finally:
        group.remove(wait=2.0)
        os.waitpid(pid, 0)
        os.close(pidfd)


def test_a_pre_fork_server_is_waiting_for_work_as_a_tree(
    procs: Procs, listener: socket.socket, short_tmp: Path
) -> None:
    pids_to = short_tmp / "kids"
    master = procs.start(
        [*PREFORK, str(listener.fileno())],
        pass_fds=[listener.fileno()],
        env={**os.environ, "PIDS_TO": str(pids_to)},
    )
    kids = read_pids(pids_to)
    inodes = {socket_inode(listener)}
    wait_until(lambda: waiting.tree_waiting_for_work(master.pid, inodes), 10, "tree waits")
    # The tree waits once one child is in accept(); the other may still be on its way there
    # (seen at load 10: the assertion ran before it arrived).
    wait_until(
        lambda: all(waiting.waiting_for_work(k, inodes) for k in kids), 10, "every child waits"
    )
    assert not waiting.waiting_for_work(master.pid, inodes), "the master is in wait()"
    assert sorted(proc.process_tree(master.pid)) == sorted([master.pid, *kids])
    # Members given (a cgroup's) are what is looked at, not the tree from the pid.
    assert waiting.tree_waiting_for_work(master.pid, inodes, members=kids)
    assert not waiting.tree_waiting_for_work(master.pid, inodes, members=[master.pid])


def test_a_pre_fork_child_holding_a_connection_counts_with_ports(
    procs: Procs, listener: socket.socket, short_tmp: Path
) -> None:
    """Under a saturating load a child that accepts at once never waits, but it holds the
    connection it accepted: with the served ports, that counts."""
    pids_to = short_tmp / "kids"
    master = procs.start(
        [*PREFORK, str(listener.fileno())],
        pass_fds=[listener.fileno()],
        env={**os.environ, "PIDS_TO": str(pids_to), "CHILDREN": "1"},
    )
    assert len(read_pids(pids_to)) == 1
    inodes = {socket_inode(listener)}
    port = {listener.getsockname()[1]}
    wait_until(lambda: waiting.tree_waiting_for_work(master.pid, inodes), 10, "tree waits")
    with socket.create_connection(listener.getsockname(), timeout=5):  # no request: it waits
        wait_until(
            lambda: (
                not waiting.tree_waiting_for_work(master.pid, inodes)
                and waiting.tree_waiting_for_work(master.pid, inodes, ports=port)
            ),
            5,
            "the child in recv() on the connection it accepted",
        )
        assert not waiting.tree_waiting_for_work(master.pid, inodes, ports={1})


def test_detect_names_a_mechanism_and_why() -> None:
    found = cgroup.detect()
    assert found.why
    if os.geteuid() == 0 and not cgroup._is_cgroup2("/sys/fs/cgroup"):
        assert found.mechanism is cgroup.Mechanism.MOUNTED
        assert found.base == os.path.join(cgroup.MOUNT_POINT, "portshard")


@needs_cgroup2
def test_a_listener_made_in_the_listen_group_belongs_to_it_and_we_come_back(
    trees: cgroup.Trees,
) -> None:
    group = trees.listen_group()
    assert group is not None
    before = cgroup.own_cgroup2_path()
    with cgroup.made_in(group):
        made = socket.socket()
    with made, socket.socket() as elsewhere:
        assert cgroup.own_cgroup2_path() == before
        assert not group.members(), "nothing stays in the listen group"
        made.bind(("127.0.0.1", 0))
        made.listen()
        elsewhere.bind(("127.0.0.1", 0))
        elsewhere.listen()
        ids = listener_cgroups({socket_inode(made), socket_inode(elsewhere)})
        assert ids[socket_inode(made)] == os.stat(group.path).st_ino
        assert ids[socket_inode(elsewhere)] != ids[socket_inode(made)]
    # the fixture checks that the home, listen group included, is removed at close
