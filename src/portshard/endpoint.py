"""A small stream server inside someone else's selector: the plumbing of the control socket
(control/server.py) and the web endpoint (supervisor/web.py), written once.

It accepts, buffers what a peer sends, hands it to ``on_data`` (the subclass decides when a
request is complete and what to answer), writes the answer without blocking, and closes.
The supervisor runs it in its one thread, next to every worker's socket, so no peer may hurt
the service; the limits are part of the design:

- at most ``max_conns`` peers; at the cap it stops accepting until one leaves, and the rest
  wait in the kernel's queue (``backlog``), which costs the supervisor no descriptor;
- a peer that has not had its answer within ``idle`` seconds is dropped (``on_expire``), unless
  its answer is deliberately deferred (``Peer.waiting``: ``reload --wait``);
- a reserve of descriptors: a connection that lands within ``fd_reserve`` of RLIMIT_NOFILE
  takes the place of a peer silent for ``evict_after``, else it is shed at once (with a short
  "busy" answer if it fits in the socket buffer), so the supervisor keeps the descriptors it
  needs to sample, spawn and steer;
- at EMFILE/ENFILE (the process or the system is out of descriptors anyway): the newest peer
  that has not sent a complete request is shed, and accepting pauses for ``pause`` seconds (the
  listener would otherwise be readable forever, a busy loop).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import resource
import selectors
import socket
import time
from dataclasses import dataclass

from .errors import SupervisorError

log = logging.getLogger(__name__)

__all__ = ["Limits", "Peer", "StreamServer", "http_url", "listen_tcp"]

_OUT_OF_FDS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass(frozen=True)
class Limits:
    max_conns: int = 64  # peers at once; more wait in the kernel's queue
    idle: float = 10.0  # seconds a peer has to get its answer (unless the answer is deferred)
    max_request: int = 64 * 1024  # bytes buffered for one request
    fd_reserve: int = 64  # descriptors below RLIMIT_NOFILE that peers may never take
    pause: float = 0.5  # seconds accepting stops after EMFILE/ENFILE or a shed
    accept_batch: int = 32  # connections accepted per readiness event (others wait their turn)
    backlog: int = 512  # the listen queue (the kernel clamps it to net.core.somaxconn)
    evict_after: float = 0.5  # at the cap, a peer silent this long gives way to a new one


class Peer:
    """One accepted connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.buf = b""
        self.out = b""
        self.opened = time.monotonic()
        self.closing = False  # close once ``out`` is written
        self.waiting = False  # the answer is deferred (reload --wait): no idle timeout
        self.answered = False  # an answer was queued (the request is complete)
        self.writing = False  # registered for EVENT_WRITE (the socket buffer was full)
        self.pid: int | None = None  # the peer's process, where the transport says (Unix)

    @property
    def open(self) -> bool:
        return self.sock.fileno() >= 0


