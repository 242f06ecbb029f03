"""Health for the load balancers in front of a host (issue 16). Pure, except its server.

A balancer in front of many hosts (a Kubernetes Service, HAProxy, IPVS) needs to know, per
host, whether to send it new connections and how many. The supervisor knows; this module says
it in the two forms balancers read, from one small typed snapshot:

- HTTP ``/healthz`` (Kubernetes readiness probes, kube-proxy's ``healthCheckNodePort``, cloud
  balancers): 200 while serving with at least one slot ready, 503 while draining, stopping or
  with no slot ready, and a small JSON body (state, ready slots, slots, capacity).
- HAProxy's agent check (``agent-check agent-port P``): HAProxy connects, reads one line
  terminated by ``\\n`` and closes. Its words (configuration.txt, "agent-check"): a percentage
  sets the weight relative to the server's configured weight; ``ready``/``drain``/``maint`` set
  the administrative state; ``up``/``down`` the operational one; unknown words are ignored.
  We answer ``ready N%`` while serving (N: the share of slots ready, so a host with half its
  workers restarting gets half the traffic; 0% while none is, which HAProxy treats as drained),
  ``drain`` while draining (no new connections, the held ones finish) and ``maint`` while
  stopping. We never say ``up`` or ``down``: the operational state belongs to HAProxy's own
  ``check`` of the service port (an agent saying ``up`` kept dead servers up in HAProxy
  2.2.0-2.2.10, haproxy/haproxy#1176). Only an agent can revert what it set, so every serving
  reply carries ``ready``: a host that comes back after ``drain`` or ``maint`` is ready again
  at the next check (HAProxy keeps running agent checks in maintenance).

`HealthServer` serves both on one TCP port (``portshard run --health``) from the supervisor's
selector, on ``endpoint.StreamServer``: no thread, no state between connections.
"""

from __future__ import annotations

import enum
import json
import logging
import selectors
import socket
from collections.abc import Callable
from dataclasses import dataclass

from .endpoint import Limits, Peer, StreamServer, http_url, listen_tcp

log = logging.getLogger(__name__)


class HostState(enum.Enum):
    """What the host as a whole is doing, as balancers need to know it."""

    SERVING = "serving"  # takes new connections
    DRAINING = "draining"  # still accepts (settle time) but wants no new ones
    STOPPING = "stopping"  # closing its sockets: new connections would fail


@dataclass(frozen=True)
class Snapshot:
    """The host's health at one moment: its state and how many of its slots can serve."""

    state: HostState
    ready: int  # slots whose worker is ready
    slots: int  # slots configured (-w)

    def __post_init__(self) -> None:
        if self.slots < 0 or not 0 <= self.ready <= max(self.slots, 0):
            raise ValueError(f"health: {self.ready} ready of {self.slots} slots is not possible")

    @property
    def capacity(self) -> float:
        """The share of the host's slots ready to serve, 0.0 to 1.0."""
        return self.ready / self.slots if self.slots else 0.0

    @property
    def healthy(self) -> bool:
        """Whether a balancer should send new connections here at all."""
        return self.state is HostState.SERVING and self.ready > 0


@dataclass(frozen=True)
class HttpReply:
    status: int
    reason: str
    body: bytes

    def encode(self) -> bytes:
        """The whole HTTP/1.1 response; the connection closes after it."""
        head = (
            f"HTTP/1.1 {self.status} {self.reason}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(self.body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n\r\n"
        )
        return head.encode("ascii") + self.body


def healthz(snap: Snapshot) -> HttpReply:
    """The /healthz answer: 200 while serving with a slot ready, else 503 (body says why)."""
    body = {
        "state": snap.state.value,
        "ready": snap.ready,
        "slots": snap.slots,
        "capacity": round(snap.capacity, 3),
    }
    data = (json.dumps(body, separators=(",", ":")) + "\n").encode("ascii")
    if snap.healthy:
        return HttpReply(200, "OK", data)
    return HttpReply(503, "Service Unavailable", data)


