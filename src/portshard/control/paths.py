"""Where a supervisor's control socket lives (shared by the server and the client)."""

from __future__ import annotations

import os

__all__ = ["default_path"]


def default_path(name: str) -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if os.geteuid() == 0 or not runtime:
        base = "/run/portshard" if os.geteuid() == 0 else f"/tmp/portshard-{os.geteuid()}"
    else:
        base = os.path.join(runtime, "portshard")
    return os.path.join(base, f"{name}.sock")
