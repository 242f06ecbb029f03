"""`portshard doctor`: what this machine supports, probed for real, and what each feature enables.

Design note: every probe exercises its feature on the running kernel (binds sockets, attaches
programs, steers real connections, forks a child and traps its bind()) instead of trusting the
kernel version: backports, kernel configs, seccomp profiles and container sandboxes all change the
answer. A probe reports its own failure as ok=False with the reason, so doctor never raises for a
missing feature. It never writes a sysctl, and leaves no process or fd behind: every child is
bounded by a deadline, killed if it overruns, and always reaped.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from .interpose import seccomp_sys as sc
from .linux import bpf, cgroup, proc, syscalls, sysctl
from .linux.exec import ExecSpec, fork_call, fork_exec
from .sockets import PLATFORMS, platform_key, somaxconn
from .steering import ebpf

__all__ = ["Check", "probe_all", "render", "to_json"]

Value = str | int | bool | None
_Found = tuple[bool, Value, str]  # what a probe returns: ok, value, detail


@dataclass(frozen=True)
class Check:
    """What one probe found on this machine."""

    key: str
    ok: bool
    value: Value
    detail: str  # what was found (or why the probe failed)
    enables: str  # what it enables in portshard, or what is lost without it


class _Failed(Exception):
    """A probe's negative answer; the message is the detail shown to the user."""


@dataclass(frozen=True)
class _Probe:
    key: str
    run: Callable[[], _Found]
    enables: str
    without: str
    linux_only: bool


_PROBES: list[_Probe] = []
_LINUX = sys.platform.startswith("linux")
_TIMEOUT = 5.0  # per probe that waits on a child or a connection
SO_ATTACH_REUSEPORT_CBPF = bpf.SO_ATTACH_REUSEPORT_CBPF
SO_ATTACH_REUSEPORT_EBPF = bpf.SO_ATTACH_REUSEPORT_EBPF


def _probe(
    key: str, enables: str, without: str, *, linux_only: bool = True
) -> Callable[[Callable[[], _Found]], Callable[[], _Found]]:
    """Register a probe; they run, and are shown, in the order they are defined here."""

    def register(run: Callable[[], _Found]) -> Callable[[], _Found]:
        _PROBES.append(_Probe(key, run, enables, without, linux_only))
        return run

    return register


def probe_all() -> list[Check]:
    """Run every probe; never raises for a missing feature."""
    return [_run(p) for p in _PROBES]


def _run(probe: _Probe) -> Check:
    ok: bool
    value: Value
    if probe.linux_only and not _LINUX:
        ok, value, detail = False, None, f"Linux only; this is {sys.platform}"
    else:
        try:
            ok, value, detail = probe.run()
        except Exception as exc:
            ok, value, detail = False, None, _reason(exc)
    return Check(probe.key, ok, value, detail, probe.enables if ok else probe.without)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, _Failed):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return f"timed out after {_TIMEOUT:g}s"
    if isinstance(exc, OSError) and exc.errno:
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


def _kernel() -> str:
    return os.uname().release if hasattr(os, "uname") else platform.release()


def to_json(checks: list[Check]) -> dict[str, object]:
    return {
        "platform": sys.platform,
        "kernel": _kernel(),
        "machine": platform.machine(),
        "checks": {
            c.key: {"ok": c.ok, "value": c.value, "detail": c.detail, "enables": c.enables}
            for c in checks
        },
    }


