"""The worker of the chaos soak (bench/soak/): a server whose process tree changes on demand.

Serves the inherited TCP socket (fd 3, LISTEN_FDS) one connection at a time. On accept it
writes the status line and ``X-Served: PID WORKER`` at once (WORKER is the pid `portshard run`
started; a forked child keeps its parent's), so a client that loses the connection later still
knows whose hands it was in. Then it reads the request, waits SERVICE_MS (default 5 ms: a kill
finds requests in flight) and answers the body ``PID WORKER``.

``GET /fork/MODE`` changes the tree; the answer's body is ``forked CHILD_PID`` (or ``no``
after CHAOS_MAX_CHILDREN, default 3, children of this process):

- ``serve``: a child that serves the same socket (a pre-fork server);
- ``setsid``: the same, after setsid() (it leaves the worker's process group and session);
- ``daemon``: a double-forked, setsid() grandchild that closes the socket and sleeps (a
  daemonized helper: nothing should outlive the worker, yet nothing kills it by its group).
"""

import os
import signal
import socket
import sys
import time

SERVICE = float(os.environ.get("SERVICE_MS", "5")) / 1000
MAX_CHILDREN = int(os.environ.get("CHAOS_MAX_CHILDREN", "3"))


def head(worker: int) -> bytes:
    return f"HTTP/1.0 200 OK\r\nX-Served: {os.getpid()} {worker}\r\n".encode()


def reply(body: str) -> bytes:
    return f"Content-Length: {len(body) + 1}\r\n\r\n{body}\n".encode()


def fork(
    sock: socket.socket, conn: socket.socket, mode: str, worker: int, children: list[int]
) -> str:
    if len(children) >= MAX_CHILDREN or mode not in ("serve", "setsid", "daemon"):
        return "no"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        conn.close()  # the client's connection is the parent's to answer
        os.close(r)
        try:
            if mode == "daemon":
                os.setsid()
                if os.fork():
                    os._exit(0)
                sock.close()
                os.write(w, str(os.getpid()).encode())
                os.close(w)
                while True:
                    time.sleep(3600)
            if mode == "setsid":
                os.setsid()
            os.write(w, str(os.getpid()).encode())
            os.close(w)
            serve(sock, worker, [])
        finally:
            os._exit(0)
    os.close(w)
    child = int(os.read(r, 32) or b"0")
    os.close(r)
    if mode == "daemon":
        os.waitpid(pid, 0)  # the intermediate process; the grandchild is re-parented
    else:
        children.append(pid)
    return f"forked {child}"


def serve(sock: socket.socket, worker: int, children: list[int]) -> None:
    while True:
        conn, _ = sock.accept()
        with conn:
            conn.settimeout(5)
            try:
                conn.sendall(head(worker))
                request = conn.recv(4096)
                path = request.split(b" ", 2)[1].decode(errors="replace") if b" " in request else ""
                if path.startswith("/fork/"):
                    body = fork(sock, conn, path[len("/fork/") :], worker, children)
                else:
                    time.sleep(SERVICE)
                    body = f"{os.getpid()} {worker}"
                conn.sendall(reply(body))
            except OSError:
                pass
        while children:  # reap exited children without blocking
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in children:
                children.remove(pid)


def main() -> None:
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or not os.environ.get("LISTEN_FDS"):
        sys.exit("chaosworker: no inherited socket (run under portshard run)")
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sock = socket.socket(fileno=3)
    sock.setblocking(True)
    serve(sock, os.getpid(), [])


if __name__ == "__main__":
    main()
