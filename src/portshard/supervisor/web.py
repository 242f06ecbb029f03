"""Metrics (Prometheus text format) and the live dashboard, served from the supervisor's loop.

A tiny non-blocking HTTP/1.0 server driven by the supervisor's selector: no thread (the
supervisor forks workers, and a thread in a forking process is a deadlock waiting to happen;
prometheus_client's own server runs in a thread, so only its exposition format is used).
Routes: /metrics, / (dashboard), /api/status (status + history, ``?since=T``).
"""

from __future__ import annotations

import json
import logging
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..address import parse
from ..errors import ConfigError, SupervisorError
from .state import SHOWN_STATES
from .status import Status

log = logging.getLogger("portshard.supervisor")

__all__ = ["WebServer", "metrics_registry", "parse_metrics_address"]

MAX_REQUEST = 16 * 1024
IDLE_TIMEOUT = 10.0

Response = tuple[int, str, bytes]


def parse_metrics_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT``; no host means 127.0.0.1 (loopback by default)."""
    try:
        addr = parse(f"tcp://{text}" if "://" not in text else text)
    except ConfigError as exc:
        raise ConfigError(f"--metrics {text!r}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"--metrics {text!r}: {exc}; e.g. --metrics 127.0.0.1:9100") from None
    return (addr.host or "127.0.0.1", addr.port)


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


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.out = b""
        self.opened = time.monotonic()


class WebServer:
    def __init__(
        self,
        address: tuple[str, int],
        selector: selectors.BaseSelector,
        status: Callable[[], Status],
        history: Callable[[float], dict[str, Any]],
    ) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self._generate = generate_latest
        self._content_type = CONTENT_TYPE_LATEST
        self.registry = metrics_registry(status)
        self.status = status
        self.history = history
        self.selector = selector
        self.conns: dict[int, _Conn] = {}
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(address)
            self.sock.listen(64)
        except OSError as exc:
            self.sock.close()
            raise SupervisorError(
                f"--metrics: cannot listen on {address[0]}:{address[1]}: {exc.strerror}; "
                f"pick a free port (0 = any)"
            ) from None
        self.sock.setblocking(False)
        selector.register(self.sock, selectors.EVENT_READ, self._on_accept)
        self._page = resources.files("portshard").joinpath("dashboard.html").read_bytes()

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}"

    def _on_accept(self, _mask: int) -> None:
        try:
            sock, _ = self.sock.accept()
        except OSError:
            return
        sock.setblocking(False)
        conn = _Conn(sock)
        self.conns[sock.fileno()] = conn
        self.selector.register(sock, selectors.EVENT_READ, lambda m: self._on_event(conn, m))

    def _on_event(self, conn: _Conn, mask: int) -> None:
        if mask & selectors.EVENT_READ and not conn.out:
            try:
                data = conn.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._close(conn)
                return
            conn.buf += data
            if b"\r\n\r\n" not in conn.buf and b"\n\n" not in conn.buf:
                if len(conn.buf) > MAX_REQUEST:
                    self._respond(conn, (431, "text/plain", b"request too large\n"))
                return
            try:
                self._respond(conn, self._route(conn.buf))
            except Exception:  # a bug here must not take the supervisor down
                log.exception("metrics: internal error")
                self._respond(conn, (500, "text/plain", b"internal error\n"))
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)

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

    def _respond(self, conn: _Conn, response: Response) -> None:
        code, ctype, body = response
        reason = {
            200: "OK",
            400: "Bad Request",
            404: "Not Found",
            405: "Method Not Allowed",
            431: "Request Header Fields Too Large",
            500: "Internal Server Error",
        }[code]
        head = (
            f"HTTP/1.0 {code} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
            f"Connection: close\r\n\r\n"
        )
        conn.out = head.encode() + body
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        try:
            while conn.out:
                conn.out = conn.out[conn.sock.send(conn.out) :]
        except BlockingIOError:
            self.selector.modify(
                conn.sock, selectors.EVENT_WRITE, lambda m: self._on_event(conn, m)
            )
            return
        except OSError:
            pass
        self._close(conn)

    def _close(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if fd >= 0:
            self.selector.unregister(conn.sock)
            self.conns.pop(fd, None)
            conn.sock.close()

    def expire(self, now: float) -> None:
        for conn in list(self.conns.values()):
            if now - conn.opened > IDLE_TIMEOUT:
                self._close(conn)

    def close(self) -> None:
        for conn in list(self.conns.values()):
            self._close(conn)
        self.selector.unregister(self.sock)
        self.sock.close()
