"""Where the SOCK_OPS program runs (steering/inflight.py), on the real kernel.

The supervisor creates its listeners in a cgroup of their own (linux/cgroup.py ``made_in``) and
attaches the program there: it runs for the connections our listeners accept, not for a TCP
socket made by another process (here, the test's own listener and client). Seen through the
program's maps, not timing: a handshake the program completes moves its tuple from ``syn`` to
``conns``; one it never sees leaves a tuple planted in ``syn`` where it was.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import closing

import pytest

from portshard.linux import cgroup
from portshard.linux.sockdiag import listener_cgroups
from portshard.steering.ebpf import Map, bpf
from portshard.steering.inflight import CONN_ENTRIES, SYN_ENTRIES, SYN_VALUE, tuple_key
from tests.conftest import wait_until
from tests.supervisor_fixture import FDWORKER, Running, Start

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="eBPF steering needs root")

BPF_MAP_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD = 14, 15
BPF_MAP_UPDATE_ELEM = 2
_MAP_INFO_SIZE, _MAP_INFO_NAME = 88, 24


def supervisor_map(pid: int, name: bytes, value_size: int, entries: int) -> Map:
    """A map the supervisor holds, by its name (its fdinfo lists the ids)."""
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                ids = [int(line.split()[1]) for line in f if line.startswith("map_id:")]
        except OSError:
            continue
        for map_id in ids:
            mfd = bpf(BPF_MAP_GET_FD_BY_ID, struct.pack("=III", map_id, 0, 0), "map by id")
            info = ctypes.create_string_buffer(_MAP_INFO_SIZE)
            attr = struct.pack("=IIQ", mfd, _MAP_INFO_SIZE, ctypes.addressof(info))
            bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "map info")
            if info.raw[_MAP_INFO_NAME : _MAP_INFO_NAME + 16].rstrip(b"\0") == name:
                found = Map.adopt(mfd, value_size, entries, name.decode())
                found.key_size = len(tuple_key("127.0.0.1", 1, 1))
                return found
            os.close(mfd)
    raise AssertionError(f"supervisor {pid} holds no map {name!r}")


def plant(syn: Map, key: bytes, slot: int) -> None:
    """What the steering program writes at a SYN it hands to ``slot``."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(SYN_VALUE.pack(slot, time.monotonic_ns()), SYN_VALUE.size)
    attr = struct.pack("=I4xQQQ", syn.fd, ctypes.addressof(k), ctypes.addressof(v), 0)
    bpf(BPF_MAP_UPDATE_ELEM, attr, "planting a handshake")


def listener_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


@pytest.fixture
def sup(start: Start) -> Iterator[Running]:
    yield start("-w", "2", "--steering", "ebpf", "--listen", "tcp://127.0.0.1:0", "--", *FDWORKER)


@pytest.mark.skipif(
    cgroup.detect().mechanism is cgroup.Mechanism.SUBREAPER,
    reason=f"no cgroup2 for this user here: {cgroup.detect().why}",
)
def test_a_connection_between_other_processes_does_not_run_the_program_ours_do(
    sup: Running,
) -> None:
    st = sup.status()
    assert "our listeners' connections only" in st["steering"]["balance"], st["steering"]
    port = st["listen"][0]["port"]
    assert sup.proc is not None
    pid = sup.proc.pid
    # Our listeners all sit in one cgroup, not the one this test (the client) runs in.
    ids = set(listener_cgroups(listener_inodes(pid)).values())
    with open(f"/proc/{os.getpid()}/cgroup") as f:
        mine = next(line[3:].strip() for line in f if line.startswith("0::"))
    assert len(ids) == 1, ids
    assert f"cgroup {mine}:" not in st["steering"]["balance"]
    syn = supervisor_map(pid, b"portshard_syn", SYN_VALUE.size, SYN_ENTRIES)
    conns = supervisor_map(pid, b"portshard_conns", 4, CONN_ENTRIES)
    with (
        closing(syn),
        closing(conns),
        socket.socket() as server,
        socket.socket() as client,
        socket.socket() as ours,
    ):
        # Another program's connection, with a handshake planted as if we had steered it.
        server.bind(("127.0.0.1", 0))
        server.listen()
        client.bind(("127.0.0.1", 0))
        other = tuple_key("127.0.0.1", client.getsockname()[1], server.getsockname()[1])
        plant(syn, other, 0)
        client.connect(server.getsockname())
        accepted, _ = server.accept()
        # One of ours, held open.
        ours.connect(("127.0.0.1", port))
        mine_key = tuple_key("127.0.0.1", ours.getsockname()[1], port)
        wait_until(lambda: conns.lookup_bytes(mine_key) is not None, 5, "ours counted")
        assert syn.lookup_bytes(other) is not None, "the program ran for another's connection"
        assert conns.lookup_bytes(other) is None
        accepted.close()
        syn.delete_bytes(other)
        ours.close()
        wait_until(lambda: conns.lookup_bytes(mine_key) is None, 10, "ours let go")
    wait_until(lambda: sum(s["connections"] for s in sup.status()["slots"]) == 0, 5, "none held")


def test_without_a_cgroup_of_its_own_it_counts_on_the_supervisors_cgroup_and_says_so(
    start: Start,
) -> None:
    sup = start(
        "-w", "2", "--steering", "ebpf", "--listen", "tcp://127.0.0.1:0", "--", *FDWORKER,
        env={"PORTSHARD_CGROUP": "off"},
    )  # fmt: skip
    st = sup.status()
    assert "every TCP socket there" in st["steering"]["balance"], st["steering"]
    port = st["listen"][0]["port"]
    with socket.create_connection(("127.0.0.1", port), timeout=10):
        wait_until(lambda: sum(s["connections"] for s in sup.status()["slots"]) == 1, 5, "1 held")
    wait_until(lambda: sum(s["connections"] for s in sup.status()["slots"]) == 0, 5, "0 held")


def test_a_syn_that_finds_the_handshake_map_full_is_not_counted_and_forgets_no_other(
    sup: Running,
) -> None:
    # An LRU map made room by forgetting a handshake in progress: that one's count then stayed
    # in held for ever. A full map now refuses the new SYN, which is simply not counted.
    port = sup.status()["listen"][0]["port"]
    assert sup.proc is not None
    syn = supervisor_map(sup.proc.pid, b"portshard_syn", SYN_VALUE.size, SYN_ENTRIES)
    held = supervisor_map(sup.proc.pid, b"portshard_held", 8, 1024)

    def counted() -> int:  # the steering program counts at the SYN, before connect() returns
        return held.lookup_u64(0) + held.lookup_u64(1)

    planted = [
        tuple_key(f"127.1.{n >> 8 & 255}.{n & 255}", 1024 + (n >> 16), 9)
        for n in range(SYN_ENTRIES)
    ]
    with closing(syn), closing(held):
        for key in planted:
            plant(syn, key, 0)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10):
                assert counted() == 0
            assert all(syn.lookup_bytes(key) is not None for key in planted), "one was forgotten"
        finally:
            for key in planted:
                syn.delete_bytes(key)
        with socket.create_connection(("127.0.0.1", port), timeout=10):  # room again: counted
            assert counted() == 1
        wait_until(lambda: counted() == 0, 5, "let go")
