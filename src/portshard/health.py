"""Health for the load balancers in front of a host (issue 16). Pure, except the agent server.

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

`AgentServer` answers the agent check from a non-blocking listening socket inside the caller's
selector loop (accept, write the reply, close): no thread, no state between connections.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

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
    line. (An agent check that sends nothing needs a port of its own: `AgentServer`.)"""
    if not first_line.startswith(HTTP_METHODS):
        return agent_reply(snap).encode("ascii")
    parts = first_line.split()
    path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
    reply = healthz(snap) if path == b"/healthz" else NOT_FOUND
    if first_line.startswith(b"HEAD "):
        return reply.encode()[: len(reply.encode()) - len(reply.body)]
    return reply.encode()


class AgentServer:
    """HAProxy's agent check on a listening TCP socket, served from the caller's selector.

    Register ``fileno()`` for reading and call ``on_readable()`` when it is: every pending
    connection gets ``reply()`` (the current agent line) and is closed. HAProxy may send a
    string first (``agent-send``); what has arrived is read and dropped before the close, so
    the close is a FIN, not a reset that could lose the reply. The reply is a few bytes into an
    empty send buffer, so a non-blocking send writes it whole."""

    def __init__(self, sock: socket.socket, reply: Callable[[], str]) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.reply = reply
        self.answered = 0

    @classmethod
    def listen(cls, host: str, port: int, reply: Callable[[], str]) -> AgentServer:
        """A new listening socket on host:port (port 0 picks a free one)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        return cls(sock, reply)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    def fileno(self) -> int:
        return self.sock.fileno()

    def on_readable(self) -> None:
        """Answer every connection waiting in the accept queue."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ECONNABORTED and the like: that client is gone
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    log.warning("health agent: cannot accept: %s", exc)
                    return
                continue
            self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.setblocking(False)
            with contextlib.suppress(OSError):
                conn.send(self.reply().encode("ascii"))
                self.answered += 1
                with contextlib.suppress(BlockingIOError):
                    while conn.recv(4096):
                        pass
                conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()
