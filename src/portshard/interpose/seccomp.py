"""The seccomp interposer: the supervisor answers a worker's bind() calls (``--via seccomp``).

For programs an LD_PRELOAD shim cannot reach: static binaries and Go (raw system calls).

1. ``child_install()`` runs in the forked child before exec: it traps the native ABI's bind()
   (seccomp user notification; ``seccomp_sys.install_bind_trap``), sends the listener fd to
   the supervisor over a socketpair (SCM_RIGHTS) and closes its own copy. As root it installs
   the filter before the uid change and without no_new_privs, so setuid programs the worker
   runs still work; otherwise no_new_privs is set (required by the kernel).
2. The supervisor keeps the listener in its selector. On each trapped bind(), ``Trap.handle``
   reads the sockaddr from /proc/TID/mem, takes a copy of the program's socket
   (``pidfd_getfd``) to learn its type and options, re-checks that the notification is still
   valid (the thread may have died and its id been reused), then:
   - inherit mode, the address is managed (same rules as the shim: same family, address and
     port, or a wildcard of either family on the managed port): copy the options that matter
     and O_NONBLOCK to the slot's socket, put it at the program's fd (ADDFD + SETFD, keeping
     close-on-exec) and answer 0;
   - reuseport mode, the port is listed: set SO_REUSEPORT on the program's own socket and let
     the call run (CONTINUE);
   - anything else: CONTINUE, untouched.
3. When every process using the filter has exited, the listener reports POLLHUP and is closed.

If the listener is closed while a process still uses the filter, the kernel makes its trapped
bind() fail with ENOSYS. That happens only if the supervisor itself is gone, and then the
worker has already been killed by its parent-death signal (SIGKILL) and its process group
with it; a descendant that escaped the group (setsid) and binds later gets ENOSYS.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import select
import selectors
import signal
import socket
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..linux import proc, syscalls
from ..linux.exec import ChildError, ExecSpec, fork_exec
from . import seccomp_sys as sys_

log = logging.getLogger("portshard.interpose")

__all__ = [
    "COPIED_OPTIONS",
    "Target",
    "Trap",
    "child_install",
    "match",
    "mismatch",
    "receive_listener",
    "run_reuseport",
    "unmanaged",
    "widened",
]

_BATCH = 64
_INT, _BUF, _LINGER, _NAME = "int", "buf", "linger", "name"
_ANY = 0
# Linux values the socket module does not export everywhere.
_TCP = getattr(socket, "TCP_CONGESTION", 13)
_SO_TIMESTAMP = 29
_IP_PKTINFO = 8

# (level, option, kind, family, socket type, name): options a program sets on a listening
# socket that change how it serves; copied to the slot's socket when they differ.
# Keep in step with preload.c portshard_options.
COPIED_OPTIONS: tuple[tuple[int, int, str, int, int, str], ...] = (
    (socket.SOL_SOCKET, socket.SO_RCVBUF, _BUF, _ANY, _ANY, "SO_RCVBUF"),
    (socket.SOL_SOCKET, socket.SO_SNDBUF, _BUF, _ANY, _ANY, "SO_SNDBUF"),
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, _INT, _ANY, _ANY, "SO_KEEPALIVE"),
    (socket.SOL_SOCKET, socket.SO_LINGER, _LINGER, _ANY, _ANY, "SO_LINGER"),
    (socket.SOL_SOCKET, socket.SO_PRIORITY, _INT, _ANY, _ANY, "SO_PRIORITY"),
    (socket.SOL_SOCKET, socket.SO_RCVLOWAT, _INT, _ANY, _ANY, "SO_RCVLOWAT"),
    (socket.SOL_SOCKET, socket.SO_MARK, _INT, _ANY, _ANY, "SO_MARK"),
    (socket.SOL_SOCKET, socket.SO_BROADCAST, _INT, _ANY, socket.SOCK_DGRAM, "SO_BROADCAST"),
    (socket.SOL_SOCKET, _SO_TIMESTAMP, _INT, _ANY, socket.SOCK_DGRAM, "SO_TIMESTAMP"),
    (socket.IPPROTO_IP, socket.IP_TOS, _INT, socket.AF_INET, _ANY, "IP_TOS"),
    (socket.IPPROTO_IP, _IP_PKTINFO, _INT, socket.AF_INET, socket.SOCK_DGRAM, "IP_PKTINFO"),
    (socket.IPPROTO_IP, socket.IP_RECVTOS, _INT, socket.AF_INET, socket.SOCK_DGRAM, "IP_RECVTOS"),
    (socket.IPPROTO_IPV6, socket.IPV6_TCLASS, _INT, socket.AF_INET6, _ANY, "IPV6_TCLASS"),
    (
        socket.IPPROTO_IPV6,
        socket.IPV6_RECVPKTINFO,
        _INT,
        socket.AF_INET6,
        socket.SOCK_DGRAM,
        "IPV6_RECVPKTINFO",
    ),
    (socket.IPPROTO_TCP, socket.TCP_NODELAY, _INT, _ANY, socket.SOCK_STREAM, "TCP_NODELAY"),
    (
        socket.IPPROTO_TCP,
        socket.TCP_DEFER_ACCEPT,
        _INT,
        _ANY,
        socket.SOCK_STREAM,
        "TCP_DEFER_ACCEPT",
    ),
    (socket.IPPROTO_TCP, socket.TCP_FASTOPEN, _INT, _ANY, socket.SOCK_STREAM, "TCP_FASTOPEN"),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, _INT, _ANY, socket.SOCK_STREAM, "TCP_KEEPIDLE"),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, _INT, _ANY, socket.SOCK_STREAM, "TCP_KEEPINTVL"),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, _INT, _ANY, socket.SOCK_STREAM, "TCP_KEEPCNT"),
    (
        socket.IPPROTO_TCP,
        socket.TCP_USER_TIMEOUT,
        _INT,
        _ANY,
        socket.SOCK_STREAM,
        "TCP_USER_TIMEOUT",
    ),
    (socket.IPPROTO_TCP, socket.TCP_MAXSEG, _INT, _ANY, socket.SOCK_STREAM, "TCP_MAXSEG"),
    (
        socket.IPPROTO_TCP,
        socket.TCP_NOTSENT_LOWAT,
        _INT,
        _ANY,
        socket.SOCK_STREAM,
        "TCP_NOTSENT_LOWAT",
    ),
    (socket.IPPROTO_TCP, _TCP, _NAME, _ANY, socket.SOCK_STREAM, "TCP_CONGESTION"),
)


@dataclass(frozen=True)
class Target:
    """One of the slot's sockets, as bind() addresses are matched against it."""

    sock: socket.socket
    family: int
    type: int
    protocol: int
    host: bytes  # packed address
    port: int
    dualstack: bool = False  # an IPv6 wildcard that also takes IPv4 (IPV6_V6ONLY off)

    @classmethod
    def of(cls, sock: socket.socket) -> Target | None:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        name = sock.getsockname()
        dual = sock.family == socket.AF_INET6 and not sock.getsockopt(
            socket.IPPROTO_IPV6, socket.IPV6_V6ONLY
        )
        return cls(
            sock,
            int(sock.family),
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE),
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL),
            ipaddress.ip_address(name[0].split("%", 1)[0]).packed,
            int(name[1]),
            dual,
        )

    @property
    def wildcard(self) -> bool:
        return not any(self.host)

    def covers(self, family: int) -> bool:
        """Whether this wildcard socket receives connections to an address of ``family``."""
        return self.wildcard and (self.family == family or self.dualstack)


