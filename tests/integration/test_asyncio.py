"""portshard.listen sockets handed to asyncio (the usage shown in docs/library.md).

asyncio takes a ready socket with ``sock=``: it sets it non-blocking, serves on it, and closes
it when the server or transport closes. Real round trips, each bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import os
from typing import cast

import pytest

import portshard
from tests.conftest import Procs

from ._util import start_group, tcp_pids

TIMEOUT = 10


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"echo: " + data)


class DatagramEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (3.11's selector datagram transport does not subclass DatagramTransport)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(b"echo: " + data, addr)


async def _round_trip(host: str, port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(payload)
        await writer.drain()
        return await reader.readexactly(len(b"echo: " + payload))
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_loop_create_server(host: str) -> None:
    shown = f"[{host}]" if ":" in host else host

    async def main() -> None:
        sock = portshard.listen(f"tcp://{shown}:0")
        port = sock.getsockname()[1]
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, sock=sock)
        async with server:
            assert await _round_trip(host, port, b"one") == b"echo: one"
            assert await _round_trip(host, port, b"two") == b"echo: two"
        # The server owned the socket: closing the server closed it.
        assert sock.fileno() == -1

    asyncio.run(asyncio.wait_for(main(), TIMEOUT))


def test_asyncio_start_server() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        writer.write(b"echo: " + line)
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def main() -> None:
        sock = portshard.listen("tcp://127.0.0.1:0")
        port = sock.getsockname()[1]
        server = await asyncio.start_server(handle, sock=sock)
        async with server:
            replies = await asyncio.gather(
                *(_round_trip("127.0.0.1", port, b"%d\n" % i) for i in range(20))
            )
        assert replies == [b"echo: %d\n" % i for i in range(20)]

    asyncio.run(asyncio.wait_for(main(), TIMEOUT))


def test_loop_create_datagram_endpoint() -> None:
    class Client(asyncio.DatagramProtocol):
        def __init__(self) -> None:
            self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.reply.set_result(data)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sock = portshard.listen("udp://127.0.0.1:0")
        port = sock.getsockname()[1]
        server, _ = await loop.create_datagram_endpoint(DatagramEcho, sock=sock)
        try:
            client, protocol = await loop.create_datagram_endpoint(
                Client, remote_addr=("127.0.0.1", port)
            )
            try:
                client.sendto(b"ping")
                assert await protocol.reply == b"echo: ping"
            finally:
                client.close()
        finally:
            server.close()

    asyncio.run(asyncio.wait_for(main(), TIMEOUT))


# Each process of the group runs asyncio.start_server on its own portshard.listen socket.
ASYNCIO_MEMBER = """
import asyncio, os, sys, portshard

async def answer(reader, writer):
    writer.write(str(os.getpid()).encode())
    await writer.drain()
    writer.close()

async def main():
    sock = portshard.listen(sys.argv[1])
    server = await asyncio.start_server(answer, sock=sock)
    print(sock.getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


def test_a_group_of_asyncio_processes(procs: Procs) -> None:
    port, children = start_group(
        procs, ASYNCIO_MEMBER, "tcp://127.0.0.1:0", 3, template="tcp://127.0.0.1:{port}"
    )
    pids = {child.pid for child in children}
    served = tcp_pids("127.0.0.1", port, want=pids, limit=300)
    assert set(served) == pids, served
    assert os.getpid() not in served
    for child in children:
        assert child.poll() is None, "a member died while serving"
