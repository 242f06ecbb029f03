"""Create port-sharing sockets, and the table of what each OS does with them.

Design note: the OS decision is a pure function of the platform name (``decide``), so every row
of the table is unit-tested on Linux. Only ``listen`` touches the kernel.
"""

from __future__ import annotations

import errno
import os
import pwd
import socket
import sys
from dataclasses import dataclass

from .address import Address, Proto, Resolved, parse, resolve
from .errors import AddressError, BindError, ConfigError, PortInUse, ReuseportUnsupported
from .linux import proc, sockdiag, sysctl

__all__ = [
    "DEFAULT_BACKLOG",
    "PLATFORMS",
    "Platform",
    "decide",
    "listen",
    "platform_key",
    "somaxconn",
]


@dataclass(frozen=True)
class Platform:
    name: str
    option: str | None  # the socket option that shares a port, None if there is none
    balanced: bool  # does the kernel spread connections over the group?
    behaviour: str


_LAST_BOUND_WINS = "not balanced: the last bound socket takes every new connection"

PLATFORMS: dict[str, Platform] = {
    "linux": Platform(
        "Linux",
        "SO_REUSEPORT",
        True,
        "balanced by hash (3.9+); a closing listener resets its queued connections "
        "unless net.ipv4.tcp_migrate_req=1 (5.14+)",
    ),
    "freebsd": Platform(
        "FreeBSD",
        "SO_REUSEPORT_LB",
        True,
        "SO_REUSEPORT_LB balances (12+, up to 256 sockets); plain SO_REUSEPORT is last-bind-wins",
    ),
    "dragonfly": Platform(
        "DragonFly BSD",
        "SO_REUSEPORT",
        True,
        "balanced; a member leaves without dropping the others' connections",
    ),
    "netbsd": Platform("NetBSD", "SO_REUSEPORT", False, _LAST_BOUND_WINS),
    "openbsd": Platform("OpenBSD", "SO_REUSEPORT", False, _LAST_BOUND_WINS),
    "darwin": Platform("macOS", "SO_REUSEPORT", False, _LAST_BOUND_WINS),
    "win32": Platform("Windows", None, False, "no port sharing option at all"),
    "cygwin": Platform("Cygwin", None, False, "runs on Windows sockets, which cannot share a port"),
}

# Values of options Python may not export on the running platform.
_OPTION_VALUES = {"SO_REUSEPORT_LB": 0x00010000}


def platform_key(system: str = sys.platform) -> str:
    """Map a ``sys.platform`` value (``linux``, ``freebsd14``, ``darwin``...) to a table key."""
    for key in PLATFORMS:
        if system.startswith(key):
            return key
    return system


def decide(system: str = sys.platform, *, balance: bool = True) -> str:
    """Return the socket option that shares a port on ``system``, or raise ReuseportUnsupported.

    ``balance=False`` accepts systems where the group is not load balanced (the last bound
    socket takes new connections): useful for handing a port over, not for sharding.
    """
    key = platform_key(system)
    plat = PLATFORMS.get(key)
    if plat is None:
        raise ReuseportUnsupported(
            f"port sharing on {system!r} is unknown to portshard; "
            f"run 'portshard doctor' there and report what it says, or pass reuseport=False"
        )
    if plat.option is None:
        raise ReuseportUnsupported(
            f"cannot share a port on {plat.name} ({system!r}): {plat.behaviour}; run one "
            f"listener (reuseport=False), or put a proxy in front of several ports"
        )
    if balance and not plat.balanced:
        raise ReuseportUnsupported(
            f"cannot balance a shared port on {plat.name} ({system!r}): {plat.behaviour}; "
            f"pass balance=False to share it anyway (for a hand-over, not for sharding), "
            f"or run on Linux, FreeBSD or DragonFly BSD"
        )
    return plat.option


def _option_value(name: str) -> int:
    value = getattr(socket, name, None)
    if isinstance(value, int):
        return value
    return _OPTION_VALUES[name]


def somaxconn() -> int | None:
    """The kernel's cap on a listen backlog, or None where it can't be read."""
    return sysctl.somaxconn()


# Ask for the most a 16-bit backlog field holds; the kernel silently clamps it to somaxconn
# (4096 by default since Linux 5.4). The effective value is what TCP_INFO reports on the listener.
DEFAULT_BACKLOG = 0xFFFF


