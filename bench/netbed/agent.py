"""Stand-in for ``portshard run --health`` (issue 16) until it exists: one per host.

Answers HAProxy's agent check on ``--listen`` from the supervisor's status (read over its
control socket every 0.2 s) with `portshard.health`: ``ready N%`` from the slots ready,
``drain`` while the file ``--drain-file`` exists (it stands in for ``portshard drain``),
``maint`` while the supervisor is stopping or not there. When ``--health`` lands, the
supervisor serves the same replies itself and this process goes.

    python -m bench.netbed.agent --control /run/x.sock --listen 10.77.1.2:9777 --drain-file F
"""

from __future__ import annotations

import argparse
import selectors
import signal
import sys
import time
from pathlib import Path
from typing import Any

from portshard.control.client import request
from portshard.errors import ControlError
from portshard.health import AgentServer, HostState, Snapshot, agent_reply

POLL = 0.2


def snapshot(status: dict[str, Any] | None, draining: bool) -> Snapshot:
    """The health the supervisor would report, from its status (None: it is not there)."""
    if status is None:
        return Snapshot(HostState.STOPPING, 0, 0)
    slots = len(status["slots"])
    ready = sum(1 for s in status["slots"] if s["state"] == "ready")
    if status["stopping"]:
        state = HostState.STOPPING
    elif draining:
        state = HostState.DRAINING
    else:
        state = HostState.SERVING
    return Snapshot(state, min(ready, slots), slots)


def read_status(control: str) -> dict[str, Any] | None:
    try:
        return request(control, "status", timeout=1.0)
    except (ControlError, OSError, ValueError):
        return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--control", required=True)
    p.add_argument("--listen", required=True, help="HOST:PORT")
    p.add_argument("--drain-file", type=Path, required=True)
    a = p.parse_args()
    host, _, port = a.listen.rpartition(":")
    current = [snapshot(None, False)]
    server = AgentServer.listen(host, int(port), lambda: agent_reply(current[0]))
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    print(f"agent {server.address[0]}:{server.address[1]}", flush=True)
    with selectors.DefaultSelector() as sel:
        sel.register(server.fileno(), selectors.EVENT_READ)
        next_poll = 0.0
        while not stop[0]:
            now = time.monotonic()
            if now >= next_poll:
                current[0] = snapshot(read_status(a.control), a.drain_file.exists())
                next_poll = now + POLL
            if sel.select(max(0.0, next_poll - time.monotonic())):
                server.on_readable()
    server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
