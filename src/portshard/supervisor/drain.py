"""A host drain (``portshard drain``, issue 16): what was asked, and the reply its waiters get.

The moves are the supervisor machine's (state.py: RUNNING --drain--> DRAINING --settled-->
STOPPING, a deadline kills); the procedure that waits out the settle time is
``procedures.drain_host``; this module holds the request's data, checked once at the edge.

Why a settle time: a balancer notices a drain only at its next check (HAProxy's agent-inter,
a Kubernetes readiness probe's period plus the endpoints controller and every kube-proxy), and
until then it keeps sending new connections. They are served: the sockets keep accepting for
the settle time, then the ordinary stop begins (new SYNs dropped, what the kernel accepted is
served, workers retired as in a reload).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..control import protocol
from ..errors import ControlError

if TYPE_CHECKING:
    from ..control.server import Connection

__all__ = ["DEFAULT_SETTLE", "MAX_SECONDS", "Drain", "DrainRequest", "parse_request"]

DEFAULT_SETTLE = 5.0  # s: a readiness probe every 2 s with failureThreshold 1, or an agent-inter
# of 1-2 s, has noticed by then (examples/k8s, examples/haproxy)
MAX_SECONDS = 24 * 3600.0


@dataclass(frozen=True)
class DrainRequest:
    settle: float = DEFAULT_SETTLE  # s the sockets keep accepting after health says draining
    deadline: float | None = None  # s from the request to kill what is left (None: no bound)
    wait: bool = False  # the reply comes when the supervisor has stopped

    def describe(self) -> str:
        deadline = f", deadline {self.deadline:g}s" if self.deadline is not None else ""
        return (
            f"draining: health says so now; new connections are taken for {self.settle:g}s "
            f"more{deadline}"
        )


def _seconds(request: dict[str, Any], key: str, *, low: float) -> float | None:
    value = request.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ControlError(f"drain: {key} must be a number of seconds, not {value!r}")
    if not low <= value <= MAX_SECONDS or value != value:
        raise ControlError(
            f"drain: {key} {value!r} is out of range; give {low:g} to {MAX_SECONDS:g} seconds"
        )
    return float(value)


def parse_request(request: dict[str, Any]) -> DrainRequest:
    """The control request's arguments, checked (ControlError names the bad one and the fix)."""
    settle = _seconds(request, "settle", low=0.0)
    deadline = _seconds(request, "deadline", low=0.1)
    settle = DEFAULT_SETTLE if settle is None else settle
    if deadline is not None and settle > deadline:
        if request.get("settle") is not None:
            raise ControlError(
                f"drain: --settle {settle:g} is longer than --deadline {deadline:g}: the deadline "
                f"would kill the workers before they stop taking connections; raise the deadline "
                f"or shorten the settle time"
            )
        settle = deadline / 2  # a short deadline and the default settle: share it
    return DrainRequest(settle, deadline, bool(request.get("wait")))


@dataclass
class Drain:
    """A drain under way: its settle time, its deadline (the earliest asked) and who waits."""

    settle: float
    started: float
    deadline_at: float | None = None
    error: str = ""  # set when the deadline passed (the supervisor then exits 1)
    waiters: list[Connection] = field(default_factory=list)

    def join(self, req: DrainRequest, now: float, waiter: Connection | None) -> None:
        if req.deadline is not None:
            at = now + req.deadline
            self.deadline_at = at if self.deadline_at is None else min(self.deadline_at, at)
        if waiter is not None:
            self.waiters.append(waiter)

    def export(self, now: float) -> dict[str, float | None]:
        """What is left of it, for the manifest: an adopter carries on from there."""
        left = None if self.deadline_at is None else round(max(0.0, self.deadline_at - now), 3)
        return {"settle": round(max(0.0, self.started + self.settle - now), 3), "deadline": left}

    def expired(self, live: int) -> str:
        """The deadline passed with ``live`` workers running: the error, recorded."""
        self.error = (
            f"drain: the deadline passed with {live} worker(s) still running; killed them "
            f"(connections they held are lost); give a longer --deadline or a shorter --grace"
        )
        return self.error

    def reply(self, now: float, fatal: str | None) -> bytes:
        """What the waiters hear once every worker has exited."""
        if self.error:
            return protocol.reply_error(self.error)
        if fatal:
            return protocol.reply_error(f"the supervisor stopped with an error: {fatal}")
        return protocol.reply_ok({"drained": True, "seconds": round(now - self.started, 3)})