def _show(value: Value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def render(checks: list[Check]) -> str:
    """An aligned table, a line per check, then why each missing feature is missing."""
    rows = [("ok" if c.ok else "no", c.key, _show(c.value), c.enables) for c in checks]
    widths = [max([len(r[i]) for r in rows], default=0) for i in range(3)]
    ok = sum(c.ok for c in checks)
    lines = [f"portshard doctor: {sys.platform} {_kernel()} {platform.machine()}, "]
    lines[0] += f"{ok} of {len(checks)} available"
    lines += [
        "  ".join(f"{col:<{w}}" for col, w in zip(r[:3], widths, strict=True)) + "  " + r[3]
        for r in rows
    ]
    missing = [c for c in checks if not c.ok]
    if missing:
        lines += ["", "why not:"] + [f"  {c.key}: {c.detail}" for c in missing]
    return "\n".join(lines)


# --- a forked child, bounded and always reaped ----------------------------------------------


class _Child:
    """A forked child that runs ``body(chan)`` and sends the string it returns as its report.

    Parent and child talk over an AF_UNIX SOCK_SEQPACKET pair (one message per send, fds by
    SCM_RIGHTS). Every wait ends at the deadline; leaving the ``with`` block kills the child if
    it still runs, and always reaps it.
    """

    def __init__(self, body: Callable[[socket.socket], str]) -> None:
        self.deadline = time.monotonic() + _TIMEOUT
        self.exit_code: int | None = None
        self.chan, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.pid = fork_call(lambda: _child_main(body, self.chan, theirs))
        except BaseException:
            self.chan.close()
            raise
        finally:
            theirs.close()

    def __enter__(self) -> _Child:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            if self.exit_code is None:
                self._kill()
        finally:
            self.chan.close()

    def left(self) -> float:
        return max(self.deadline - time.monotonic(), 0.001)

    def recv(self, maxfds: int = 0) -> tuple[str, list[int]]:
        """The child's next message and the fds sent with it (ours to close)."""
        self.chan.settimeout(self.left())
        msg, fds, _flags, _addr = socket.recv_fds(self.chan, 512, maxfds)
        for fd in fds:
            os.set_inheritable(fd, False)
        if not msg and not fds:
            raise _Failed(f"the test child (pid {self.pid}) exited early: {self._reap_code()}")
        return msg.decode(errors="replace"), fds

    def wait(self) -> int:
        """Wait for the child to exit (it closes its end of the pair as it does); its code."""
        while True:
            self.chan.settimeout(self.left())
            try:
                if not self.chan.recv(512):
                    break
            except TimeoutError:
                self._kill()
                raise _Failed(f"the test child did not exit within {_TIMEOUT:g}s; killed") from None
        return self._reap_code()

    def _reap_code(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        self.exit_code = os.waitstatus_to_exitcode(status)
        return self.exit_code

    def _kill(self) -> None:
        with suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self._reap_code()


def _child_main(
    body: Callable[[socket.socket], str], ours: socket.socket, theirs: socket.socket
) -> int:
    """In the forked child (linux.exec.fork_call): run ``body``, send its report; exit code."""
    ours.close()
    code = 1
    try:
        report, code = body(theirs), 0
    except BaseException as exc:
        report = f"in the child: {_reason(exc)}"
    theirs.send(report.encode()[:500] or b"?")
    return code


# --- sockets ----------------------------------------------------------------------------------


@contextmanager
def _group(n: int = 2) -> Iterator[list[socket.socket]]:
    """``n`` TCP sockets listening on one loopback port with SO_REUSEPORT, in listen() order."""
    option = getattr(socket, "SO_REUSEPORT", None)
    if option is None:
        raise _Failed(f"Python's socket module has no SO_REUSEPORT on {sys.platform}")
    socks: list[socket.socket] = []
    try:
        port = 0
        for i in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, option, 1)
            try:
                sock.bind(("127.0.0.1", port))
                sock.listen(16)
            except OSError as exc:
                which = f"socket #{i} could not share 127.0.0.1:{port}" if i else "first socket"
                raise _Failed(f"SO_REUSEPORT {which}: {_reason(exc)}") from None
            port = sock.getsockname()[1]
        yield socks
    finally:
        for sock in socks:
            sock.close()


def _steered(socks: list[socket.socket], want: int, n: int = 8) -> str:
    """Open ``n`` connections to the group; fail unless all land on ``socks[want]``."""
    port = socks[0].getsockname()[1]
    got = [0] * len(socks)
    clients: list[socket.socket] = []
    deadline = time.monotonic() + _TIMEOUT
    try:
        for _ in range(n):
            clients.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            clients[-1].settimeout(_TIMEOUT)
            clients[-1].connect(("127.0.0.1", port))  # no getaddrinfo: it costs ~50 ms at first
        while sum(got) < n:
            ready, _, _ = select.select(socks, [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                raise _Failed(f"{sum(got)} of {n} test connections arrived in {_TIMEOUT:g}s")
            for sock in ready:
                sock.accept()[0].close()
                got[socks.index(sock)] += 1
    finally:
        for client in clients:
            client.close()
    if got[want] != n:
        raise _Failed(f"the program picked socket #{want} but connections went {got}")
    return f"{n} of {n} connections to a {len(socks)}-socket group went to socket #{want}"


# --- eBPF through bpf(2), no libbpf: steering/ebpf.py ------------------------------------------


def _bpf(cmd: int, attr: bytes, what: str) -> int:
    try:
        return ebpf.bpf(cmd, attr, what)
    except ebpf.BpfError as exc:
        raise _Failed(str(exc)) from None


def _load_select_key0(map_fd: int) -> int:
    """Load an SK_REUSEPORT program that picks the socket at key 0 of the map."""
    try:
        return ebpf.load_select_key0(map_fd)
    except ebpf.BpfError as exc:
        raise _Failed(str(exc)) from None


# --- the probes, in the order they are shown ---------------------------------------------------


@_probe(
    "reuseport",
    "port sharing: N workers on one port, balanced by the kernel (portshard run, listen())",
    "no port sharing: portshard run and listen() refuse; run one listener or a proxy",
    linux_only=False,
)
def _reuseport() -> _Found:
    with _group(2) as socks:
        port = socks[0].getsockname()[1]
    plat = PLATFORMS.get(platform_key())
    how = f"; {plat.name}: {plat.behaviour}" if plat else ""
    return True, True, f"two TCP sockets bound 127.0.0.1:{port} with SO_REUSEPORT, both listen{how}"


@_probe(
    "reuseport_lb",
    "FreeBSD: balanced groups of up to 256 sockets (listen() uses SO_REUSEPORT_LB)",
    "nothing on Linux and DragonFly (SO_REUSEPORT balances); elsewhere the last bind wins",
    linux_only=False,
)
def _reuseport_lb() -> _Found:
    if _LINUX:
        return False, False, "not a Linux option: Linux's SO_REUSEPORT already balances by hash"
    option = getattr(socket, "SO_REUSEPORT_LB", None)
    if option is None and sys.platform.startswith("freebsd"):
        option = 0x00010000  # sys/socket.h; older Pythons do not export it
    if option is None:
        return False, False, f"no SO_REUSEPORT_LB on {sys.platform}"
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, option, 1)
    return True, True, "setsockopt(SO_REUSEPORT_LB) accepted"


@_probe(
    "reuseport_cbpf",
    "steering backend cbpf (no privilege; what --steering auto uses without eBPF): new "
    "connections skip dead, starting, draining and overloaded slots, weighted by what they serve",
    "no steering: a slot with no worker keeps its hash share (its connections wait)",
)
def _reuseport_cbpf() -> _Found:
    prog = bpf.ClassicProgram([(bpf.RET_K, 0, 0, 1)])  # every connection to socket #1
    with _group(2) as socks:
        socks[0].setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, prog.as_option())
        return True, True, f"attached 'ret #1' with SO_ATTACH_REUSEPORT_CBPF: {_steered(socks, 1)}"


@_probe(
    "reuseport_ebpf",
    "steering backend ebpf (what --steering auto picks here): stable slot keys, a map update "
    "instead of a re-attach, and a dead worker's queue handed to the other slots at once",
    "--steering auto uses classic BPF (cbpf): a dead worker's queued connections wait for its "
    "replacement unless tcp_migrate_req=1",
)
def _reuseport_ebpf() -> _Found:
    fds: list[int] = []
    try:
        spec = struct.pack("=5I", ebpf.BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 4, 1, 0)
        fds.append(_bpf(ebpf.BPF_MAP_CREATE, spec, "creating a REUSEPORT_SOCKARRAY map"))
        fds.append(_load_select_key0(fds[0]))
        with _group(2) as socks:
            key, value = ctypes.c_uint32(0), ctypes.c_uint32(socks[1].fileno())
            elem = (fds[0], ctypes.addressof(key), ctypes.addressof(value), 0)
            _bpf(ebpf.BPF_MAP_UPDATE_ELEM, struct.pack("=I4xQQQ", *elem), "updating the map")
            socks[0].setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, fds[1])
            steered = _steered(socks, 1)
    finally:
        for fd in fds:
            os.close(fd)
    return True, True, f"SK_REUSEPORT program + REUSEPORT_SOCKARRAY map by bpf(2): {steered}"


