"""Holds every connection it accepts and answers each message on it with its slot (issue 11's
long-lived connections, issue 17's idle ones): one epoll loop, no per-connection timers.

Its listening socket is fd 3 (portshard run) or $BENCH_FD; its slot $PORTSHARD_SLOT or
$BENCH_SLOT. BENCH_SLOW=x3 with BENCH_SLOW_SLOT=N: slot N burns twice the time of an answer
after each (always 3x slower).
"""

from __future__ import annotations

import os
import selectors
import socket
import time


def main() -> None:
    slot = os.environ.get("PORTSHARD_SLOT") or os.environ.get("BENCH_SLOT", "0")
    slow = os.environ.get("BENCH_SLOW") == "x3" and os.environ.get("BENCH_SLOW_SLOT") == slot
    listener = socket.socket(fileno=int(os.environ.get("BENCH_FD", "3")))
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    answer = f"{slot}\n".encode()
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is listener:
                while True:
                    try:
                        conn, _ = listener.accept()
                    except BlockingIOError:
                        break
                    sel.register(conn, selectors.EVENT_READ)
                continue
            began = time.monotonic()
            try:
                data = sock.recv(4096)
                if data:
                    sock.sendall(answer)
            except OSError:
                data = b""
            if not data:
                sel.unregister(sock)
                sock.close()
            elif slow:
                until = time.monotonic() + 2 * (time.monotonic() - began)
                while time.monotonic() < until:
                    pass


if __name__ == "__main__":
    main()
