"""The supervisor's side of the control socket, driven by the supervisor's selector.

A Unix stream socket in a private directory (0700), the socket itself 0600, and each peer's
uid checked with SO_PEERCRED (root or the supervisor's own user). Garbage, oversized or
half frames get an error reply and the connection is closed; the supervisor is never disturbed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from ..errors import PortshardError, SupervisorError
from . import protocol

log = logging.getLogger(__name__)

__all__ = ["Connection", "ControlServer", "default_path"]

FRAME_TIMEOUT = 5.0  # a peer that sends half a frame and stalls is dropped after this


def default_path(name: str) -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if os.geteuid() == 0 or not runtime:
        base = "/run/portshard" if os.geteuid() == 0 else f"/tmp/portshard-{os.geteuid()}"
    else:
        base = os.path.join(runtime, "portshard")
    return os.path.join(base, f"{name}.sock")


class Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.out = b""
        self.opened = time.monotonic()
        self.closing = False
        self.waiting = False  # a reply is deferred (reload --wait)

    def send(self, data: bytes, *, close: bool = True) -> None:
        self.out += data
        self.closing = self.closing or close
        self.waiting = False


Handler = Callable[[dict[str, Any], Connection], bytes | None]


class ControlServer:
    def __init__(
        self,
        path: str,
        selector: selectors.BaseSelector,
        handler: Handler,
        *,
        private_dir: bool = True,
    ) -> None:
        self.path = path
        self.selector = selector
        self.handler = handler
        self.conns: dict[int, Connection] = {}
        # The socket is 0600 and every peer's uid is checked, wherever it lives.
        self.sock = self._bind(path, private_dir=private_dir)
        selector.register(self.sock, selectors.EVENT_READ, self._on_accept)

    @staticmethod
    def _bind(path: str, *, private_dir: bool) -> socket.socket:
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
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale: its supervisor is gone
            else:
                raise SupervisorError(
                    f"a supervisor is already running on {path!r}; stop it, or give this one "
                    f"another --name or --control"
                )
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(16)
        sock.setblocking(False)
        return sock

    def _on_accept(self, _mask: int) -> None:
        try:
            conn_sock, _ = self.sock.accept()
        except OSError:
            return
        conn_sock.setblocking(False)
        creds = conn_sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        conn = Connection(conn_sock)
        self.conns[conn_sock.fileno()] = conn
        self.selector.register(conn_sock, selectors.EVENT_READ, lambda m: self._on_ready(conn, m))
        if uid not in (0, os.geteuid()):
            log.warning("control: refused a peer with uid %d", uid)
            conn.send(protocol.reply_error(f"uid {uid} may not control this supervisor"))
            self._flush(conn)

    def _on_ready(self, conn: Connection, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
        if mask & selectors.EVENT_READ and not conn.closing:
            self._read(conn)

    def _read(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close(conn)
            return
        if conn.waiting:
            return  # one request per connection; extra bytes while we work are ignored
        conn.buf += data
        if b"\n" not in conn.buf:
            if len(conn.buf) > protocol.MAX_FRAME:
                conn.send(protocol.reply_error(f"request larger than {protocol.MAX_FRAME} bytes"))
                self._flush(conn)
            return
        line, _, _ = conn.buf.partition(b"\n")
        if len(line) > protocol.MAX_FRAME:
            conn.send(protocol.reply_error(f"request larger than {protocol.MAX_FRAME} bytes"))
            self._flush(conn)
            return
        try:
            request = protocol.decode_request(line)
            reply = self.handler(request, conn)
        except PortshardError as exc:
            reply = protocol.reply_error(str(exc))
        except Exception as exc:  # a bug must not take the supervisor and its workers down
            log.exception("control: internal error handling %r", line[:200])
            reply = protocol.reply_error(f"internal error: {exc!r} (see the supervisor's log)")
        if reply is None:
            conn.waiting = True
            return
        conn.send(reply)
        self._flush(conn)

    def _flush(self, conn: Connection) -> None:
        try:
            while conn.out:
                sent = conn.sock.send(conn.out)
                conn.out = conn.out[sent:]
        except BlockingIOError:
            self.selector.modify(
                conn.sock,
                selectors.EVENT_READ | selectors.EVENT_WRITE,
                lambda m: self._on_ready(conn, m),
            )
            return
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                log.warning("control: send failed: %s", exc)
            self.close(conn)
            return
        if conn.closing:
            self.close(conn)

    def reply(self, conn: Connection, data: bytes) -> None:
        """Send a deferred reply (if the peer is still there)."""
        if conn.sock.fileno() >= 0:
            conn.send(data)
            self._flush(conn)

    def expire(self, now: float) -> None:
        for conn in list(self.conns.values()):
            if not conn.waiting and not conn.closing and now - conn.opened > FRAME_TIMEOUT:
                conn.send(protocol.reply_error(f"no complete request within {FRAME_TIMEOUT:g}s"))
                self._flush(conn)

    def close(self, conn: Connection) -> None:
        fd = conn.sock.fileno()
        if fd >= 0:
            self.selector.unregister(conn.sock)
            self.conns.pop(fd, None)
            conn.sock.close()

    def shutdown(self) -> None:
        for conn in list(self.conns.values()):
            self.close(conn)
        self.selector.unregister(self.sock)
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