class StreamServer:
    """Subclasses implement ``on_data``; they may override ``on_accept``, ``on_expire`` and
    ``busy_reply`` (what a shed client is told)."""

    name = "endpoint"  # for the log: "control", "metrics"
    busy_reply = b""

    def __init__(
        self, sock: socket.socket, selector: selectors.BaseSelector, limits: Limits
    ) -> None:
        self.sock = sock
        self.selector = selector
        self.limits = limits
        self.peers: dict[int, Peer] = {}
        self.shed = 0  # clients shed for lack of descriptors (for tests and the log)
        self._paused_until: float | None = None  # accepting stopped until then (or a close)
        self._hard_pause = False  # stopped for EMFILE or a shed: a close does not resume it
        self._listening = False
        self._warned = 0.0
        sock.setblocking(False)
        self._resume()

    # ---- for subclasses ------------------------------------------------------------------

    def on_accept(self, peer: Peer) -> None:
        """A new peer (e.g. check its credentials and answer at once)."""

    def on_data(self, peer: Peer) -> None:
        """``peer.buf`` grew; answer with ``send`` once it holds a whole request."""
        raise NotImplementedError

    def on_expire(self, peer: Peer) -> None:
        """``peer`` had no answer within ``limits.idle`` seconds; the default closes it."""
        self.close(peer)

    # ---- plumbing ------------------------------------------------------------------------

    def send(self, peer: Peer, data: bytes, *, close: bool = True) -> None:
        """Queue ``data`` for ``peer`` and write what the socket takes now."""
        if not peer.open:
            return
        peer.out += data
        peer.closing = peer.closing or close
        peer.waiting = False
        peer.answered = True
        self._flush(peer)

    def close(self, peer: Peer) -> None:
        if peer.open:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(peer.sock)
            self.peers.pop(peer.fd, None)
            peer.sock.close()
            if not self._listening and not self._hard_pause and self.sock.fileno() >= 0:
                self._paused_until = None
                self._resume()  # below the cap (or the descriptor ceiling) again

    def expire(self, now: float) -> None:
        """Drop peers past their time; resume accepting after a pause. Call every tick."""
        for peer in list(self.peers.values()):
            if not peer.waiting and now - peer.opened > self.limits.idle:
                if peer.closing:
                    self.close(peer)  # its answer did not drain in time
                else:
                    self.on_expire(peer)
        if self._paused_until is not None and now >= self._paused_until:
            self._paused_until = None
            self._hard_pause = False
            self._resume()

    def close_all(self) -> None:
        for peer in list(self.peers.values()):
            self.close(peer)
        self._pause_listener()
        self.sock.close()

    def _resume(self) -> None:
        if not self._listening and self.sock.fileno() >= 0:
            self.selector.register(self.sock, selectors.EVENT_READ, self._on_accept)
            self._listening = True

    def _pause_listener(self) -> None:
        if self._listening:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(self.sock)
            self._listening = False

    def _pause(self, why: str) -> None:
        self._pause_listener()
        self._paused_until = time.monotonic() + self.limits.pause
        self._hard_pause = True
        now = time.monotonic()
        if now - self._warned >= 10.0:  # one line per 10 s, however hard it is pushed
            self._warned = now
            log.warning(
                "%s: %s; shedding the newest client and not accepting for %gs "
                "(%d peers, %d shed so far)",
                self.name,
                why,
                self.limits.pause,
                len(self.peers),
                self.shed,
            )

    def _fd_ceiling(self) -> int:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return 1 << 30
        return max(0, soft - self.limits.fd_reserve)

    def _on_accept(self, _mask: int) -> None:
        ceiling = self._fd_ceiling()
        for _ in range(self.limits.accept_batch):
            if len(self.peers) >= self.limits.max_conns and not self._evict_silent():
                self._full()
                return
            try:
                sock, _ = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_FDS:
                    self._shed_newest()
                    self._pause(f"out of file descriptors ({exc.strerror})")
                elif exc.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                    log.warning("%s: accept failed: %s", self.name, exc)
                return
            if sock.fileno() >= ceiling:
                # fds are handed out lowest first: this one means nearly all below it are
                # taken. Keep the reserve for the supervisor's own work: a silent peer of
                # ours gives way (as at the cap), else the new client goes. Shedding the new
                # one alone drained the kernel's queue one connection a pause: a `status`
                # behind 300 slowloris connections at `ulimit -n 140` waited 30 s.
                if self._evict_silent():
                    self._add(sock)
                    continue
                if self.peers and sock.fileno() < ceiling + self.limits.fd_reserve // 2:
                    # Our own peers hold the descriptors, and young ones (a batch just
                    # accepted, not yet read) will go soon: keep this one, out of half the
                    # reserve at most, and accept no more until one leaves. The rest wait in
                    # the kernel's queue, at no cost to us, instead of being told "busy".
                    self._add(sock)
                    self._full()
                    return
                self.shed += 1
                with contextlib.suppress(OSError):
                    sock.setblocking(False)
                    sock.send(self.busy_reply)
                sock.close()
                self._pause(
                    f"the file descriptor limit is near (fd {ceiling + self.limits.fd_reserve}"
                    f" is RLIMIT_NOFILE, {self.limits.fd_reserve} kept in reserve)"
                )
                return
            self._add(sock)

    def _full(self) -> None:
        """Accept no more until a peer leaves (close() resumes) or one has been silent for
        ``evict_after`` (it may then give way)."""
        self._pause_listener()
        self._paused_until = time.monotonic() + self.limits.evict_after
        self._hard_pause = False

    def _add(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        peer = Peer(sock)
        self.peers[peer.fd] = peer
        self.selector.register(sock, selectors.EVENT_READ, lambda m: self._on_peer(peer, m))
        self.on_accept(peer)

    def _evict_silent(self) -> bool:
        """At the cap: close the oldest peer that has not sent a whole request for
        ``evict_after`` s, so that idle connections held open on purpose cannot keep a real
        request (a scrape, a status) waiting behind them until they expire."""
        now = time.monotonic()
        silent = [
            p
            for p in self.peers.values()
            if not p.answered and not p.waiting and now - p.opened >= self.limits.evict_after
        ]
        if not silent:
            return False
        self.shed += 1
        self.close(min(silent, key=lambda p: p.opened))
        return True

    def _shed_newest(self) -> None:
        """Close the newest peer that has not sent a whole request (the likeliest hog)."""
        for peer in sorted(self.peers.values(), key=lambda p: p.opened, reverse=True):
            if not peer.answered and not peer.waiting:
                self.shed += 1
                self.close(peer)
                return

    def _on_peer(self, peer: Peer, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(peer)
        if mask & selectors.EVENT_READ and peer.open:
            self._read(peer)

    def _read(self, peer: Peer) -> None:
        try:
            data = peer.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close(peer)
            return
        if peer.answered or peer.waiting:
            return  # one request per connection; what follows it is ignored
        peer.buf += data
        self.on_data(peer)

    def _flush(self, peer: Peer) -> None:
        try:
            while peer.out:
                sent = peer.sock.send(peer.out)
                peer.out = peer.out[sent:]
        except BlockingIOError:
            if not peer.writing:
                peer.writing = True
                self._watch(peer, selectors.EVENT_READ | selectors.EVENT_WRITE)
            return
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                log.warning("%s: send failed: %s", self.name, exc)
            self.close(peer)
            return
        if peer.closing:
            self.close(peer)
        elif peer.writing:
            peer.writing = False
            self._watch(peer, selectors.EVENT_READ)

    def _watch(self, peer: Peer, events: int) -> None:
        self.selector.modify(peer.sock, events, lambda m: self._on_peer(peer, m))


def listen_tcp(address: tuple[str, int], backlog: int, option: str) -> socket.socket:
    """A TCP listener on ``address`` (IPv6 if the host has a colon) for an HTTP endpoint that
    ``option`` (``--health``, ``--metrics``) asked for; SupervisorError naming it if not."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        fix = (
            "use an address of this machine ('ip addr'), e.g. 127.0.0.1"
            if exc.errno == errno.EADDRNOTAVAIL
            else "pick a free port (0 = any)"
        )
        raise SupervisorError(
            f"{option}: cannot listen on {address[0]}:{address[1]}: {exc.strerror}; {fix}"
        ) from None
    return sock


def http_url(sock: socket.socket) -> str:
    """http://HOST:PORT of a TCP listener, an IPv6 host in brackets."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"
