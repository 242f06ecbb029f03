"""Talk to a running supervisor over its control socket."""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from ..errors import ControlError
from . import protocol
from .server import default_path

__all__ = ["request", "resolve_path"]


def resolve_path(control: str | None, name: str) -> str:
    return control or os.environ.get("PORTSHARD_CONTROL") or default_path(name)


def request(path: str, cmd: str, timeout: float | None = 30.0, **args: Any) -> dict[str, Any]:
    """Send one command; return its result, or raise ControlError with the supervisor's reason."""
    message = {"v": protocol.VERSION, "cmd": cmd, **args}
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise ControlError(
                f"no supervisor at {path!r}: is 'portshard run' running? Give its --name or "
                f"--control (or set PORTSHARD_CONTROL)"
            ) from None
        except ConnectionRefusedError:
            raise ControlError(
                f"no supervisor listening at {path!r} (a stale socket file)"
            ) from None
        except PermissionError:
            raise ControlError(
                f"permission denied on {path!r}: run as the supervisor's user or root"
            ) from None
        sock.sendall(protocol.encode(message))
        buf = b""
        while b"\n" not in buf:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise ControlError(
                    f"the supervisor at {path!r} did not answer within {timeout}s"
                ) from None
            if not chunk:
                raise ControlError(
                    f"the supervisor at {path!r} closed the connection without a reply"
                )
            buf += chunk
    finally:
        sock.close()
    reply = json.loads(buf.partition(b"\n")[0])
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "unknown error")))
    result = reply.get("result", {})
    assert isinstance(result, dict)
    return result
