"""The benchmark's UDP worker: answers every datagram with ``<slot> <pid>``, after
``--work-us`` microseconds of CPU work (a busy loop standing in for real handling).

Its socket comes from a supervisor (``LISTEN_FDS``: ``portshard run``), else it binds one of
its own, with SO_REUSEPORT if ``--reuseport`` (run N copies: the naive deployment). Prints
``READY <port> <pid>`` once bound. SIGTERM ends it (its socket closes, as in a naive restart).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time


def open_socket(host: str, port: int, reuseport: bool) -> socket.socket:
    if os.environ.get("LISTEN_FDS"):
        import portshard  # only needed (and only imported) under a supervisor

        return portshard.inherited()[0]
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--slot", type=int, default=None)
    p.add_argument("--reuseport", action="store_true")
    p.add_argument("--work-us", type=float, default=0.0, help="CPU work per datagram")
    a = p.parse_args(argv)
    env_slot = os.environ.get("PORTSHARD_SLOT", "")
    slot = a.slot if a.slot is not None else int(env_slot) if env_slot.isdigit() else 0
    sock = open_socket(a.host, a.port, a.reuseport)
    sock.setblocking(True)
    print(f"READY {sock.getsockname()[1]} {os.getpid()}", flush=True)
    reply = f"{slot} {os.getpid()}".encode()
    recvfrom, sendto = sock.recvfrom, sock.sendto
    work = a.work_us / 1e6
    clock = time.perf_counter
    while True:
        _data, peer = recvfrom(2048)
        if work:  # stands in for real handling (a DNS lookup, a QUIC packet): burns CPU
            until = clock() + work
            while clock() < until:
                pass
        try:  # noqa: SIM105 - a with-statement per datagram costs more than the work
            sendto(reply, peer)
        except OSError:
            pass  # a full send buffer or a client gone: UDP drops, so does this


if __name__ == "__main__":
    sys.exit(main())
