"""Metrics (Prometheus text format) and the live dashboard, served from the supervisor's loop.

A tiny non-blocking HTTP/1.0 server driven by the supervisor's selector: no thread (the
supervisor forks workers, and a thread in a forking process is a deadlock waiting to happen;
prometheus_client's own server runs in a thread, so only its exposition format is used).
Routes: /metrics, / (dashboard), /api/status (status + history, ``?since=T``).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import selectors
import socket
from collections.abc import Callable, Iterator
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..address import parse
from ..endpoint import Limits, Peer, StreamServer, http_url, listen_tcp
from ..errors import ConfigError
from .state import SHOWN_STATES
from .status import Status, totals

log = logging.getLogger("portshard.supervisor")

__all__ = ["WebServer", "metrics_registry", "parse_metrics_address"]

MAX_REQUEST = 16 * 1024
IDLE_TIMEOUT = 10.0

Response = tuple[int, str, bytes]


def parse_metrics_address(text: str, option: str = "--metrics") -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT``; no host means 127.0.0.1 (loopback by default).
    (``--health`` takes the same form.)"""
    try:
        addr = parse(f"tcp://{text}" if "://" not in text else text)
    except ConfigError as exc:
        raise ConfigError(f"{option} {text!r}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{option} {text!r}: {exc}; e.g. {option} 127.0.0.1:9100") from None
    return (addr.host or "127.0.0.1", addr.port)


def require_exposition() -> None:
    """--metrics needs prometheus_client (the `metrics` extra): said before anything opens.
    Without it, `portshard run --metrics` raised ModuleNotFoundError with a traceback once its
    sockets and steering were set up."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--metrics needs the prometheus_client package, which is not installed: "
            "pip install 'portshard[metrics]', or run without --metrics"
        ) from None


def metrics_registry(snapshot: Callable[[], Status]) -> Any:
    """A prometheus_client registry whose one collector reads the supervisor's status."""
    try:
        from prometheus_client.core import (
            CollectorRegistry,
            CounterMetricFamily,
            GaugeMetricFamily,
        )
    except ImportError:
        raise ConfigError(
            "--metrics needs the prometheus_client package: pip install 'portshard[metrics]'"
        ) from None

    class Collector:
        def collect(self) -> Iterator[Any]:
            yield from _families(snapshot(), GaugeMetricFamily, CounterMetricFamily)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    return registry


LIMITS = Limits(max_conns=32, idle=IDLE_TIMEOUT, max_request=MAX_REQUEST, backlog=64)

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    421: "Misdirected Request",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _families(st: Status, gauge: Any, counter: Any) -> Iterator[Any]:
    """The metric families of one status snapshot (prometheus_client's classes passed in)."""
    state = gauge(
        "portshard_slot_state", "1 for the state each slot's worker is in", labels=["slot", "state"]
    )
    restarts = counter(
        "portshard_slot_restarts", "Unexpected worker exits respawned", labels=["slot"]
    )
    queued = gauge(
        "portshard_slot_accept_queue",
        "Connections waiting in the slot's accept queue",
        labels=["slot", "listen"],
    )
    backlog = gauge(
        "portshard_slot_backlog", "The accept queue's limit (backlog)", labels=["slot", "listen"]
    )
    conns = gauge(
        "portshard_slot_connections", "Client connections the worker holds", labels=["slot"]
    )
    handed = counter(
        "portshard_slot_new_connections",
        "New TCP connections the kernel handed to the slot (counted by the eBPF "
        "steering program; absent under classic BPF or with steering off)",
        labels=["slot"],
    )
    failures = gauge(
        "portshard_slot_failures",
        "Quick failures of the slot's program in a row (it backs off; 0 when healthy)",
        labels=["slot"],
    )
    for slot in st.slots:
        label = str(slot.slot)
        failures.add_metric([label], float(slot.failures))
        if slot.new_total is not None:
            handed.add_metric([label], float(slot.new_total))
        for shown in SHOWN_STATES:
            state.add_metric([label, shown.value], 1.0 if slot.state is shown else 0.0)
        restarts.add_metric([label], float(slot.restarts))
        for listen, q in (slot.queue or {}).items():
            queued.add_metric([label, listen], float(q.queued))
            backlog.add_metric([label, listen], float(q.backlog))
        if slot.connections is not None:
            conns.add_metric([label], float(slot.connections))
    yield from (state, restarts, failures, queued, backlog, conns, handed)
    yield from _totals(st, gauge, counter)


def _totals(st: Status, gauge: Any, counter: Any) -> Iterator[Any]:
    """The supervisor-wide families."""
    t = totals(st.slots)
    slots = gauge(
        "portshard_slots",
        "Slots in each state (sums portshard_slot_state: one series per state, whatever the "
        "worker count)",
        labels=["state"],
    )
    for shown in SHOWN_STATES:
        slots.add_metric([shown.value], float(t.by_state.get(shown.value, 0)))
    yield slots
    yield gauge("portshard_workers_ready", "Slots whose worker is ready", value=t.ready)
    yield gauge("portshard_connections", "Client connections all workers hold", value=t.connections)
    yield gauge(
        "portshard_accept_queue", "Connections waiting in every accept queue", value=t.queued
    )
    yield gauge(
        "portshard_slots_excluded",
        "Slots steering keeps new connections away from",
        value=t.excluded,
    )
    reloads = counter("portshard_reloads", "Rolling reloads by result", labels=["result"])
    reloads.add_metric(["ok"], float(st.reloads_ok))
    reloads.add_metric(["failed"], float(st.reloads_failed))
    yield reloads
    yield gauge("portshard_workers", "Worker slots", value=st.workers)
    yield gauge("portshard_generation", "Generation of the newest reload", value=st.generation)
    yield counter(
        "portshard_steering_changes",
        "Changes of which slots get new connections",
        value=float(st.steering_changes),
    )
    drops = st.kernel or {}
    yield counter(
        "portshard_kernel_listen_overflows",
        "SYNs dropped because an accept queue was full (TcpExt ListenOverflows)",
        value=float(drops.get("ListenOverflows", 0)),
    )
    yield counter(
        "portshard_kernel_listen_drops",
        "SYNs dropped at a listener for any reason (TcpExt ListenDrops)",
        value=float(drops.get("ListenDrops", 0)),
    )


