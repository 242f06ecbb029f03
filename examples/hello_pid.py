"""Hello from PID: the HTTP server of the Go "socket sharding" article, written with portshard.

Every process answers ``GET /`` with ``Hello from PID <pid>``. Start several on one port and
the kernel spreads the connections over them.

Standalone: each copy opens its own socket in the port's SO_REUSEPORT group::

    python3 examples/hello_pid.py --listen tcp://:8080 &
    python3 examples/hello_pid.py --listen tcp://:8080 &
    for i in 1 2 3 4 5 6; do curl -s http://127.0.0.1:8080/; done
    kill %1 %2

Under a supervisor that passes the socket (LISTEN_FDS, as systemd does) and waits for READY=1
on NOTIFY_SOCKET, it serves the inherited socket and ignores ``--listen``::

    portshard run -w 4 --listen tcp://:8080 -- python3 examples/hello_pid.py
    systemd-socket-activate -l 8080 python3 examples/hello_pid.py

SIGTERM or Ctrl-C stops it after the request in hand.
"""

from __future__ import annotations

import argparse
import http.server
import os
import selectors
import signal
import socket
import socketserver
import sys
from typing import Any

import portshard


class Hello(http.server.BaseHTTPRequestHandler):
    timeout = 10  # a client that sends nothing does not hold this process forever

    def do_GET(self) -> None:
        body = f"Hello from PID {os.getpid()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would drown everything else


class Server(http.server.HTTPServer):
    """An HTTPServer on a socket that is already bound and listening."""

    def __init__(self, sock: socket.socket) -> None:
        # BaseServer, not HTTPServer.__init__: that one would create and bind a socket of its own.
        socketserver.BaseServer.__init__(self, sock.getsockname()[:2], Hello)
        self.socket = sock
        self.server_name, self.server_port = str(self.server_address[0]), sock.getsockname()[1]


def open_socket(listen: str) -> socket.socket:
    """The socket a supervisor passed (LISTEN_FDS), else a new one in the port's group."""
    inherited = portshard.inherited()
    if inherited:
        return inherited[0]
    return portshard.listen(listen)


def serve(server: Server) -> None:
    """Serve until SIGTERM or SIGINT; a request being answered is finished first.

    The signal handler only records the signal; the wakeup fd makes select() return, and the
    loop checks the flag between requests (exiting inside accept() could lose a connection).
    """
    stop: list[int] = []
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: stop.append(signum))
    server.socket.setblocking(False)  # a connection another waiter took is EAGAIN, not a hang
    with selectors.DefaultSelector() as selector, wake_r, wake_w:
        selector.register(server.socket, selectors.EVENT_READ)
        selector.register(wake_r, selectors.EVENT_READ)
        while not stop:
            for key, _ in selector.select():
                if key.fileobj is wake_r:
                    wake_r.recv(64)
                else:
                    server.handle_request()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--listen", default="tcp://:8080", help="address when not given a socket (LISTEN_FDS)"
    )
    args = parser.parse_args(argv)
    try:
        sock = open_socket(args.listen)
    except portshard.PortshardError as exc:
        print(f"hello_pid: {exc}", file=sys.stderr)
        return 1
    if sock.type != socket.SOCK_STREAM:
        print(f"hello_pid: HTTP needs a TCP socket, not {sock!r}", file=sys.stderr)
        return 2
    with Server(sock) as server:
        host, port = sock.getsockname()[:2]
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        print(f"hello_pid: pid {os.getpid()} serving http://{where}/", file=sys.stderr)
        portshard.notify_ready()
        serve(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
