"""A worker whose main process is slow to stop and whose one child left its process group.

The main process forks a child that calls setsid() (it leaves the main's process group and
session, as a daemonizing child does) and serves the inherited socket (fd 3, LISTEN_FDS): one
HTTP/1.0 request per connection, answered after SERVICE_MS (default 1000) with its pid. The
main process serves nothing: it takes SIGTERM with sigwait() (blocked, no handler: portshard
sees a program that does not handle it, as one that reads a signalfd), then takes STOP_DELAY
s (default 3) to exit. Its child keeps SIGTERM's default action.

WAIT_WHILE=path: a worker of slot WAIT_SLOT (default 1; $PORTSHARD_SLOT) that starts while
that file exists waits (up to 60 s) for it to go before it serves: not ready meanwhile.

This is the chaos soak's setsid child (tests/workers/chaosworker.py) with the window around
its worker's stop widened: a signal to the main's process group never reaches the child,
which runs on after the thaw until the main's exit, when portshard kills what is left of the
tree with whatever it holds.
"""

import os
import signal
import socket
import sys
import time

SERVICE = float(os.environ.get("SERVICE_MS", "1000")) / 1000
STOP_DELAY = float(os.environ.get("STOP_DELAY", "3"))


def serve(sock: socket.socket) -> None:
    body = f"{os.getpid()}\n".encode()
    while True:
        conn, _ = sock.accept()
        with conn:
            conn.settimeout(5)
            try:
                conn.recv(4096)
                time.sleep(SERVICE)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            except OSError:
                pass


def main() -> None:
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or not os.environ.get("LISTEN_FDS"):
        sys.exit("slowstop: no inherited socket (run under portshard run)")
    hold = os.environ.get("WAIT_WHILE")
    if hold and os.environ.get("PORTSHARD_SLOT") == os.environ.get("WAIT_SLOT", "1"):
        deadline = time.monotonic() + 60
        while os.path.exists(hold) and time.monotonic() < deadline:
            time.sleep(0.01)
    sock = socket.socket(fileno=3)
    sock.setblocking(True)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    if os.fork() == 0:
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            os.setsid()
            serve(sock)
        finally:
            os._exit(0)
    signal.sigwait({signal.SIGTERM})
    print(f"slowstop {os.getpid()}: SIGTERM; stopping in {STOP_DELAY:g}s", flush=True)
    time.sleep(STOP_DELAY)
    os._exit(0)


if __name__ == "__main__":
    main()