def listen(
    address: str | Address,
    *,
    backlog: int = DEFAULT_BACKLOG,
    reuseport: bool = True,
    balance: bool = True,
    inheritable: bool = False,
) -> socket.socket:
    """Open a bound socket on ``address`` (listening, for TCP) that shares its port.

    A second call on the same concrete port (same user) joins the same group, and the kernel
    spreads new connections (TCP) or flows (UDP) over the group's sockets. ``tcp://:PORT``
    listens on every interface, dual-stack where IPv6 exists. Raises a PortshardError subclass
    whose message says what went wrong and how to fix it.

    With asyncio, pass the socket as ``sock=``; the loop makes it non-blocking and closes it
    with the server (see docs/library.md)::

        server = await asyncio.start_server(handle, sock=portshard.listen("tcp://:8080"))
        transport, _ = await loop.create_datagram_endpoint(
            Protocol, sock=portshard.listen("udp://:8080")
        )
    """
    addr = _checked(address) if isinstance(address, Address) else parse(address)
    if isinstance(backlog, bool) or not isinstance(backlog, int) or backlog < 1:
        raise ConfigError(f"backlog must be a whole number >= 1, not {backlog!r}")
    # listen() takes a C int; the kernel clamps any backlog to net.core.somaxconn anyway.
    backlog = min(backlog, _MAX_BACKLOG)
    option = decide(balance=balance) if reuseport else None
    target = resolve(addr)
    try:
        sock = socket.socket(target.family, addr.proto.socktype)
    except OSError as exc:
        if target.family == socket.AF_INET6:
            fix = "IPv6 may be disabled here: listen on an IPv4 address such as 0.0.0.0"
        else:
            fix = "check the open-file limit (ulimit -n)"
        raise BindError(
            exc.errno, f"cannot create a socket for {addr}: {exc.strerror or exc}; {fix}"
        ) from None
    try:
        if addr.proto is Proto.TCP:
            # Lets a restarted server bind while old connections sit in TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if option is not None:
            sock.setsockopt(socket.SOL_SOCKET, _option_value(option), 1)
        if target.family == socket.AF_INET6:
            # Set on purpose both ways: the default (net.ipv6.bindv6only) varies by host.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if target.dualstack else 1)
        try:
            sock.bind(target.sockaddr)
        except OSError as exc:
            raise _bind_error(target, exc, reuseport=option is not None) from None
        if addr.proto is Proto.TCP:
            try:
                sock.listen(backlog)
            except OSError as exc:
                # Rare but real: another socket bound with SO_REUSEADDR started listening
                # between our bind() and listen().
                raise _bind_error(target, exc, reuseport=option is not None) from None
        if option is not None and addr.port != 0 and sys.platform.startswith("linux"):
            _check_one_group(sock, target)
        sock.set_inheritable(inheritable)
    except BaseException:
        sock.close()
        raise
    return sock


def join_refusal(address: Address) -> BindError | None:
    """Why ``listen(address)`` could not join the TCP port's group at all (a holder without
    SO_REUSEPORT, or one of another user): the error its bind would raise, or None if it
    would bind (or it is not TCP on Linux). Only binds, never listens: a bound TCP socket is
    not in the kernel's lookup, so it takes no connection from the holders."""
    if address.proto is not Proto.TCP or not sys.platform.startswith("linux"):
        return None
    target = resolve(address)
    try:
        sock = socket.socket(target.family, socket.SOCK_STREAM)
    except OSError:
        return None  # listen() says why, with its fix
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if target.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if target.dualstack else 1)
        try:
            sock.bind(target.sockaddr)
        except OSError as exc:
            return (
                _bind_error(target, exc, reuseport=True) if exc.errno == errno.EADDRINUSE else None
            )
    return None


def _covers(mine: Resolved, theirs: str) -> bool:
    """Whether a socket on ``theirs`` ("1.2.3.4:P", "[::1]:P") takes some of the traffic
    ``mine`` would get, from another port-sharing group.

    Linux groups SO_REUSEPORT sockets by exact bound address, and a connection goes to the
    most specific group: 127.0.0.1:P beside 0.0.0.0:P takes every loopback connection, and
    0.0.0.0:P beside a dual-stack [::]:P every IPv4 one. A foreign [::]:P may be IPv6-only
    (/proc does not say), so it is left out for an IPv4 socket.
    """
    host = theirs.rsplit(":", 1)[0]
    my_host = str(mine.sockaddr[0])
    if host.startswith("["):
        if mine.family != socket.AF_INET6:
            return False
        host = host[1:-1]
        return host != my_host and "::" in (host, my_host)
    if mine.family == socket.AF_INET6:
        return mine.dualstack
    return host != my_host and "0.0.0.0" in (host, my_host)


