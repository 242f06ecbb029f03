"""A cooperative test worker: serves "slot pid gen" over HTTP/1.0 on its inherited sockets.

Stops gracefully on SIGTERM (flag + wakeup fd + select before accept: never loses a
connection accept() returned). Optional env: WORK_MS (sleep per request), DIE_ON_TERM
(keep SIGTERM's default action), EXIT_AFTER (seconds, then exit 7), STOP_DELAY (seconds
between the stop signal and the exit: a slow shutdown). Sends READY=1 when
NOTIFY_SOCKET is set.
UDP sockets answer each datagram with "slot pid".
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import sys
import time

import portshard


def main() -> None:
    socks = portshard.inherited()
    if not socks:
        sys.exit("fdworker: no inherited sockets (run under portshard run)")
    slot = os.environ.get("PORTSHARD_SLOT", "?")
    gen = os.environ.get("GEN", "1")
    work = float(os.environ.get("WORK_MS", "0")) / 1000
    body = f"{slot} {os.getpid()} {gen}\n".encode()
    stop = False
    r, w = socket.socketpair()
    r.setblocking(False)
    w.setblocking(False)
    signal.set_wakeup_fd(w.fileno())

    def on_term(_s: int, _f: object) -> None:
        nonlocal stop
        stop = True

    if not os.environ.get("DIE_ON_TERM"):  # else: dies on SIGTERM, like python -m http.server
        signal.signal(signal.SIGTERM, on_term)
    sel = selectors.DefaultSelector()
    sel.register(r, selectors.EVENT_READ)
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    if os.environ.get("NOTIFY_SOCKET"):
        portshard.notify_ready()
    if os.environ.get("EXIT_AFTER"):  # crash a while after becoming ready
        signal.signal(signal.SIGALRM, lambda _s, _f: os._exit(7))
        signal.setitimer(signal.ITIMER_REAL, float(os.environ["EXIT_AFTER"]))
    while not stop:
        for key, _ in sel.select():
            s = key.fileobj
            if s is r:
                r.recv(64)
                continue
            assert isinstance(s, socket.socket)
            if s.type == socket.SOCK_DGRAM:
                try:
                    _data, peer = s.recvfrom(2048)
                except BlockingIOError:
                    continue
                s.sendto(f"{slot} {os.getpid()} {gen}".encode(), peer)
                continue
            try:
                conn, _ = s.accept()
            except BlockingIOError:
                continue
            with conn:
                conn.setblocking(True)
                conn.settimeout(5)
                try:
                    conn.recv(4096)
                    if work:
                        time.sleep(work)
                    conn.sendall(
                        b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
                    )
                except OSError:
                    pass
    time.sleep(float(os.environ.get("STOP_DELAY", "0")))


if __name__ == "__main__":
    main()