def _head(code: int, ctype: str, length: int) -> bytes:
    return (
        f"HTTP/1.0 {code} {_REASONS[code]}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {length}\r\nCache-Control: no-store\r\n"
        f"Connection: close\r\n\r\n"
    ).encode()


def host_of(request: bytes) -> str | None:
    """The Host header's host (no port, lower case), or None if there is none."""
    for line in request.split(b"\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"host":
            host = value.strip().decode("latin-1").lower()
            if host.startswith("["):
                return host[1:].partition("]")[0]
            if host.count(":") == 1:
                host = host.partition(":")[0]
            return host.rstrip(".")
    return None


def host_allowed(host: str | None, bound: str) -> bool:
    """The endpoint serves a dashboard and /api/status to browsers, so a web page elsewhere
    must not read them through DNS rebinding (its name re-pointed at 127.0.0.1): the Host must
    be a loopback name or address, this machine's name, or the address the endpoint is bound to
    (any address literal when bound to every address: an address is never re-pointed). No DNS
    lookup here: this runs in the supervisor's one thread."""
    if host is None:
        return True  # HTTP/1.0 without Host: not a browser (browsers always send one)
    if host == "localhost" or host.endswith(".localhost"):
        return True  # RFC 6761: resolved to loopback by the resolver, never by DNS
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host == socket.gethostname().lower()
    listening = ipaddress.ip_address(bound)
    return ip.is_loopback or ip == listening or listening.is_unspecified


class WebServer(StreamServer):
    name = "metrics"
    busy_reply = _head(503, "text/plain", 5) + b"busy\n"

    def __init__(
        self,
        address: tuple[str, int],
        selector: selectors.BaseSelector,
        status: Callable[[], Status],
        history: Callable[[float], dict[str, Any]],
        *,
        limits: Limits = LIMITS,
        inherited: socket.socket | None = None,
    ) -> None:
        """``inherited``: the listener a predecessor had (issue 15: an upgrade, an adoption)."""
        require_exposition()
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self._generate = generate_latest
        self._content_type = CONTENT_TYPE_LATEST
        self.registry = metrics_registry(status)
        self.status = status
        self.history = history
        sock = inherited or listen_tcp(address, limits.backlog, "--metrics")
        self._page = resources.files("portshard").joinpath("dashboard.html").read_bytes()
        super().__init__(sock, selector, limits)

    @property
    def conns(self) -> dict[int, Peer]:
        return self.peers

    @property
    def url(self) -> str:
        return http_url(self.sock)

    def on_data(self, peer: Peer) -> None:
        if b"\r\n\r\n" not in peer.buf and b"\n\n" not in peer.buf:
            if len(peer.buf) > self.limits.max_request:
                self._respond(peer, (431, "text/plain", b"request too large\n"))
            return
        try:
            self._respond(peer, self._checked_route(peer.buf))
        except Exception:  # a bug here must not take the supervisor down
            log.exception("metrics: internal error")
            self._respond(peer, (500, "text/plain", b"internal error\n"))

    def _checked_route(self, request: bytes) -> Response:
        host = host_of(request)
        if not host_allowed(host, self.sock.getsockname()[0]):
            body = (
                f"Host {host!r} is not this endpoint's name: use {self.url}/ (or localhost). "
                f"The dashboard answers only loopback names, this machine's name and its own "
                f"address, so that no web page can read it by DNS rebinding.\n"
            )
            return 421, "text/plain", body.encode()
        return self._route(request)

    def _route(self, request: bytes) -> Response:
        line = request.split(b"\n", 1)[0].decode("latin-1").split()
        if len(line) < 2 or line[0] not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET\n"
        url = urlsplit(line[1])
        if url.path == "/metrics":
            return 200, self._content_type, self._generate(self.registry)
        if url.path in ("/", "/index.html"):
            return 200, "text/html; charset=utf-8", self._page
        if url.path == "/api/status":
            since = parse_qs(url.query).get("since", ["0"])[0]
            try:
                since_t = float(since)
            except ValueError:
                return 400, "text/plain", f"since={since!r} is not a number\n".encode()
            body = {"status": self.status().to_json(), "history": self.history(since_t)}
            return 200, "application/json", json.dumps(body).encode()
        return 404, "text/plain", b"not found: try /, /metrics or /api/status\n"

    def _respond(self, peer: Peer, response: Response) -> None:
        code, ctype, body = response
        self.send(peer, _head(code, ctype, len(body)) + body)

    def close(self, peer: Peer | None = None) -> None:
        """close(): stop the endpoint (the supervisor's call); close(peer): one connection."""
        if peer is None:
            self.close_all()
        else:
            super().close(peer)