def _caps() -> list[str]:
    """The effective capabilities portshard cares about."""
    return proc.capabilities()


_MIGRATE_REQ = sysctl.path(sysctl.MIGRATE_REQ)


@_probe(
    "tcp_migrate_req",
    "=1: a closing listener hands its queued connections to the group instead of resetting "
    "them; with cbpf steering a dead worker's queue goes to the other slots at once, and "
    "--via reuseport reloads lose nothing (--migrate)",
    "a closing listener resets its queue (portshard keeps slot sockets open to avoid that)",
)
def _tcp_migrate_req() -> _Found:
    value = sysctl.migrate_req()
    if value is None:
        raise _Failed(f"no {_MIGRATE_REQ}: Linux < 5.14")
    if os.geteuid() != 0 and "NET_ADMIN" not in _caps():
        may = "no (needs root or CAP_NET_ADMIN)"
    elif not sysctl.writable(sysctl.MIGRATE_REQ):
        may = "no (/proc/sys is read-only here, e.g. a container)"
    else:
        may = "yes (root, writable)"
    state = "on" if value else "off"
    change = (
        "with cbpf steering, a slot whose worker dies hands its queued connections to the other "
        "slots at once (its listener is replaced); scale down and stop do not depend on it"
        if value
        else "setting it to 1 (portshard run --migrate) would let cbpf steering hand a dead "
        "worker's queued connections to the other slots at once instead of letting them wait "
        "for its replacement; eBPF steering does that at 0 too"
    )
    return (
        True,
        value,
        f"{value} ({state}) in this network namespace; may set: {may}; only read; {change}",
    )


