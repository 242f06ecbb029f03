"""A reload retires a UDP worker without losing a datagram it has read and not answered."""

from __future__ import annotations

import selectors
import socket
import sys
import threading
import time

import pytest

from tests.supervisor_fixture import Start

# A blocking recvfrom/sleep/sendto loop: a datagram is in its hands 4 ms of every exchange.
LOOP = """
import socket, time
s = socket.socket(fileno=3)
while True:
    data, peer = s.recvfrom(2048)
    time.sleep(0.004)
    s.sendto(data, peer)
"""

# An asyncio DatagramProtocol that answers from a task after 4 ms.
ASYNCIO = """
import asyncio, socket
class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport
    def datagram_received(self, data, peer):
        asyncio.get_running_loop().create_task(self.answer(data, peer))
    async def answer(self, data, peer):
        await asyncio.sleep(0.004)
        self.transport.sendto(data, peer)
async def main():
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(Echo, sock=socket.socket(fileno=3))
    await asyncio.Event().wait()
asyncio.run(main())
"""


class Flows(threading.Thread):
    """``count`` flows, each with one numbered datagram out at a time, 3 ms apart; one with
    no answer in 2 s is lost (loopback drops nothing: only a worker can)."""

    def __init__(self, port: int, count: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.socks = []
        for _ in range(count):
            c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            c.bind(("127.0.0.1", 0))
            c.setblocking(False)
            self.socks.append(c)
        self.answered = self.lost = 0
        self.halt = threading.Event()

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        out: dict[socket.socket, tuple[bytes, float]] = {}
        seq = 0

        def send(c: socket.socket) -> None:
            nonlocal seq
            seq += 1
            out[c] = (str(seq).encode(), time.monotonic() + 2.0)
            c.sendto(out[c][0], ("127.0.0.1", self.port))

        for c in self.socks:
            sel.register(c, selectors.EVENT_READ)
            send(c)
        try:
            while out:
                for key, _ in sel.select(0.003):
                    c = key.fileobj
                    assert isinstance(c, socket.socket)
                    data = c.recv(2048)
                    if c in out and data == out[c][0]:
                        self.answered += 1
                        del out[c]
                now = time.monotonic()
                for c, (_, deadline) in list(out.items()):
                    if now >= deadline:
                        self.lost += 1
                        del out[c]
                if not self.halt.is_set():
                    for c in self.socks:
                        if c not in out:
                            send(c)
        finally:
            sel.close()
            for c in self.socks:
                c.close()


@pytest.mark.parametrize("shape", ["loop", "asyncio"])
def test_a_reload_loses_no_datagram_a_udp_worker_has_read(start: Start, shape: str) -> None:
    # Before: the idle-looking frozen tree was killed with its datagram in hand, about one
    # lost per handover here (7 in 20 handovers for the loop, 10 for asyncio).
    code = LOOP if shape == "loop" else ASYNCIO
    sup = start("-w", "2", "--via", "fds", "--listen", "udp://127.0.0.1:0", "--",
                sys.executable, "-c", code)  # fmt: skip
    flows = Flows(sup.port, 3)
    flows.start()
    try:
        for _ in range(4):
            sup.reload()
    finally:
        flows.halt.set()
        flows.join(5)
    print(f"udp {shape}: 4 reloads, {flows.answered} answered, {flows.lost} lost")
    assert flows.answered > 200
    assert flows.lost == 0, sup.text()[-6000:]
    assert all(s["generation"] == 5 for s in sup.status()["slots"])
