"""Probes of the network features: reuseport groups, steering programs, sysctls, IPv6."""

from __future__ import annotations

import ctypes
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from ..linux import bpf
from ..sockets import PLATFORMS, platform_key, somaxconn
from ..steering import ebpf
from ..steering.inflight import InFlight
from .registry import _LINUX, _TIMEOUT, _Failed, _Found, _probe, _reason


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
    "connections skip dead, starting, draining, stalled and overloaded slots, weighted by what "
    "they serve; it cannot count connections per slot nor choose per connection (a stall is "
    "seen from queue growth, at the supervisor's next look)",
    "no steering: a slot with no worker keeps its hash share (its connections wait)",
)
def _reuseport_cbpf() -> _Found:
    prog = bpf.ClassicProgram([(bpf.RET_K, 0, 0, 1)])  # every connection to socket #1
    with _group(2) as socks:
        socks[0].setsockopt(socket.SOL_SOCKET, bpf.SO_ATTACH_REUSEPORT_CBPF, prog.as_option())
        return True, True, f"attached 'ret #1' with SO_ATTACH_REUSEPORT_CBPF: {_steered(socks, 1)}"


@_probe(
    "syn_hold",
    "a handover with one slot or --steering off drops new SYNs for its old worker's graceful "
    "stop, and a stop refuses new connections before the queues empty (SO_ATTACH_FILTER)",
    "there, an idle old worker is killed frozen (nothing lost, its shutdown does not run), and "
    "a connection arriving at the end of a stop is reset; CAP_NET_ADMIN allows it here",
)
def _syn_hold() -> _Found:
    from ..steering import cbpf

    refused = cbpf.drop_syns_refused()
    if refused is not None:
        raise _Failed(f"SO_ATTACH_FILTER refused: {_reason(refused)} (needs CAP_NET_ADMIN)")
    return True, True, "SO_ATTACH_FILTER accepted (the SYN-drop program)"


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
            socks[0].setsockopt(socket.SOL_SOCKET, bpf.SO_ATTACH_REUSEPORT_EBPF, fds[1])
            steered = _steered(socks, 1)
    finally:
        for fd in fds:
            os.close(fd)
    return True, True, f"SK_REUSEPORT program + REUSEPORT_SOCKARRAY map by bpf(2): {steered}"


@_probe(
    "sock_ops_inflight",
    "eBPF steering sends each new connection to the less loaded of two slots by connections in "
    "flight, counted in the kernel (SOCK_OPS on the cgroup v2 its listeners are made in); held "
    "connections cost the supervisor the same at 100 and 100,000",
    "eBPF steering compares queue depths instead; held connections are counted one by one "
    "(less often as they grow)",
)
def _sock_ops_inflight() -> _Found:
    try:
        counts = InFlight(slots=1)
    except ebpf.BpfError as exc:
        raise _Failed(str(exc)) from None
    try:
        if not counts.attach():
            raise _Failed(counts.why)
    finally:
        counts.close()
    return True, True, "SOCK_OPS program attached to this process's cgroup v2 by a bpf link"


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