def _seccomp_child(
    arch: syscalls.Arch, port: int, inherited: int
) -> Callable[[socket.socket], str]:
    def body(chan: socket.socket) -> str:
        os.close(inherited)  # the parent's listener came with fork(): it must arrive by ADDFD
        listener, killable = sc.install_bind_trap(arch)
        socket.send_fds(chan, [b"yes" if killable else b"no (Linux < 5.19)"], [listener])
        os.close(listener)  # once the parent's copy is gone too, a trapped bind() gets ENOSYS
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            fd = sock.fileno()
            sock.bind(("127.0.0.1", 0))  # trapped: the parent installs its listener at fd
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            if sock.getsockname()[1] != port or not listening:
                return f"bind() returned 0 but fd {fd} is not the parent's listener"
        return "ok"

    return body


@_probe(
    "seccomp_user_notif_addfd",
    "--via seccomp: static and Go binaries get the supervisor's socket at their own bind()",
    "no --via seccomp: static and Go binaries need --via fds, or reuseport (no zero-loss)",
)
def _seccomp() -> _Found:
    arch = syscalls.native_arch()
    if arch is None:
        raise _Failed(f"no bind() filter for {platform.machine()} yet (x86_64, aarch64)")
    try:
        sc.check_sizes()
    except OSError as exc:
        raise _Failed(f"SECCOMP_GET_NOTIF_SIZES (5.0+): {_reason(exc)}") from None
    with socket.socket() as ours:
        ours.bind(("127.0.0.1", 0))
        ours.listen(1)
        with _Child(_seccomp_child(arch, ours.getsockname()[1], ours.fileno())) as child:
            killable, fds = child.recv(maxfds=1)
            if not fds:
                raise _Failed(f"installing the filter: {killable}")
            try:
                if not select.select(fds, [], [], child.left())[0]:
                    raise _Failed(f"no notification for the child's bind() in {_TIMEOUT:g}s")
                notif = sc.notif_recv(fds[0])
                if notif.pid != child.pid or notif.data.nr != arch.nr_bind:
                    raise _Failed(f"unexpected notification: pid {notif.pid} nr {notif.data.nr}")
                try:
                    fd = sc.answer_with_fd(fds[0], notif, ours.fileno())
                except OSError as exc:
                    raise _Failed(f"SECCOMP_IOCTL_NOTIF_ADDFD (5.9+): {_reason(exc)}") from None
            finally:
                os.close(fds[0])
            report, _ = child.recv()
            code = child.wait()
    if report != "ok" or code != 0:
        raise _Failed(f"the child says: {report} (exit {code})")
    detail = (
        f"a child's bind() was trapped, ADDFD+SETFD put our listener at its fd {fd}, bind() "
        f"returned 0 and the child saw our socket; WAIT_KILLABLE_RECV: {killable}"
    )
    return True, True, detail


def _pidfd_child(chan: socket.socket) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        chan.send(f"{sock.fileno()} {sock.getsockname()[1]}".encode())
        chan.recv(1)  # hold the socket until the parent has taken its copy
    return "ok"


