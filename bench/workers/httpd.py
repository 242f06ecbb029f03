"""The benchmark's tiny HTTP worker: the same request handling under every accept strategy.

Every response's body is the serving process's pid, so a client can count each worker's share.
The strategies differ only in how connections reach the worker:

``single``     one process, its own socket (no SO_REUSEPORT).
``blocking``   this process binds one socket and forks N workers that block in ``accept()``
               and serve one connection at a time (pre-fork, like gunicorn's sync workers: they
               answer ``Connection: close`` even to keep-alive requests).
``epoll``      one socket, forked into N event-loop workers that each poll it (level-triggered):
               every worker wakes for every connection, one wins (the thundering herd).
``exclusive``  the same with ``EPOLLEXCLUSIVE`` (the kernel wakes one poller; nginx's
               ``accept_mutex off`` on Linux 4.5+).
``reuseport``  one event-loop worker on the sockets a supervisor passed (``LISTEN_FDS``: under
               ``portshard run``), else on a SO_REUSEPORT socket of its own: run N copies.

Prints ``READY <port> <worker pid>...`` on stdout once listening. SIGTERM: event-loop workers
stop accepting, finish the connections they hold (1 s at most) and exit; SIGUSR1: write the
counters (accepted, accept() calls that found nothing, requests, stalls) to ``--stats DIR``.
``--slow-slot I``: worker I stalls ``--slow-ms`` on every ``--slow-every``-th request.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

BACKLOG = 1024  # the same for every configuration in the bench (portshard run --backlog 1024)
STOP_GRACE = 1.0  # seconds a stopping worker keeps serving the connections it holds


@dataclass
class Counters:
    accepted: int = 0
    accept_empty: int = 0  # woken for a connection another worker took (the herd's cost)
    requests: int = 0
    stalls: int = 0


@dataclass(frozen=True)
class Settings:
    slot: int
    slow: bool
    slow_every: int
    slow_ms: float
    work_ms: float
    stats: Path | None


class Worker:
    """Request handling shared by every strategy: parse, maybe stall, answer with the pid."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.n = Counters()
        self.body = f"{os.getpid()}\n".encode()

    def response(self, keep_alive: bool) -> bytes:
        self.n.requests += 1
        if self.s.slow and self.n.requests % self.s.slow_every == 0:
            self.n.stalls += 1
            time.sleep(self.s.slow_ms / 1000)
        if self.s.work_ms:
            time.sleep(self.s.work_ms / 1000)
        conn = b"keep-alive" if keep_alive else b"close"
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
            b"Connection: %s\r\n\r\n%s" % (len(self.body), conn, self.body)
        )

    def dump(self) -> None:
        if self.s.stats is not None:
            path = self.s.stats / f"{os.getpid()}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"slot": self.s.slot, **asdict(self.n)}))
            tmp.replace(path)


def wants_keep_alive(head: bytes) -> bool:
    """HTTP/1.1 keeps the connection unless it says close; HTTP/1.0 only if it asks."""
    first, _, rest = head.partition(b"\r\n")
    headers = rest.lower()
    if first.endswith(b"HTTP/1.1"):
        return b"connection: close" not in headers
    return b"connection: keep-alive" in headers


def serve_events(worker: Worker, listeners: list[socket.socket], exclusive: bool) -> None:
    """An epoll loop over the listeners and every open connection (keep-alive capable)."""
    wake_r, wake_w = socket.socketpair()
    for s in (wake_r, wake_w):
        s.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    events: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, lambda signum, _frame: events.append(signum))
    ep = select.epoll()
    lfds: dict[int, socket.socket] = {}
    for lsock in listeners:
        lsock.setblocking(False)
        lfds[lsock.fileno()] = lsock
        ep.register(lsock.fileno(), select.EPOLLIN | (select.EPOLLEXCLUSIVE if exclusive else 0))
    ep.register(wake_r.fileno(), select.EPOLLIN)
    conns: dict[int, tuple[socket.socket, bytearray]] = {}
    stop_at: float | None = None

    def close(fd: int) -> None:
        sock, _ = conns.pop(fd)
        ep.unregister(fd)
        sock.close()

    while stop_at is None or (conns and time.monotonic() < stop_at):
        for fd, _ev in ep.poll(0.1 if stop_at else -1):
            if fd in lfds:
                try:
                    conn, _ = lfds[fd].accept()
                except BlockingIOError:
                    worker.n.accept_empty += 1
                    continue
                worker.n.accepted += 1
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conns[conn.fileno()] = (conn, bytearray())
                ep.register(conn.fileno(), select.EPOLLIN)
            elif fd == wake_r.fileno():
                with contextlib.suppress(BlockingIOError):
                    wake_r.recv(64)
                while events:
                    if events.pop() == signal.SIGUSR1:
                        worker.dump()
                    elif stop_at is None:
                        stop_at = time.monotonic() + STOP_GRACE
                        for lfd in lfds:
                            ep.unregister(lfd)
            elif fd in conns:
                sock, buf = conns[fd]
                try:
                    data = sock.recv(65536)
                except OSError:
                    close(fd)
                    continue
                if not data:
                    close(fd)
                    continue
                buf += data
                keep = True
                while keep and b"\r\n\r\n" in buf:
                    end = buf.index(b"\r\n\r\n") + 4
                    keep = wants_keep_alive(bytes(buf[:end])) and stop_at is None
                    del buf[:end]
                    try:
                        sock.sendall(worker.response(keep))
                    except OSError:
                        keep = False
                if not keep:
                    close(fd)
    worker.dump()


