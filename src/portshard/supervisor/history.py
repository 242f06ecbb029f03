"""What the supervisor saw over the last minutes: per-slot samples and events.

Sampled once a second from the loop (one sock_diag dump for all workers, plus each worker's
fd table), kept for ten minutes, served to the dashboard and used for the CONNS column.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Event", "History", "Sample", "listen_drop_counters"]

KEEP_SECONDS = 600


@dataclass(frozen=True)
class Sample:
    t: float  # wall clock, for the browser
    slots: tuple[dict[str, Any], ...]  # slot, pid, state, queued, connections


@dataclass(frozen=True)
class Event:
    t: float
    kind: str  # boot | reload | reload_failed | scale | crash | stop
    text: str


@dataclass
class History:
    samples: collections.deque[Sample] = field(
        default_factory=lambda: collections.deque(maxlen=KEEP_SECONDS)
    )
    events: collections.deque[Event] = field(default_factory=lambda: collections.deque(maxlen=500))
    steering_changes: int = 0

    def add(self, slots: list[dict[str, Any]]) -> None:
        self.samples.append(Sample(time.time(), tuple(slots)))

    def event(self, kind: str, text: str) -> None:
        self.events.append(Event(time.time(), kind, text))

    def to_json(self, since: float = 0.0) -> dict[str, Any]:
        return {
            "samples": [{"t": s.t, "slots": list(s.slots)} for s in self.samples if s.t > since],
            "events": [
                {"t": e.t, "kind": e.kind, "text": e.text} for e in self.events if e.t > since
            ],
        }


def listen_drop_counters() -> dict[str, int]:
    """The kernel's ListenOverflows and ListenDrops (this network namespace) from
    /proc/net/netstat: SYNs dropped because an accept queue was full."""
    wanted = ("ListenOverflows", "ListenDrops")
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    for header, values in zip(lines[::2], lines[1::2], strict=False):
        if header.startswith("TcpExt:"):
            table = dict(zip(header.split()[1:], values.split()[1:], strict=False))
            return {k: int(table[k]) for k in wanted if k in table}
    return {}
