"""The test bed's HTTP worker: answers ``<host> <pid>`` and closes (one request per connection).

Runs under ``portshard run --via fds`` (its slot's socket is fd 3); the host's name comes from
``NETBED_HOST``, so a client can tell which host and which worker served each request. The
worker of slot ``NETBED_STALL_SLOT`` never accepts (never ready).
"""

from __future__ import annotations

import os
import signal
import socket
import sys


def main() -> int:
    if os.environ.get("LISTEN_FDS") != "1":
        print("netbed worker: run me under portshard run --via fds (LISTEN_FDS=1)", file=sys.stderr)
        return 2
    if os.environ.get("NETBED_STALL_SLOT", "-") == os.environ.get("PORTSHARD_SLOT"):
        signal.pause()  # a worker that never becomes ready (the test bed's half-ready host)
    listener = socket.socket(fileno=3)
    body = f"{os.environ.get('NETBED_HOST', '?')} {os.getpid()}\n".encode()
    reply = (
        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            try:
                data = b""
                while b"\r\n\r\n" not in data and len(data) < 8192:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall(reply)
            except OSError:
                pass


if __name__ == "__main__":
    sys.exit(main())