@_probe(
    "pidfd_getfd",
    "pidfds for race-free worker exits; copying a worker's fd without its help",
    "no copying a worker's fd without its help (and no pidfds if pidfd_open failed too)",
)
def _pidfd_getfd() -> _Found:
    with _Child(_pidfd_child) as child:
        text, _ = child.recv()
        fd_s, _, port_s = text.partition(" ")
        if not fd_s.isdigit():
            raise _Failed(text)
        try:
            pidfd = syscalls.pidfd_open(child.pid)
        except OSError as exc:
            raise _Failed(f"pidfd_open (5.3+): {_reason(exc)}") from None
        try:
            copy = syscalls.pidfd_getfd(pidfd, int(fd_s))
        except OSError as exc:
            why = "needs ptrace access to the child"
            if exc.errno == errno.EPERM and not syscalls.is_dumpable():
                why = "this process changed uid, so it and its children are not dumpable"
            return False, "pidfd_open only", f"pidfd_getfd (5.6+; {why}): {_reason(exc)}"
        finally:
            os.close(pidfd)
        with socket.socket(fileno=copy) as sock:
            same = sock.getsockname()[1] == int(port_s)
        child.chan.send(b"done")
        child.recv()
        child.wait()
    if not same:
        raise _Failed(f"pidfd_getfd returned an fd that is not the child's socket {fd_s}")
    return True, True, f"pidfd_open on a child, pidfd_getfd copied its UDP socket (fd {fd_s})"


@_probe(
    "worker_trees",
    "a worker is its whole process tree (a cgroup each): stop, reload and exits kill every "
    "process it started, setsid() and daemonized children included",
    "a worker's tree is its process group and children (child subreaper): a child that calls "
    "setsid() escapes stop and reload",
)
def _worker_trees() -> _Found:
    found = cgroup.detect()
    if found.mechanism is cgroup.Mechanism.SUBREAPER:
        return False, found.mechanism.value, found.why
    trees = cgroup.Trees.open(f"doctor-{os.getpid()}", found)
    try:
        if trees.mechanism is cgroup.Mechanism.SUBREAPER:
            return False, trees.mechanism.value, trees.detected.why
        group = trees.create("probe")
        assert group is not None
        spec = ExecSpec(["sleep", "60"], dict(os.environ))
        pid = fork_exec(spec, setup=group.join_self)
        try:
            members = group.members()
            group.kill()
            os.waitpid(pid, 0)
        finally:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if members != [pid]:
            raise _Failed(f"the child's group held {members}, not [{pid}]")
    finally:
        trees.close()
    detail = f"{found.why}; a child joined its group before exec and cgroup.kill ended it"
    return True, found.mechanism.value, detail


@_probe(
    "somaxconn",
    "the cap on each slot's accept queue (portshard asks for 65535 and gets this)",
    "the accept queue cap is unknown; connections beyond it are dropped silently",
)
def _somaxconn() -> _Found:
    value = somaxconn()
    if value is None:
        raise _Failed("cannot read /proc/sys/net/core/somaxconn")
    low = "" if value >= 4096 else "; low (4096 is the default since 5.4): raise it for bursts"
    return True, value, f"listen backlogs are clamped to {value}{low}"


def _connect_accept(server: socket.socket, family: socket.AddressFamily, host: str) -> str:
    port = server.getsockname()[1]
    try:
        with socket.socket(family, socket.SOCK_STREAM) as client:
            client.settimeout(_TIMEOUT)
            client.connect((host, port))
            server.settimeout(_TIMEOUT)
            server.accept()[0].close()
    except OSError as exc:
        return f"{host}: {_reason(exc)}"
    return ""


@_probe(
    "ipv6",
    "tcp://:PORT serves IPv4 and IPv6 with one dual-stack socket per slot",
    "tcp://:PORT serves IPv4 only; IPv6 addresses cannot be listened on",
    linux_only=False,
)
def _ipv6() -> _Found:
    if not socket.has_ipv6:
        return False, "none", "Python was built without IPv6"
    try:
        server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError as exc:
        return False, "none", f"cannot create an IPv6 socket: {_reason(exc)}"
    with server:
        server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        server.bind(("::", 0))
        server.listen(4)
        problems = [
            _connect_accept(server, socket.AF_INET6, "::1"),
            _connect_accept(server, socket.AF_INET, "127.0.0.1"),
        ]
    if not any(problems):
        return True, "dual-stack", "one [::] socket (IPV6_V6ONLY=0) accepted from ::1 and 127.0.0.1"
    return False, "partial", "; ".join(p for p in problems if p)


@_probe(
    "euid",
    "bind ports < 1024, run workers with --user, set tcp_migrate_req, eBPF steering",
    "no ports < 1024 (unless CAP_NET_BIND_SERVICE), no --user, no eBPF steering",
    linux_only=False,
)
def _euid() -> _Found:
    euid = os.geteuid()
    caps = ", ".join(_caps()) or "none"
    if euid == 0:
        return True, 0, f"root; effective capabilities include: {caps}"
    return False, euid, f"uid {euid}, not root: workers run as this user; capabilities: {caps}"
