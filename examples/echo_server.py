"""The echo server of the Linux port-sharing talk, written with portshard.

Each process opens its own socket on the port with SO_REUSEPORT (portshard.listen), accepts,
and echoes back every line it gets, prefixed with its pid, so you can see which process the
kernel picked. TCP echoes lines; UDP (``udp://``) echoes datagrams. Run three on one port::

    python3 examples/echo_server.py tcp://127.0.0.1:9000 &
    python3 examples/echo_server.py tcp://127.0.0.1:9000 &
    python3 examples/echo_server.py tcp://127.0.0.1:9000 &
    for i in 1 2 3 4 5 6; do echo hello | nc -N 127.0.0.1 9000; done    # "4121: hello" ...
    kill %1 %2 %3

It uses asyncio with the socket passed as ``sock=``, so one process serves many clients at once.
SIGTERM or Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import cast

import portshard

PREFIX = f"{os.getpid()}: ".encode()


async def echo_lines(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            writer.write(PREFIX + line)
            await writer.drain()
    except ConnectionError:
        pass  # the client went away mid-line
    finally:
        writer.close()


class EchoDatagrams(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(PREFIX + data, addr)


async def serve(address: str) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    addr = portshard.parse(address)
    sock = portshard.listen(addr)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"echo_server: pid {os.getpid()} on {addr.proto.value}://{shown}:{port}", file=sys.stderr)
    if addr.proto is portshard.Proto.UDP:
        transport, _ = await loop.create_datagram_endpoint(EchoDatagrams, sock=sock)
        await stop.wait()
        transport.close()
    else:
        async with await asyncio.start_server(echo_lines, sock=sock):
            await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("address", help="where to listen, e.g. tcp://127.0.0.1:9000 or udp://:9000")
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.address))
    except portshard.PortshardError as exc:
        print(f"echo_server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