def parse_sockaddr(raw: bytes) -> tuple[int, bytes, int] | None:
    """(family, packed host, port) of a sockaddr_in or sockaddr_in6; None for anything else."""
    if len(raw) < 2:
        return None
    family = struct.unpack_from("=H", raw)[0]
    if family == socket.AF_INET and len(raw) >= 16:
        return family, raw[4:8], struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET6 and len(raw) >= 28:
        return family, raw[8:24], struct.unpack_from("!H", raw, 2)[0]
    return None


def match(
    targets: Sequence[Target], family: int, host: bytes, port: int, type_: int, protocol: int
) -> Target | None:
    """The slot socket a bind() of (family, host, port) should get; the shim's rules, in order:

    1. the same family and address;
    2. the program asks for every address (a wildcard): the supervisor's --listen decides
       which, the same family first;
    3. the program asks for one address (127.0.0.1, uvicorn's default) and the supervisor
       listens on every interface (a wildcard that receives that family): the program gets
       the wildcard socket, so it serves what --listen says (a log line says so: see
       :func:`widened`), instead of binding its own socket and failing with EADDRINUSE.
    """
    wildcard = not any(host)
    other_family: Target | None = None
    covering: Target | None = None
    for t in targets:
        if t.port != port or t.type != type_ or t.protocol != protocol:
            continue
        if t.family == family and t.host == host:
            return t
        if wildcard:
            if t.family == family:
                return t
            if other_family is None:
                other_family = t
        elif t.covers(family) and (covering is None or covering.family != family):
            covering = t
    return other_family or covering


