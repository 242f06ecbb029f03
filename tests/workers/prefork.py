"""A plain pre-fork server: the master takes the socket, forks children that accept, wait()s.

The master never waits on the socket itself (as gunicorn's arbiter and nginx's master).
Socket: the inherited fd 3 (LISTEN_FDS), or argv[1] as an fd number. Env: CHILDREN (2),
SETSID=1 (each child calls setsid(): it leaves the master's process group and session, as a
daemonizing child does), PIDS_TO=path (the master writes the children's pids there, one a
line, once they run). Children answer one HTTP/1.0 request per connection with "pid".
"""

import contextlib
import os
import signal
import socket
import sys
import time


def child(sock: socket.socket) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if os.environ.get("SETSID"):
        os.setsid()
    body = f"{os.getpid()}\n".encode()
    while True:
        conn, _ = sock.accept()
        with conn:
            conn.settimeout(5)
            try:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            except OSError:
                pass


def main() -> None:
    fd = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 3
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    kids = []
    for _ in range(int(os.environ.get("CHILDREN", "2"))):
        pid = os.fork()
        if pid == 0:
            try:
                child(sock)
            finally:
                os._exit(0)
        kids.append(pid)
    if os.environ.get("PIDS_TO"):
        with open(os.environ["PIDS_TO"] + ".tmp", "w") as f:
            f.write("".join(f"{pid}\n" for pid in kids))
        os.rename(os.environ["PIDS_TO"] + ".tmp", os.environ["PIDS_TO"])

    def stop(_s: int, _f: object) -> None:
        for pid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    while kids:
        try:
            pid, _ = os.wait()
        except ChildProcessError:
            break
        kids = [k for k in kids if k != pid]
    time.sleep(0)


if __name__ == "__main__":
    main()
