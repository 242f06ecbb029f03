"""The supervisor's side of the control socket, driven by the supervisor's selector.

A Unix stream socket in a private directory (0700), the socket itself 0600, and each peer's
uid checked with SO_PEERCRED (root or the supervisor's own user). Garbage, oversized or
half frames get an error reply and the connection is closed; the supervisor is never disturbed.
The accept/buffer/flush/expire plumbing and its limits (connections, idle time, descriptors)
are ``endpoint.StreamServer``'s.

``--control PATH`` never removes anything but a stale socket of portshard's: a socket owned by
this user that nobody listens on. A regular file, a directory, a symlink, another user's socket
or a live socket (a running supervisor, or another program) is refused with the reason.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import selectors
import socket
import stat
import struct
from collections.abc import Callable
from typing import Any

from ..endpoint import Limits, Peer, StreamServer
from ..errors import PortshardError, SupervisorError
from . import protocol
from .paths import default_path

log = logging.getLogger(__name__)

__all__ = ["Connection", "ControlServer", "default_path"]

FRAME_TIMEOUT = 5.0  # a peer that sends half a frame and stalls is dropped after this
# 200 `portshard status` at once all get answers: the queue holds those beyond the cap (the
# client also retries EAGAIN for a moment); backlog 16 refused them (issue 14).
LIMITS = Limits(max_conns=64, idle=FRAME_TIMEOUT, max_request=protocol.MAX_FRAME, backlog=1024)

Connection = Peer  # what the supervisor holds for a deferred reply (reload --wait)
Handler = Callable[[dict[str, Any], Connection], bytes | None]


class ControlServer(StreamServer):
    name = "control"
    busy_reply = protocol.reply_error(
        "the supervisor is out of file descriptors for control connections; try again"
    )

    def __init__(
        self,
        path: str,
        selector: selectors.BaseSelector,
        handler: Handler,
        *,
        private_dir: bool = True,
        limits: Limits = LIMITS,
        inherited: socket.socket | None = None,
    ) -> None:
        self.path = path
        self.handler = handler
        # The socket is 0600 and every peer's uid is checked, wherever it lives. An upgrade
        # passes the listening socket on (``inherited``): requests made meanwhile wait in it.
        if inherited is not None:
            sock = inherited
        else:
            sock = _bind(path, private_dir=private_dir, backlog=limits.backlog)
        self._inode = os.stat(path).st_ino
        super().__init__(sock, selector, limits)

    @property
    def conns(self) -> dict[int, Peer]:
        return self.peers

    def on_accept(self, peer: Peer) -> None:
        creds = peer.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        peer.pid, uid, _gid = struct.unpack("3i", creds)
        if uid not in (0, os.geteuid()):
            log.warning("control: refused a peer with uid %d", uid)
            self.send(peer, protocol.reply_error(f"uid {uid} may not control this supervisor"))

    def on_data(self, peer: Peer) -> None:
        if b"\n" not in peer.buf:
            if len(peer.buf) > protocol.MAX_FRAME:
                self.send(
                    peer, protocol.reply_error(f"request larger than {protocol.MAX_FRAME} bytes")
                )
            return
        line, _, _ = peer.buf.partition(b"\n")
        if len(line) > protocol.MAX_FRAME:
            self.send(peer, protocol.reply_error(f"request larger than {protocol.MAX_FRAME} bytes"))
            return
        try:
            request = protocol.decode_request(line)
            reply = self.handler(request, peer)
        except PortshardError as exc:
            reply = protocol.reply_error(str(exc))
        except Exception as exc:  # a bug must not take the supervisor and its workers down
            log.exception("control: internal error handling %r", line[:200])
            reply = protocol.reply_error(f"internal error: {exc!r} (see the supervisor's log)")
        if reply is None:
            peer.waiting = True
            return
        self.send(peer, reply)

    def on_expire(self, peer: Peer) -> None:
        self.send(peer, protocol.reply_error(f"no complete request within {FRAME_TIMEOUT:g}s"))

    def reply(self, conn: Connection, data: bytes) -> None:
        """Send a deferred reply (if the peer is still there)."""
        self.send(conn, data)

    def shutdown(self) -> None:
        self.close_all()
        with contextlib.suppress(OSError):
            if os.lstat(self.path).st_ino == self._inode:  # still ours: not a successor's
                os.unlink(self.path)


def _bind(path: str, *, private_dir: bool, backlog: int) -> socket.socket:
    directory = os.path.dirname(path) or "."
    if private_dir:
        # Our default directory: create it 0700 and refuse one someone else can write.
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise SupervisorError(
                f"cannot create the control directory {directory!r}: {exc.strerror}; "
                f"pass --control PATH in a directory you can write"
            ) from None
        st = os.stat(directory)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise SupervisorError(
                f"control directory {directory!r} is not private (owner uid {st.st_uid}, "
                f"mode {st.st_mode & 0o777:o}); remove it or pass --control elsewhere"
            )
    elif not os.path.isdir(directory):
        raise SupervisorError(
            f"--control {path!r}: directory {directory!r} does not exist; create it first"
        )
    if len(path.encode()) >= 108:
        raise SupervisorError(
            f"control socket path {path!r} is longer than 107 bytes; use a shorter --control"
        )
    remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise SupervisorError(
            f"--control {path!r}: cannot listen there: {exc.strerror}; pick another path"
        ) from None
    finally:
        os.umask(old)
    return sock


def remove_stale(path: str) -> None:
    """Remove ``path`` if it is a stale control socket of ours; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    fix = "remove it yourself if it is not needed, or give this supervisor another --control"
    if not stat.S_ISSOCK(st.st_mode):
        kind = (
            "a directory"
            if stat.S_ISDIR(st.st_mode)
            else "a symbolic link"
            if stat.S_ISLNK(st.st_mode)
            else "a regular file"
            if stat.S_ISREG(st.st_mode)
            else "not a socket"
        )
        raise SupervisorError(
            f"--control {path!r} is {kind}: portshard replaces only a stale socket of its "
            f"own; {fix}"
        )
    if st.st_uid != os.geteuid():
        raise SupervisorError(f"--control {path!r} is a socket of uid {st.st_uid}, not ours; {fix}")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale: nobody listens (its supervisor is gone)
        return
    except OSError as exc:
        if exc.errno == errno.EAGAIN:  # its queue is full: someone is very much alive
            raise SupervisorError(f"{path!r} is a live socket (its queue is full); {fix}") from None
        raise SupervisorError(f"--control {path!r}: {exc.strerror}; {fix}") from None
    try:
        raise SupervisorError(_who_listens(probe, path, fix))
    finally:
        probe.close()


def _who_listens(probe: socket.socket, path: str, fix: str) -> str:
    """Is the live socket at ``path`` a supervisor? Ask it for its status."""
    try:
        probe.sendall(protocol.encode({"v": protocol.VERSION, "cmd": "status"}))
        line = probe.makefile("rb").readline(protocol.MAX_FRAME)
        reply = json.loads(line)
        if isinstance(reply, dict) and "ok" in reply:
            return (
                f"a supervisor is already running on {path!r}; stop it, or give this one "
                f"another --name or --control"
            )
    except (OSError, ValueError, TypeError):
        pass
    creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid = struct.unpack("3i", creds)[0]
    try:
        with open(f"/proc/{pid}/comm") as f:
            program = f.read().strip()
    except OSError:
        program = "?"
    return f"--control {path!r} is a live socket of another program (pid {pid}, {program}); {fix}"