def show(family: int, host: bytes, port: int) -> str:
    """127.0.0.1:8000, [::1]:8000, 0.0.0.0:8000: an address as the messages print it."""
    text = socket.inet_ntop(family, host)
    return f"[{text}]:{port}" if family == socket.AF_INET6 else f"{text}:{port}"


def widened(target: Target, family: int, host: bytes, port: int) -> str | None:
    """The log line when :func:`match` gave a program asking for one address the wildcard
    socket (rule 3); None when it got what it asked for."""
    if not any(host) or not target.wildcard:
        return None
    asked, ours = show(family, host, port), show(target.family, target.host, port)
    return (
        f"it asked for {asked} and gets portshard's socket on {ours} (every interface, as "
        f"--listen says), so it also serves other interfaces; to serve {asked} only, use "
        f"--listen tcp://{asked}"
    )


def mismatch(
    targets: Sequence[Target], family: int, host: bytes, port: int, type_: int, protocol: int
) -> str | None:
    """Why a bind() on a managed port got no slot socket (None: the port is not managed):
    names both addresses and the fix."""
    same_port = [t for t in targets if t.port == port]
    if not same_port:
        return None
    asked = show(family, host, port)
    kind = [t for t in same_port if t.type == type_ and t.protocol == protocol]
    if not kind:
        return (
            f"bind() to {asked} is not the protocol portshard serves on port {port} (type "
            f"{type_}, protocol {protocol}); it binds its own socket"
        )
    ours = ", ".join(show(t.family, t.host, port) for t in kind)
    proto = "udp" if type_ == socket.SOCK_DGRAM else "tcp"
    return (
        f"bind() to {asked} does not match portshard's socket on {ours}; the program binds a "
        f"socket of its own, which portshard does not manage (or fails with EADDRINUSE). Make "
        f"it bind {ours.split(', ')[0]} (or every interface), or use --listen {proto}://{asked}"
    )


def unmanaged(targets: Sequence[Target], port: int) -> str:
    """The note for a program binding a port nobody manages (its real server port, often)."""
    ours = ", ".join(sorted({str(t.port) for t in targets}))
    return (
        f"it binds port {port}, which portshard does not manage (it serves {ours}): connections "
        f"to {ours} never reach that socket. If {port} is the port to serve, write {{port}} where "
        f"the program takes its port, or use --listen tcp://:{port}"
    )


