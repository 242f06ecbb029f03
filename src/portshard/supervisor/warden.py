"""The warden: a small process beside the supervisor that outlives it (issue 15).

Why a process: when the supervisor dies (SIGKILL, the OOM killer, a bug), something must keep
what the workers need and what the next supervisor needs, and something must end the workers
if nobody comes. The workers hold their slot's sockets themselves (they keep serving), but:
- the next supervisor needs the sockets (to own the slots again) without ptrace rights over
  the workers (``pidfd_getfd`` needs them: not for a non-root user under Yama, not for a
  non-dumpable worker). The warden gets a copy of every slot socket over SCM_RIGHTS as the
  slots open, and hands them over the same way;
- with ``--log-format json`` the workers write into pipes the supervisor read: with no
  reader they would die of SIGPIPE at their next line. The warden holds the read ends and,
  while nobody else reads, writes the lines out itself;
- a worker whose supervisor is gone and is not adopted within ``--orphan-timeout`` must go:
  the warden stops it (no new connections, the stop signal, ``--grace``, then SIGKILL).

The supervisor starts it (``python -m portshard.supervisor.warden``, its channel on fd 3, in
a process group of its own so that a terminal's Ctrl-C does not reach it) and keeps it
current: ``put`` (keys and fds), ``drop`` (keys), ``manifest`` (the state, ``handoff.py``),
``bye`` (a clean stop: nothing to do). EOF on the channel without ``bye`` means the
supervisor died. The supervisor's exec (``portshard upgrade``) keeps the channel open: the
warden does not notice it. If the warden dies, the supervisor starts another one and sends
it everything again.

Adoption: the next ``portshard run`` with the same control socket connects to the warden's
abstract address (by the control socket's path), sends ``adopt``, gets the manifest and the
fds, and answers ``adopted``; then the warden exits. Only the same user (or root) may adopt
(SO_PEERCRED). While its supervisor lives, the warden refuses (a second supervisor). An
adopter whose ``adopt`` does not list ``notify`` in ``takes`` (an older portshard) binds the
workers' notify address itself: the warden closes its copy instead of handing it over.

The wire: SOCK_SEQPACKET (a message is a message), zlib'd JSON, at most ``FDS_PER_MESSAGE``
fds a message (the kernel's SCM_MAX_FD is 253).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import signal
import socket
import sys
import time
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

from ..control.paths import warden_address
from ..linux import cgroup
from ..linux.proc import stat
from ..linux.syscalls import pidfd_open
from .output import LineSplitter
from .worker import signal_tree

__all__ = ["FDS_PER_MESSAGE", "recv", "send", "send_fds"]

log = logging.getLogger("portshard.warden")

CHANNEL_FD = 3
FDS_PER_MESSAGE = 200
MAX_MESSAGE = 1 << 22
ADOPT_TIMEOUT = 10.0  # s an adopter has to say "adopted" once it has the fds
BIND_WAIT = 5.0  # s to wait for the previous warden's address (it exits after an adoption)
QUIET_WAIT = 2.0  # s at most for the queues to empty once new connections are refused


def send(sock: socket.socket, obj: dict[str, Any], fds: Sequence[int] = ()) -> None:
    data = zlib.compress(json.dumps(obj, separators=(",", ":")).encode())
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def send_fds(sock: socket.socket, items: Iterable[tuple[str, int]]) -> None:
    """``put`` messages for (key, fd) pairs, ``FDS_PER_MESSAGE`` at a time."""
    batch: list[tuple[str, int]] = []
    for item in items:
        batch.append(item)
        if len(batch) == FDS_PER_MESSAGE:
            send(sock, {"op": "put", "keys": [k for k, _ in batch]}, [f for _, f in batch])
            batch = []
    if batch:
        send(sock, {"op": "put", "keys": [k for k, _ in batch]}, [f for _, f in batch])


def recv(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and its fds; (None, []) at EOF."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, FDS_PER_MESSAGE)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(zlib.decompress(data)), fds


def same_process(pid: int, start: int) -> bool:
    """``pid`` is still the process that started at ``start`` (pids are reused)."""
    st = stat(pid)
    return st is not None and st.state not in ("Z", "X") and (not start or st.start == start)


class Warden:
    def __init__(
        self, channel: socket.socket, listener: socket.socket, supervisor: int, control: str = ""
    ) -> None:
        self.channel: socket.socket | None = channel
        self.listener = listener
        self.supervisor = supervisor
        self.control = control  # the dead supervisor's control socket path
        self.control_id: tuple[int, int] | None = None  # its (dev, inode) when it died
        self.fds: dict[str, int] = {}
        self.manifest: dict[str, Any] = {}
        self.orphaned_at: float | None = None
        self.splitters: dict[str, LineSplitter] = {}

    # ---- while the supervisor lives ---------------------------------------------------------

    def on_channel(self) -> bool:
        """One message from the supervisor; False once it is gone (EOF) or said bye."""
        assert self.channel is not None
        try:
            msg, fds = recv(self.channel)
        except (ConnectionError, OSError):
            msg, fds = None, []
        if msg is None:
            self.channel.close()
            self.channel = None
            self.orphan()
            return True
        op = msg.get("op")
        if op == "put":
            for key, fd in zip(msg["keys"], fds, strict=True):
                old = self.fds.pop(key, -1)
                if old >= 0:
                    os.close(old)
                self.fds[key] = fd
        elif op == "drop":
            for key in msg["keys"]:
                fd = self.fds.pop(key, -1)
                if fd >= 0:
                    os.close(fd)
        elif op == "manifest":
            self.manifest = msg["manifest"]
        elif op == "bye":
            return False
        return True

    # ---- once it is gone --------------------------------------------------------------------

    def orphan(self) -> None:
        self.orphaned_at = time.monotonic()
        with contextlib.suppress(OSError):
            st = os.lstat(self.control)
            self.control_id = (st.st_dev, st.st_ino)
        workers = list(self._workers())
        timeout = self._timeout()
        log.error(
            "supervisor pid %d is gone; its %d worker(s) keep serving on their sockets (the "
            "warden, pid %d, holds %d fd(s)); the next `portshard run` of the same name within "
            "%gs adopts them, else they stop",
            self.supervisor,
            len(workers),
            os.getpid(),
            len(self.fds),
            timeout,
        )
        for w in workers:  # one being drained may be frozen: it must serve what it holds
            self._signal(w, signal.SIGCONT)

    def _timeout(self) -> float:
        return float(self.manifest.get("stop", {}).get("orphan_timeout", 0.0))

    def due(self) -> float | None:
        if self.orphaned_at is None:
            return None
        return self.orphaned_at + self._timeout()

    def drain_output(self, key: str) -> None:
        """A worker's stdout/stderr while nobody else reads: its lines go to our stderr."""
        fd = self.fds[key]
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        splitter = self.splitters.setdefault(key, LineSplitter())
        _, pid, stream = key.split(":")
        lines = splitter.feed(data) if data else [line for line in [splitter.flush()] if line]
        for line in lines:
            log.log(
                logging.INFO if stream == "stdout" else logging.WARNING,
                "%s",
                line,
                extra={"pid": int(pid), "stream": stream},
            )
        if not data:
            os.close(self.fds.pop(key))

    def _workers(self) -> Iterable[dict[str, Any]]:
        for slot in self.manifest.get("slots", ()):
            for w in slot.get("workers", ()):
                if same_process(w["pid"], w.get("start", 0)):
                    yield w

    def _signal(self, w: dict[str, Any], sig: int) -> None:
        """As ``Worker.signal`` (its tree, by its cgroup if it has one)."""
        home = self.manifest.get("trees", {}).get("home")
        group = cgroup.Cgroup(os.path.join(home, w["cgroup"])) if home and w.get("cgroup") else None
        signal_tree(w["pid"], group, sig)

    def stop_workers(self) -> None:
        """Nobody adopted them: refuse new connections, let the queues empty, then the stop
        signal, --grace, SIGKILL; remove the groups; close every fd."""
        from ..steering import cbpf

        stop = self.manifest.get("stop", {})
        listening = []
        for key, fd in self.fds.items():
            if not key.startswith("sock:"):
                continue
            sock = socket.socket(fileno=os.dup(fd))
            try:
                if sock.type == socket.SOCK_STREAM:
                    cbpf.drop_syns(sock)
                    listening.append(fd)
            except OSError:
                pass
            finally:
                sock.close()
        until = time.monotonic() + min(QUIET_WAIT, float(stop.get("grace", 30.0)))
        while time.monotonic() < until and any(_queued(fd) for fd in listening):
            time.sleep(0.01)
        workers = list(self._workers())
        pidfds = {}
        for w in workers:
            with contextlib.suppress(OSError):
                pidfds[w["pid"]] = pidfd_open(w["pid"])
            self._signal(w, int(stop.get("signal", signal.SIGTERM)))
            self._signal(w, signal.SIGCONT)
        deadline = time.monotonic() + float(stop.get("grace", 30.0))
        while pidfds and time.monotonic() < deadline:
            ready, _, _ = select.select(list(pidfds.values()), [], [], 0.1)
            for pid, fd in list(pidfds.items()):
                if fd in ready:
                    os.close(pidfds.pop(pid))
            self._drain_all()
        killed = [w for w in workers if w["pid"] in pidfds]
        for w in killed:
            self._signal(w, signal.SIGKILL)
        for fd in pidfds.values():
            os.close(fd)
        home = self.manifest.get("trees", {}).get("home")
        if home:
            with contextlib.suppress(OSError):
                cgroup.remove_home(home)
        self._drain_all()
        log.warning(
            "nobody adopted the workers of supervisor pid %d within %gs: %d stopped by their "
            "stop signal, %d killed after --grace; the warden exits",
            self.supervisor,
            self._timeout(),
            len(workers) - len(killed),
            len(killed),
        )
        self.close_all()
        self.remove_control()

    def remove_control(self) -> None:
        """The dead supervisor's control socket, once nobody will adopt: it was left behind
        (`status` then said "a stale socket"). Only the very file it died with (a supervisor
        starting since replaced it: another inode), and only if nobody listens on it."""
        try:
            st = os.lstat(self.control)
        except OSError:
            return
        if self.control_id != (st.st_dev, st.st_ino):
            return
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.control)
        except ConnectionRefusedError:
            with contextlib.suppress(OSError):
                os.unlink(self.control)
        except OSError:
            pass
        finally:
            probe.close()

    def _drain_all(self) -> None:
        for key in [k for k in self.fds if k.startswith("out:")]:
            ready, _, _ = select.select([self.fds[key]], [], [], 0)
            if ready:
                self.drain_output(key)

    def close_all(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = {}

    # ---- adoption ---------------------------------------------------------------------------

    def on_adopter(self) -> bool:
        """Someone connected; True once it has adopted everything (then we exit)."""
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(ADOPT_TIMEOUT)
            try:
                return self._adopt(conn)
            except Exception as exc:  # garbage from a local peer must not end the warden
                log.warning("an adoption failed: %r; still waiting", exc)
                return False

    def _adopt(self, conn: socket.socket) -> bool:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid, uid = int.from_bytes(creds[:4], "little"), int.from_bytes(creds[4:8], "little")
        msg, fds = recv(conn)
        for fd in fds:
            os.close(fd)
        if msg is None or msg.get("op") != "adopt":
            return False
        if uid not in (0, os.getuid()):
            send(conn, {"op": "refused", "why": f"uid {uid} may not adopt uid {os.getuid()}'s"})
            return False
        if self.channel is not None:
            send(
                conn,
                {"op": "refused", "why": f"its supervisor, pid {self.supervisor}, is running"},
            )
            return False
        for key in [k for k in self.fds if k.startswith("out:")]:  # the rest of a line
            ready, _, _ = select.select([self.fds[key]], [], [], 0)
            if ready:
                self.drain_output(key)
        if "notify" not in msg.get("takes", ()) and "notify" in self.fds:
            self._let_go_of_notify(pid)
        send(conn, {"op": "manifest", "manifest": self.manifest})
        send_fds(conn, self.fds.items())
        send(conn, {"op": "end"})
        reply, more = recv(conn)
        for fd in more:
            os.close(fd)
        if reply is None or reply.get("op") != "adopted":
            return False
        log.info("pid %d adopted the workers of supervisor pid %d", pid, self.supervisor)
        self.close_all()
        return True

    def _let_go_of_notify(self, pid: int) -> None:
        """An adopter that does not take the workers' notify socket (an older portshard: a
        downgrade across a crash) binds its address itself: we close ours first, or it
        exits with EADDRINUSE (measured: every such adopter, the workers left to
        --orphan-timeout). A READY=1 sent until it binds is lost, as it was then."""
        log.warning(
            "pid %d adopts with an older portshard that binds the workers' notify address "
            "itself: letting go of it (a READY=1 sent until it binds is lost)",
            pid,
        )
        os.close(self.fds.pop("notify"))

    # ---- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        while True:
            watched: list[Any] = [self.listener]
            if self.channel is not None:
                watched.append(self.channel)
            outputs = {}
            if self.orphaned_at is not None:
                outputs = {fd: k for k, fd in self.fds.items() if k.startswith("out:")}
            due = self.due()
            timeout = None if due is None else max(0.0, due - time.monotonic())
            ready, _, _ = select.select([*watched, *outputs], [], [], timeout)
            for item in ready:
                if item is self.channel:
                    if not self.on_channel():
                        self.close_all()
                        return 0
                elif item is self.listener:
                    if self.on_adopter():
                        return 0
                elif item in outputs and outputs[item] in self.fds:
                    self.drain_output(outputs[item])
            due = self.due()
            if due is not None and time.monotonic() >= due:
                self.stop_workers()
                return 0


def _queued(fd: int) -> int:
    from ..linux.tcpinfo import queue_depth_fd

    try:
        return queue_depth_fd(fd).queued
    except OSError:
        return 0


def main(argv: Sequence[str]) -> int:
    """``python -m portshard.supervisor.warden CONTROL_PATH SUPERVISOR_PID LOG_FORMAT``."""
    from ..logfmt import JsonFormatter, TextFormatter

    control, supervisor, fmt = argv[0], int(argv[1]), argv[2]
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)  # only its supervisor (or nobody) ends it
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.getLogger().handlers[:] = [handler]
    logging.getLogger().setLevel(logging.INFO)
    channel = socket.socket(fileno=CHANNEL_FD)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    deadline = time.monotonic() + BIND_WAIT
    while True:  # after an adoption the old warden is on its way out
        try:
            listener.bind(warden_address(control))
            break
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                log.error("warden: cannot bind its address: %s", exc)
                return 1
            time.sleep(0.02)
    listener.listen(4)
    return Warden(channel, listener, supervisor, control).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