def _check_one_group(sock: socket.socket, target: Resolved) -> None:
    """Refuse a socket that joins no group of its port's other sockets but splits it.

    A process calling listen("tcp://:P") to join one bound by listen("tcp://0.0.0.0:P")
    otherwise gets no IPv4 connection at all, and nothing says why. A socket this process holds
    itself is no such split: it serves both groups (a supervisor with tcp://:P and
    tcp://127.0.0.1:P gives every worker both).
    """
    me = os.geteuid()
    mine = os.fstat(sock.fileno()).st_ino
    port = target.address.port
    proto = target.address.proto
    own: set[int] | None = None
    for inode, uid, local in sockdiag.port_sockets(proto, port):
        if inode == mine or uid != me or not _covers(target, local):
            continue
        own = proc.sockets_of(os.getpid()) if own is None else own
        if inode in own:  # this process serves both groups (two --listen of one supervisor)
            continue
        holder = next((h for h in sockdiag.port_holders(proto, port) if h.inode == inode), None)
        who = holder.describe() if holder is not None else f"a socket on {local}"
        theirs = local.rsplit(":", 1)[0]
        raise PortInUse(
            errno.EADDRINUSE,
            f"cannot share {target.address}: {who} shares port {port} on another address, and "
            f"Linux balances only sockets bound to the same address: {theirs} and "
            f"{target.sockaddr[0]} would be two groups, the more specific one taking every "
            f"connection both could get; listen on {proto.value}://{theirs}:{port} as it does, "
            f"to join it, or use another port",
        )


_MAX_BACKLOG = 2**31 - 1


def _checked(address: Address) -> Address:
    """An Address built by hand: getaddrinfo would take port 70000 as 4464 and bind that."""
    port = address.port
    if not isinstance(address.proto, Proto) or not isinstance(address.host, str):
        raise AddressError(
            f"{address!r}: proto must be portshard.Proto.TCP or .UDP and host a string; "
            f"or pass the address as a string such as 'tcp://127.0.0.1:8080'"
        )
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise AddressError(
            f"{address!r}: port {port!r} is out of range; use 0-65535 (0 = any free port)"
        )
    return address


def _unprivileged_port_start() -> int:
    """Linux's lowest port a user without CAP_NET_BIND_SERVICE may bind (1024 by default)."""
    if not sys.platform.startswith("linux"):
        return 1024
    value = sysctl.unprivileged_port_start()
    return 1024 if value is None else value  # before Linux 4.11 the limit was fixed


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _bind_error(target: Resolved, exc: OSError, *, reuseport: bool) -> BindError:
    where = f"cannot bind {target.address}"
    code = exc.errno
    if code == errno.EADDRINUSE:
        return _in_use(target, reuseport=reuseport)
    if code == errno.EACCES:
        port = target.address.port
        start = _unprivileged_port_start()
        if 0 < port < start:
            return BindError(
                code,
                f"{where}: permission denied: port {port} is below "
                f"net.ipv4.ip_unprivileged_port_start ({start} here), so binding it needs root "
                f"or CAP_NET_BIND_SERVICE; run as root (portshard run binds, then --user drops "
                f"privileges), or use a port >= {start}",
            )
        return BindError(
            code,
            f"{where}: permission denied by a security policy (SELinux, AppArmor, a cgroup "
            f"BPF program or a container's seccomp profile); check the system's audit log, "
            f"or use another address",
        )
    if code == errno.EADDRNOTAVAIL:
        return BindError(
            code,
            f"{where}: {target.sockaddr[0]} is not an address of this machine; "
            f"use one shown by 'ip addr', or tcp://:{target.address.port} for every interface",
        )
    return BindError(code, f"{where}: {exc.strerror or exc}")


def _in_use(target: Resolved, *, reuseport: bool) -> PortInUse:
    where = f"cannot bind {target.address}"
    port = target.address.port
    holders = sockdiag.port_holders(target.address.proto, port)
    me = os.geteuid()
    foreign = [h for h in holders if h.uid != me]
    if reuseport and foreign:
        h = foreign[0]
        return PortInUse(
            errno.EADDRINUSE,
            f"{where}: the port is held by {h.describe()}, owned by {_user_name(h.uid)}, "
            f"and Linux lets a socket join a port-sharing group only if it was created by the "
            f"same effective user ({_user_name(me)} is not {_user_name(h.uid)}); create the "
            f"sockets as {_user_name(h.uid)} (portshard run binds as root and runs workers "
            f"with --user), or stop the other holder",
        )
    if holders:
        h = holders[0]
        if reuseport:
            why = "without SO_REUSEPORT"
            fix = "stop it or let it set SO_REUSEPORT (portshard preload does that for any program)"
        else:
            why = "and this socket was asked not to share (reuseport=False)"
            fix = "stop it, or pass reuseport=True if both should share the port"
        return PortInUse(
            errno.EADDRINUSE, f"{where}: port {port} is held by {h.describe()} {why}; {fix}"
        )
    return PortInUse(
        errno.EADDRINUSE,
        f"{where}: port {port} is in use by a socket this process cannot see (another "
        f"user's process without /proc access, or a connection still closing); "
        f"find it with 'ss -lptn sport = :{port}' as root, or pick another port",
    )