def serve_blocking(worker: Worker, lsock: socket.socket) -> None:
    """Pre-fork: block in accept(), serve that one connection, close it."""

    def on_term(_signum: int, _frame: object) -> None:
        raise SystemExit(0)  # the bench stops these only after measuring

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGUSR1, lambda _s, _f: worker.dump())
    lsock.setblocking(True)
    while True:
        conn, _ = lsock.accept()
        worker.n.accepted += 1
        with conn:
            conn.settimeout(5)
            buf = b""
            try:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        break
                    buf += data
                if buf:
                    conn.sendall(worker.response(keep_alive=False))
            except OSError:
                pass


def open_listener(host: str, port: int, reuseport: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    return sock


def inherited_or_own(host: str, port: int) -> list[socket.socket]:
    """Sockets from LISTEN_FDS (portshard run, systemd), else one SO_REUSEPORT socket."""
    if os.environ.get("LISTEN_FDS"):
        import portshard  # only needed (and only imported) under a supervisor

        return portshard.inherited()
    return [open_listener(host, port, reuseport=True)]


def fork_workers(count: int, child: Callable[[int], None]) -> list[int]:
    pids: list[int] = []
    for index in range(count):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                child(index)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 0
            except BaseException:
                # A forked child must never return into the parent's code: report and exit.
                traceback.print_exc()
                code = 1
            os._exit(code)
        pids.append(pid)
    return pids


def wait_children(pids: list[int]) -> None:
    """The pre-fork parent: pass SIGUSR1 on; on SIGTERM, or when a worker dies, stop them all
    (SIGTERM, then SIGKILL after 5 s)."""
    sigs = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)  # after fork: the workers keep the default
    while True:
        info = signal.sigtimedwait(sigs, 1.0)
        if info is not None and info.si_signo == signal.SIGUSR1:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGUSR1)
            continue
        stopped = info is not None and info.si_signo != signal.SIGCHLD
        if stopped or any(os.waitpid(pid, os.WNOHANG)[0] for pid in pids):
            break
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    left = set(pids)
    while left and time.monotonic() < deadline:
        for pid in list(left):
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    left.discard(pid)
            except ChildProcessError:
                left.discard(pid)
        time.sleep(0.02)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument(
        "--mode",
        choices=["single", "blocking", "epoll", "exclusive", "reuseport"],
        default="reuseport",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="forked workers (blocking, epoll...)")
    p.add_argument("--slot", type=int, default=None, help="this worker's index (reuseport)")
    p.add_argument("--slow-slot", type=int, default=-1)
    p.add_argument("--slow-every", type=int, default=20)
    p.add_argument("--slow-ms", type=float, default=50.0)
    p.add_argument("--work-ms", type=float, default=0.0)
    p.add_argument("--stats", type=Path, default=None)
    a = p.parse_args(argv)

    def settings(slot: int) -> Settings:
        return Settings(slot, slot == a.slow_slot, a.slow_every, a.slow_ms, a.work_ms, a.stats)

    if a.mode in ("single", "reuseport"):
        env_slot = os.environ.get("PORTSHARD_SLOT", "")
        slot = a.slot if a.slot is not None else int(env_slot) if env_slot.isdigit() else 0
        if a.mode == "single":
            listeners = [open_listener(a.host, a.port, reuseport=False)]
        else:
            listeners = inherited_or_own(a.host, a.port)
        port = listeners[0].getsockname()[1]
        print(f"READY {port} {os.getpid()}", flush=True)
        serve_events(Worker(settings(slot)), listeners, exclusive=False)
        return 0

    lsock = open_listener(a.host, a.port, reuseport=False)

    def child(index: int) -> None:
        worker = Worker(settings(index))
        if a.mode == "blocking":
            serve_blocking(worker, lsock)
        else:
            serve_events(worker, [lsock], exclusive=a.mode == "exclusive")

    port = lsock.getsockname()[1]
    pids = fork_workers(a.workers, child)
    lsock.close()  # the workers hold it; the parent only waits
    print(f"READY {port} {' '.join(map(str, pids))}", flush=True)
    wait_children(pids)
    return 0


if __name__ == "__main__":
    sys.exit(main())
