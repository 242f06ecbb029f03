"""Where a supervisor's control socket lives (shared by the server and the client)."""

from __future__ import annotations

import hashlib
import os

__all__ = ["default_path", "warden_address", "warden_waits"]


def default_path(name: str) -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if os.geteuid() == 0 or not runtime:
        base = "/run/portshard" if os.geteuid() == 0 else f"/tmp/portshard-{os.geteuid()}"
    else:
        base = os.path.join(runtime, "portshard")
    return os.path.join(base, f"{name}.sock")


def warden_address(control_path: str) -> bytes:
    """The warden's abstract address, by the supervisor's control socket: one per supervisor
    identity (two supervisors may share a --name with different --control paths)."""
    digest = hashlib.sha256(os.path.abspath(control_path).encode()).hexdigest()[:24]
    return b"\0portshard/warden/" + digest.encode()


def warden_waits(control_path: str) -> bool:
    """A warden (supervisor/warden.py) is bound for ``control_path``: its supervisor is gone
    (or never answered) and it keeps the workers for the next one. Read from /proc/net/unix,
    not by connecting: a connection to the warden is an adoption attempt."""
    name = "@" + warden_address(control_path)[1:].decode()
    try:
        with open("/proc/net/unix") as f:
            return any(line.split()[-1] == name for line in f if len(line.split()) >= 8)
    except OSError:
        return False
