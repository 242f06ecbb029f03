"""Probes of the process features: the seccomp trap, pidfd_getfd, worker trees, the user."""

from __future__ import annotations

import errno
import os
import platform
import select
import signal
import socket
from collections.abc import Callable
from contextlib import suppress

from ..interpose import seccomp_sys as sc
from ..linux import cgroup, proc, syscalls, sysctl
from ..linux.exec import ExecSpec, fork_exec
from .registry import _TIMEOUT, _Child, _Failed, _Found, _probe, _reason


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