def copy_options(src: socket.socket, dst: socket.socket, family: int, type_: int) -> list[str]:
    """Copy the options in COPIED_OPTIONS that differ from ``src`` to ``dst``; return names."""
    copied: list[str] = []
    for level, name, kind, only_family, only_type, label in COPIED_OPTIONS:
        if only_family and (only_family != family or dst.family != family):
            continue
        if only_type and only_type != type_:
            continue
        try:
            want = src.getsockopt(level, name, 64)
            have = dst.getsockopt(level, name, 64)
        except OSError:
            continue
        if want == have:
            continue
        value = want
        if kind == _BUF:
            value = struct.pack("=i", struct.unpack_from("=i", want)[0] // 2)
        elif kind == _NAME:
            value = want.split(b"\0", 1)[0]
        try:
            dst.setsockopt(level, name, value)
            copied.append(label)
        except OSError as exc:
            log.warning("could not copy %s to the slot's socket: %s", label, exc.strerror)
    return copied


def child_install(channel: int, *, as_root: bool) -> None:
    """In the forked child: trap bind() and send the listener fd over ``channel``.

    Raises OSError whose message says what failed (it becomes the spawn error).
    """
    arch = syscalls.native_arch()
    if arch is None:
        raise OSError(errno.ENOSYS, f"--via seccomp: no system call table for {os.uname().machine}")
    try:
        listener, _ = sys_.install_bind_trap(arch, no_new_privs=not as_root)
    except OSError as exc:
        raise OSError(
            exc.errno, f"cannot install the seccomp bind() trap ({exc.strerror}); use --via preload"
        ) from None
    try:
        with socket.socket(fileno=os.dup(channel)) as chan:
            socket.send_fds(chan, [b"L"], [listener])
    finally:
        os.close(listener)


def receive_listener(channel: socket.socket) -> int:
    """In the supervisor, after the child exec'd: the listener fd it sent."""
    _, fds, _, _ = socket.recv_fds(channel, 1, 1, socket.MSG_DONTWAIT)
    if not fds:
        raise OSError(errno.EPROTO, "the worker sent no seccomp listener")
    for fd in fds[1:]:
        os.close(fd)
    os.set_inheritable(fds[0], False)
    return fds[0]


class Trap:
    """One worker's seccomp listener: answers bind() for the worker and its descendants.

    ``reuseport`` None: inherit mode (hand over ``socks``); a set: reuseport mode for those
    ports (empty set: every port).
    """

    def __init__(
        self,
        listener: int,
        socks: Sequence[socket.socket],
        *,
        label: str,
        reuseport: frozenset[int] | None = None,
    ) -> None:
        self.listener = listener
        self.label = label
        self.reuseport = reuseport
        self.targets = [t for t in (Target.of(s) for s in socks) if t is not None]
        self._inodes = {os.fstat(t.sock.fileno()).st_ino for t in self.targets}
        self.arch = syscalls.native_arch()
        self.handled = 0  # bind() calls answered
        self.adopted = 0  # of which were given a slot socket
        self.busy = 0.0  # seconds spent answering
        self._noted: set[int] = set()  # unmanaged ports already logged

    def fileno(self) -> int:
        return self.listener

    def close(self) -> None:
        if self.listener >= 0:
            os.close(self.listener)
            self.listener = -1

    def on_readable(self) -> bool:
        """Answer pending bind() calls; False once no process uses the filter any more.

        At most ``_BATCH`` per call: a program binding in a loop must not starve the rest of
        the supervisor's loop (the selector calls again while more are pending).
        """
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        for _ in range(_BATCH):
            events = poller.poll(0)
            if not events:
                return True
            revents = events[0][1]
            if not revents & select.POLLIN:
                return not revents & (select.POLLHUP | select.POLLERR | select.POLLNVAL)
            self._answer_one()
        return True

    def _answer_one(self) -> None:
        start = time.perf_counter()
        try:
            notif = sys_.notif_recv(self.listener)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EINTR):  # ENOENT: the caller died
                log.warning("%s: seccomp NOTIF_RECV failed: %s", self.label, exc.strerror)
            return
        try:
            self._decide(notif)
        except OSError as exc:
            if exc.errno == errno.ENOENT or not sys_.notif_id_valid(self.listener, notif.id):
                return  # the thread died meanwhile
            log.warning(
                "%s: bind() in pid %d could not be interposed (%s); it binds its own socket",
                self.label,
                notif.pid,
                exc.strerror or exc,
            )
            with contextlib.suppress(OSError):
                sys_.notif_send(self.listener, notif.id, cont=True)
        finally:
            self.handled += 1
            self.busy += time.perf_counter() - start

    def _decide(self, notif: sys_.SeccompNotif) -> None:
        data = notif.data
        arch = self.arch
        if arch is None or data.arch != arch.audit_arch or data.nr != arch.nr_bind:
            sys_.notif_send(self.listener, notif.id, cont=True)  # not ours (filter says it is)
            return
        fd, addr, addrlen = int(data.args[0]), int(data.args[1]), int(data.args[2])
        tid = int(notif.pid)
        raw = b""
        if addr and 0 < addrlen <= 128:
            raw = proc.read_memory(tid, addr, addrlen)
        parsed = parse_sockaddr(raw)
        if parsed is None or not 0 <= fd < 1 << 20:
            sys_.notif_send(self.listener, notif.id, cont=True)
            return
        family, host, port = parsed
        if self.reuseport is None:
            ours = port != 0 and any(t.port == port for t in self.targets)
        else:
            ours = not self.reuseport or port in self.reuseport
        if not ours:
            sys_.notif_send(self.listener, notif.id, cont=True)  # the fast path: not ours
            if self.reuseport is None and port and port not in self._noted:
                self._noted.add(port)  # once per port: say where the program's server went
                log.info("%s: %s", self.label, unmanaged(self.targets, port))
            return
        pid = proc.tgid(tid)
        pidfd = syscalls.pidfd_open(pid)
        try:
            theirs_fd = syscalls.pidfd_getfd(pidfd, fd)
        finally:
            os.close(pidfd)
        with socket.socket(fileno=theirs_fd) as theirs:
            # What we read may belong to a reused thread id: trust it only if still pending.
            if not sys_.notif_id_valid(self.listener, notif.id):
                return
            if self.reuseport is not None:
                self._reuseport(notif, theirs, port)
                return
            self._inherit(notif, pid, fd, theirs, family, host, port)

    def _reuseport(self, notif: sys_.SeccompNotif, theirs: socket.socket, port: int) -> None:
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        log.debug("%s: SO_REUSEPORT set before bind() to port %d", self.label, port)
        sys_.notif_send(self.listener, notif.id, cont=True)

    def _inherit(
        self,
        notif: sys_.SeccompNotif,
        pid: int,
        fd: int,
        theirs: socket.socket,
        family: int,
        host: bytes,
        port: int,
    ) -> None:
        type_ = theirs.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        protocol = theirs.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
        target = match(self.targets, family, host, port, type_, protocol)
        if target is None or os.fstat(theirs.fileno()).st_ino in self._inodes:
            why = mismatch(self.targets, family, host, port, type_, protocol)
            if target is None and why is not None:
                log.warning("%s: pid %d: %s", self.label, pid, why)
            sys_.notif_send(self.listener, notif.id, cont=True)
            return
        ours = target.sock
        copied = copy_options(theirs, ours, family, type_)
        flags = fcntl.fcntl(theirs.fileno(), fcntl.F_GETFL)
        current = fcntl.fcntl(ours.fileno(), fcntl.F_GETFL)
        if (flags ^ current) & os.O_NONBLOCK:
            nonblock = flags & os.O_NONBLOCK
            fcntl.fcntl(ours.fileno(), fcntl.F_SETFL, (current & ~os.O_NONBLOCK) | nonblock)
        cloexec = proc.fd_cloexec(pid, fd)
        sys_.answer_with_fd(self.listener, notif, ours.fileno(), cloexec=cloexec)
        self.adopted += 1
        if (note := widened(target, family, host, port)) is not None:
            log.warning("%s: bind() in pid %d: %s", self.label, pid, note)
        log.info(
            "%s: bind() in pid %d on fd %d now has the slot's socket (port %d%s)",
            self.label,
            pid,
            fd,
            port,
            f"; copied {', '.join(copied)}" if copied else "",
        )


_FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


def run_reuseport(argv: Sequence[str], env: Mapping[str, str], ports: frozenset[int]) -> int:
    """``portshard preload`` for a program LD_PRELOAD cannot reach (static, Go).

    Runs ``argv`` as a child whose bind() is trapped; each bind() to a listed port (any port
    if ``ports`` is empty) gets SO_REUSEPORT first. We stay as its parent to answer, forward
    the usual signals to it and return its exit code (128+N if killed by signal N). The child
    gets SIGKILL if we die, so it is never left with a trap nobody answers (ENOSYS).
    """
    ours, theirs = socket.socketpair()

    def setup() -> None:
        ours.close()
        child_install(theirs.fileno(), as_root=os.geteuid() == 0)
        theirs.close()

    # close_others=False: the program inherits our fds as `portshard preload` would leave them.
    spec = ExecSpec(argv, env, close_others=False, death_signal=signal.SIGKILL)
    try:
        pid = fork_exec(spec, setup=setup)
    except OSError as exc:
        ours.close()
        reason = exc.strerror if isinstance(exc, ChildError) else f"fork: {exc.strerror}"
        raise OSError(errno.ENOEXEC, f"cannot run {argv[0]!r}: {reason}") from None
    finally:
        theirs.close()
    with ours:
        listener = receive_listener(ours)
    trap = Trap(listener, [], label=f"pid {pid}", reuseport=ports)
    pidfd = syscalls.pidfd_open(pid)
    previous = {sig: signal.signal(sig, lambda s, _f: os.kill(pid, s)) for sig in _FORWARDED}
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(listener, selectors.EVENT_READ, "trap")
            sel.register(pidfd, selectors.EVENT_READ, "exit")
            while True:
                for key, _ in sel.select():
                    if key.data == "exit":
                        _, status = os.waitpid(pid, 0)
                        code = os.waitstatus_to_exitcode(status)
                        return 128 - code if code < 0 else code
                    if not trap.on_readable():
                        sel.unregister(listener)
                        trap.close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        trap.close()
        os.close(pidfd)