def weight_percent(snap: Snapshot) -> int:
    """The agent-check weight: the share of slots ready, in whole percent; at least 1% while
    any slot is ready (0% would take the host out), 0% when none is."""
    if snap.ready == 0 or snap.slots == 0:
        return 0
    return max(1, snap.ready * 100 // snap.slots)


def agent_reply(snap: Snapshot) -> str:
    """HAProxy's agent-check line for this snapshot (see the module docstring)."""
    if snap.state is HostState.DRAINING:
        return "drain\n"
    if snap.state is HostState.STOPPING:
        return "maint\n"
    return f"ready {weight_percent(snap)}%\n"


HTTP_METHODS = (b"GET ", b"HEAD ")
NOT_FOUND = HttpReply(404, "Not Found", b'{"error":"not found: try /healthz"}\n')


def respond(first_line: bytes, snap: Snapshot) -> bytes:
    """One ``--health`` port for both: an HTTP request line gets the /healthz reply (404 for
    another path); anything else, such as HAProxy's ``agent-send "agent\\n"``, gets the agent
    line (an agent check that sends nothing: `HealthServer` answers it after its idle time)."""
    if not first_line.startswith(HTTP_METHODS):
        return agent_reply(snap).encode("ascii")
    parts = first_line.split()
    path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
    reply = healthz(snap) if path == b"/healthz" else NOT_FOUND
    if first_line.startswith(b"HEAD "):
        return reply.encode()[: len(reply.encode()) - len(reply.body)]
    return reply.encode()


# A probe sends its request at once; this is also how long a silent agent check waits for its
# line (HAProxy without agent-send) and how long a stalled peer may hold a connection.
LIMITS = Limits(max_conns=64, idle=2.0, max_request=8 * 1024, backlog=128)


class HealthServer(StreamServer):
    """``--health``: /healthz and the agent check on one TCP port, in the caller's selector.

    Built on ``endpoint.StreamServer`` (its connection cap, idle timeout and descriptor
    reserve), so a flood of probes cannot hurt the supervisor. An HTTP request is answered
    once its header is complete (answering earlier and closing with unread bytes would reset
    the connection, which can lose the answer); any other first line (HAProxy's
    ``agent-send "agent\\n"``) gets the agent line at once; a peer that sends nothing gets the
    agent line when its idle time ends (an agent check without agent-send)."""

    name = "health"
    busy_reply = HttpReply(503, "Service Unavailable", b'{"error":"busy"}\n').encode()

    def __init__(
        self,
        address: tuple[str, int],
        selector: selectors.BaseSelector,
        snapshot: Callable[[], Snapshot],
        *,
        limits: Limits = LIMITS,
        inherited: socket.socket | None = None,
    ) -> None:
        """``inherited``: the listener a predecessor had (issue 15: an upgrade, an adoption)."""
        self.snapshot = snapshot
        sock = inherited or listen_tcp(address, limits.backlog, "--health")
        super().__init__(sock, selector, limits)

    @property
    def url(self) -> str:
        return http_url(self.sock)

    def on_data(self, peer: Peer) -> None:
        line, newline, _ = peer.buf.partition(b"\n")
        if line.startswith(HTTP_METHODS):
            if b"\r\n\r\n" not in peer.buf and b"\n\n" not in peer.buf:
                if len(peer.buf) > self.limits.max_request:
                    self.send(
                        peer, HttpReply(431, "Request Header Fields Too Large", b"{}\n").encode()
                    )
                return
        elif not newline:
            if len(peer.buf) > self.limits.max_request:
                self.close(peer)
            return
        self._answer(peer, line)

    def on_expire(self, peer: Peer) -> None:
        if peer.buf:
            self.close(peer)  # half a request: not worth an answer
        else:
            self._answer(peer, b"")  # an agent check that sends nothing

    def _answer(self, peer: Peer, line: bytes) -> None:
        try:
            self.send(peer, respond(line.rstrip(b"\r"), self.snapshot()))
        except Exception:  # a bug here must not take the supervisor down
            log.exception("health: internal error")
            self.send(peer, HttpReply(500, "Internal Server Error", b"{}\n").encode())
