"""UDP clients in Python asyncio: a throughput load over many flows, and a flow prober.

A flow is one client socket (one source port); SO_REUSEPORT spreads UDP by flow hash, so
the load uses many flows. Each flow keeps ``window`` datagrams in flight and sends the next one
when a reply arrives; a flow that got no reply for 100 ms (datagrams dropped on a full buffer)
is refilled. Bounded by ``seconds`` and ``max_datagrams``.

Run as a program for one load process (the bench starts several, in parallel, to give a
Python client a chance to keep Python servers busy)::

    python -m bench.load.udpload --port P --flows 64 --window 4 --seconds 3
    -> {"replies": ..., "sent": ..., "seconds": ..., "by_server": {"0 4711": ...}, "cpu": ...}

`FlowSet` keeps a fixed set of flows open and asks each which worker slot answers it, before
and after a reload: a flow "moved" if another slot answers it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import socket
import sys
import time
from typing import cast

TICK = 0.1  # refill a flow with no reply for this long


async def blast(
    host: str, port: int, *, flows: int, window: int, seconds: float, max_datagrams: int
) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    by_server: collections.Counter[bytes] = collections.Counter()
    state = {"sent": 0, "replies": 0}
    deadline = time.monotonic() + seconds

    class Flow(asyncio.DatagramProtocol):
        def __init__(self) -> None:
            self.transport: asyncio.DatagramTransport | None = None
            self.heard = True

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.DatagramTransport, transport)

        def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
            by_server[data] += 1
            state["replies"] += 1
            self.heard = True
            self.send(1)

        def error_received(self, exc: Exception) -> None:
            pass  # ECONNREFUSED while a socket is being replaced: the refill retries

        def send(self, n: int) -> None:
            if self.transport is None or state["sent"] >= max_datagrams:
                return
            if time.monotonic() >= deadline:
                return
            for _ in range(n):
                self.transport.sendto(b"q")
            state["sent"] += n

    endpoints = [
        await loop.create_datagram_endpoint(Flow, remote_addr=(host, port)) for _ in range(flows)
    ]
    t0 = time.monotonic()
    for _, flow in endpoints:
        flow.send(window)
    while time.monotonic() < deadline and state["sent"] < max_datagrams:
        await asyncio.sleep(TICK)
        for _, flow in endpoints:
            if not flow.heard:
                flow.send(window)
            flow.heard = False
    elapsed = time.monotonic() - t0
    for transport, _ in endpoints:
        transport.close()
    return {
        "replies": state["replies"],
        "sent": state["sent"],
        "seconds": elapsed,
        "by_server": {k.decode(errors="replace"): v for k, v in by_server.items()},
    }


class FlowSet:
    """``flows`` UDP sockets, each with its own source port, kept open between probes."""

    def __init__(self, host: str, port: int, flows: int) -> None:
        self.socks: list[socket.socket] = []
        for _ in range(flows):
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            s.connect((host, port))
            self.socks.append(s)

    def probe(self, tries: int = 4, timeout: float = 0.3) -> list[str | None]:
        """The slot answering each flow (None: no answer after ``tries`` attempts)."""
        return asyncio.run(self._probe(tries, timeout))

    async def _probe(self, tries: int, timeout: float) -> list[str | None]:
        loop = asyncio.get_running_loop()

        async def one(s: socket.socket) -> str | None:
            for _ in range(tries):
                try:
                    while True:  # drop late answers to an earlier probe
                        s.recv(2048)
                except (BlockingIOError, ConnectionRefusedError):
                    pass
                try:
                    await loop.sock_sendall(s, b"?")
                    async with asyncio.timeout(timeout):
                        data = await loop.sock_recv(s, 2048)
                    return data.split()[0].decode()
                except (TimeoutError, OSError):
                    continue
            return None

        return list(await asyncio.gather(*(one(s) for s in self.socks)))

    def close(self) -> None:
        for s in self.socks:
            s.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="One UDP load process (see bench/load/udpload.py).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--flows", type=int, default=64)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--max-datagrams", type=int, default=5_000_000)
    a = p.parse_args(argv)
    t0 = os.times()
    out = asyncio.run(
        blast(
            a.host,
            a.port,
            flows=a.flows,
            window=a.window,
            seconds=a.seconds,
            max_datagrams=a.max_datagrams,
        )
    )
    t1 = os.times()
    out["cpu"] = (t1.user + t1.system - t0.user - t0.system) / (t1.elapsed - t0.elapsed)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
