"""Steering's wake on the real kernel (controller.py, `Steering.woken`): idle, the slots' TCP
listeners are watched, and the first connection queued on one makes :attr:`Steering.wake`
readable; busy, nothing is watched."""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Iterator

import pytest

from portshard.address import Proto
from portshard.steering.controller import Steering
from portshard.steering.policy import Health
from tests.integration._util import reuseport_listeners

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="steering programs need root")


@pytest.fixture(params=["cbpf", "ebpf"])
def steering(request: pytest.FixtureRequest) -> Iterator[tuple[Steering, int]]:
    """Steering over two listeners of one reuseport group that nobody accepts from; its port."""
    socks: list[socket.socket] = []
    steer = None
    try:
        reuseport_listeners(2, socks)
        slots = {slot: [sock] for slot, sock in enumerate(socks)}
        steer = Steering(request.param, "test", [Proto.TCP], slots)
        yield steer, socks[0].getsockname()[1]
    finally:
        if steer is not None:
            steer.close()
        for sock in socks:
            sock.close()


def _look(steer: Steering) -> None:
    """A sample now, both slots ready."""
    now = time.monotonic()
    steer.next_sample = now
    steer.step(now, [(0, None, Health.READY), (1, None, Health.READY)])


def test_idle_the_first_connection_wakes_the_supervisor_for_a_look(
    steering: tuple[Steering, int],
) -> None:
    steer, port = steering
    _look(steer)  # nothing queued or handed: idle, the listeners are watched
    poller = select.poll()
    poller.register(steer.wake.fileno(), select.POLLIN)
    assert poller.poll(0) == []
    with socket.create_connection(("127.0.0.1", port)):
        assert poller.poll(5000), "no wake within 5 s of a connection queued"
        steer.woken(time.monotonic())
        assert steer.due(time.monotonic()) == 0.0  # a look at once
        _look(steer)  # it finds the connection queued: busy, nothing watched
        assert poller.poll(0) == []
        # A second one while busy (on loopback it is queued once connect() returns).
        with socket.create_connection(("127.0.0.1", port)):
            assert poller.poll(0) == []


def test_a_listener_about_to_close_is_not_watched(steering: tuple[Steering, int]) -> None:
    # The epoll would keep a closed socket that another process still holds (the warden).
    steer, port = steering
    _look(steer)
    steer.unwatch()
    poller = select.poll()
    poller.register(steer.wake.fileno(), select.POLLIN)
    with socket.create_connection(("127.0.0.1", port)):  # queued once connect() returns
        assert poller.poll(0) == []
