"""The TCP steering program's in-flight cap on the real kernel (speed.py, programs.py): a slot
holding its cap gets a new connection only when the other draw is at its cap too."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from portshard.steering.ebpf import SteeringProgram
from portshard.steering.inflight import InFlight
from portshard.steering.speed import UNIT, cost_word
from portshard.steering.table import BUCKETS, apportion, contiguous
from tests.integration._util import reuseport_listeners

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="eBPF steering needs root")


@pytest.fixture
def group() -> Iterator[tuple[InFlight, list[socket.socket]]]:
    """Two listeners of one reuseport group under the TCP program, equal shares. No SOCK_OPS
    program: the steering program counts each new connection in ``held`` and nothing lets
    one go, so a slot's count is what it was handed."""
    socks: list[socket.socket] = []
    inflight = InFlight()
    program = None
    try:
        for sock in reuseport_listeners(2, socks):
            sock.setblocking(False)
        program = SteeringProgram(BUCKETS, flow=False, loads=inflight.loads)
        for slot, sock in enumerate(socks):
            program.set_socket(slot, sock)
        program.set_table(contiguous(apportion({0: 1.0, 1: 1.0}, BUCKETS)))
        program.attach(socks[0])
        yield inflight, socks
    finally:
        for sock in socks:
            sock.close()
        if program is not None:
            program.close()
        inflight.close()


def connect_and_count(socks: list[socket.socket], n: int) -> list[int]:
    """``n`` connections, one after another; how many each listener's queue got."""
    conns = [socket.create_connection(socks[0].getsockname(), timeout=5) for _ in range(n)]
    got = [0, 0]
    try:
        for slot, sock in enumerate(socks):
            while True:
                try:
                    sock.accept()[0].close()
                except BlockingIOError:
                    break
                got[slot] += 1
    finally:
        for conn in conns:
            conn.close()
    return got


def test_a_slot_at_its_cap_gets_nothing_while_the_other_can_take_it(
    group: tuple[InFlight, list[socket.socket]],
) -> None:
    inflight, socks = group
    inflight.set_cost(1, cost_word(UNIT, 2))  # slot 1: at most 2 in flight
    assert connect_and_count(socks, 20) == [18, 2]


def test_with_no_cap_equal_slots_take_turns_and_both_at_their_caps_compare_loads(
    group: tuple[InFlight, list[socket.socket]],
) -> None:
    inflight, socks = group
    assert connect_and_count(socks, 20) == [10, 10]  # two choices by in flight, one at a time
    for slot in (0, 1):  # both held 10: at their caps, the less loaded still wins
        inflight.set_cost(slot, cost_word(UNIT, 5))
    assert connect_and_count(socks, 10) == [5, 5]
