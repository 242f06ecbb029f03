"""How often the supervisor may count held connections one by one.

Where eBPF steering runs, the kernel counts each slot's connections in flight
(:meth:`portshard.steering.controller.Steering.in_flight`: one memory read per slot, whatever
the connections). Elsewhere (classic BPF, steering off, no SOCK_OPS attach point) the only
count is per connection: each worker's fd table (/proc/PID/fd) and a socket-table dump
(sock_diag), which cost the supervisor 0.7% of a core at 0 held connections and 13.8% at 10k.
So that walk runs less often as it grows: the next one is due after ``1 / BUDGET`` times what
the last one took (so walks use at most ``BUDGET`` of a core), at least a second apart and at
most ``LONGEST``; in between, ``status``, ``/metrics`` and the history show the figures of the
last walk.
"""

from __future__ import annotations

__all__ = ["BUDGET", "LONGEST", "HeldWalk"]

BUDGET = 0.005  # of a core: a walk that took 50 ms is next due in 10 s
LONGEST = 60.0  # seconds between walks, at most


class HeldWalk:
    """When the next per-connection walk is due, and its last result (pid -> held)."""

    def __init__(self) -> None:
        self.next = 0.0
        self.at: float | None = None  # when the last walk ran
        self.counts: dict[int, int] = {}

    @staticmethod
    def interval(took: float) -> float:
        return min(LONGEST, max(1.0, took / BUDGET))

    def due(self, now: float) -> bool:
        return now >= self.next

    def done(self, now: float, counts: dict[int, int], took: float) -> None:
        """A walk that started at ``now`` and took ``took`` seconds found ``counts``."""
        self.counts = counts
        self.at = now
        # 0.05 s early: the supervisor samples once a second, so 1.0 must not become 2.
        self.next = now + self.interval(took) - 0.05
