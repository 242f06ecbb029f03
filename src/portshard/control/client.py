"""Talk to a running supervisor over its control socket.

Every failure is a ControlError whose one line names the socket and the fix: no supervisor,
a stale socket, no permission, a busy supervisor (its queue full: retried for a moment first),
no answer in time, or an answer that is not the protocol.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from typing import Any

from ..errors import ControlError
from . import protocol
from .paths import default_path, warden_waits

__all__ = ["request", "resolve_path"]

BUSY_RETRY = 5.0  # seconds a full queue (EAGAIN on connect) is retried before giving up


def resolve_path(control: str | None, name: str) -> str:
    return control or os.environ.get("PORTSHARD_CONTROL") or default_path(name)


def _connect(path: str, timeout: float | None) -> socket.socket:
    deadline = time.monotonic() + min(BUSY_RETRY, timeout or BUSY_RETRY)
    pause = 0.005
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EAGAIN and time.monotonic() < deadline:
                time.sleep(pause)  # the supervisor's queue is full: it is busy, not gone
                pause = min(pause * 2, 0.1)
                continue
            raise ControlError(_connect_error(path, exc)) from None


def _connect_error(path: str, exc: OSError) -> str:
    where = "Give its --name or --control (or set PORTSHARD_CONTROL)"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return f"no supervisor at {path!r}: is 'portshard run' running? {where}"
    if exc.errno == errno.ECONNREFUSED and warden_waits(path):
        return (
            f"the supervisor of {path!r} is gone, but its warden keeps its workers serving: "
            f"run the same 'portshard run' (same --name or --control) to adopt them before "
            f"its --orphan-timeout stops them"
        )
    if exc.errno == errno.ECONNREFUSED:
        return (
            f"no supervisor listening at {path!r} (a stale socket, or not a socket); is "
            f"'portshard run' running? {where}"
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied on {path!r}: run as the supervisor's user or root"
    if exc.errno == errno.EAGAIN:
        return (
            f"the supervisor at {path!r} is busy (its control queue stayed full for "
            f"{BUSY_RETRY:g}s); try again"
        )
    if isinstance(exc, TimeoutError):
        return f"the supervisor at {path!r} did not accept the connection in time; try again"
    return f"cannot reach the supervisor at {path!r}: {exc.strerror or exc}; check the path"


def request(path: str, cmd: str, timeout: float | None = 30.0, **args: Any) -> dict[str, Any]:
    """Send one command; return its result, or raise ControlError with the supervisor's reason."""
    message = {"v": protocol.VERSION, "cmd": cmd, **args}
    sock = _connect(path, timeout)
    buf = b""
    try:
        sock.sendall(protocol.encode(message))
        while b"\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ControlError(
                    f"the supervisor at {path!r} closed the connection without a reply; see its log"
                )
            buf += chunk
    except TimeoutError:
        raise ControlError(
            f"the supervisor at {path!r} did not answer within {timeout:g}s; see its log"
        ) from None
    except OSError as exc:
        raise ControlError(
            f"lost the connection to the supervisor at {path!r}: {exc.strerror or exc}; see its log"
        ) from None
    finally:
        sock.close()
    try:
        reply = json.loads(buf.partition(b"\n")[0])
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise ControlError(f"{path!r} answered something that is not portshard's protocol")
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "unknown error")))
    result = reply.get("result", {})
    if not isinstance(result, dict):
        raise ControlError(f"{path!r} answered something that is not portshard's protocol")
    return result
