"""portshard.listen on the real kernel: groups of processes, IPv6, dual-stack, and real errors.

Loopback only, port 0 only: the first process binds port 0 and the others join the port it got.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
import sys

import pytest

import portshard
from portshard import AddressError, BindError, ConfigError, PortInUse, PortshardError
from tests.conftest import ROOT, Procs, needs_root

from ._util import (
    AS_NOBODY,
    comm,
    family_of,
    nobody_uid,
    read_line,
    start_group,
    tcp_pids,
    udp_pids,
)

# A member of a group: listen on argv[1], print the port, then answer every connection
# (or datagram) with this process's pid.
TCP_MEMBER = """
import os, sys, portshard
sock = portshard.listen(sys.argv[1])
print(sock.getsockname()[1], flush=True)
while True:
    conn, _ = sock.accept()
    with conn:
        conn.sendall(str(os.getpid()).encode())
"""
UDP_MEMBER = """
import os, sys, portshard
sock = portshard.listen(sys.argv[1])
print(sock.getsockname()[1], flush=True)
while True:
    _, peer = sock.recvfrom(64)
    sock.sendto(str(os.getpid()).encode(), peer)
"""
# Hold a socket on argv[1] WITHOUT SO_REUSEPORT, as most servers do.
PLAIN_HOLDER = """
import socket, sys
kind = socket.SOCK_STREAM if sys.argv[1] == "tcp" else socket.SOCK_DGRAM
sock = socket.socket(socket.AF_INET, kind)
sock.bind(("127.0.0.1", 0))
if kind == socket.SOCK_STREAM:
    sock.listen()
print(sock.getsockname()[1], flush=True)
sys.stdin.read()
"""
NOBODY_GROUP = (
    AS_NOBODY
    + """
sock = portshard.listen(sys.argv[1])
print(sock.getsockname()[1], flush=True)
sys.stdin.read()
"""
)
NOBODY_LISTEN = (
    AS_NOBODY
    + """
try:
    portshard.listen(sys.argv[1])
except portshard.BindError as exc:
    print(type(exc).__name__, exc.errno, exc, flush=True)
    sys.exit(0)
print("bound", flush=True)
"""
)

GROUPS = [
    pytest.param("127.0.0.1", id="ipv4"),
    pytest.param("::1", id="ipv6"),
]


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@pytest.mark.parametrize("host", GROUPS)
def test_processes_share_a_tcp_port_and_all_get_connections(procs: Procs, host: str) -> None:
    port, children = start_group(
        procs, TCP_MEMBER, f"tcp://{_host(host)}:0", 4, template=f"tcp://{_host(host)}:{{port}}"
    )
    pids = {child.pid for child in children}
    served = tcp_pids(host, port, want=pids, limit=400)
    assert set(served) <= pids
    assert len(served) >= 2, f"connections were not spread: {served}"
    assert set(served) == pids, f"some members got nothing in {sum(served.values())}: {served}"


@pytest.mark.parametrize("host", GROUPS)
def test_udp_flows_spread_over_a_group_of_processes(procs: Procs, host: str) -> None:
    port, children = start_group(
        procs, UDP_MEMBER, f"udp://{_host(host)}:0", 4, template=f"udp://{_host(host)}:{{port}}"
    )
    pids = {child.pid for child in children}
    served = udp_pids(host, port, want=pids, limit=400)
    assert set(served) <= pids
    assert len(served) >= 2, f"datagrams were not spread: {served}"
    assert set(served) == pids, f"some members got nothing in {sum(served.values())}: {served}"


def test_one_udp_flow_stays_on_one_process(procs: Procs) -> None:
    port, _ = start_group(
        procs, UDP_MEMBER, "udp://127.0.0.1:0", 3, template="udp://127.0.0.1:{port}"
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(5)
        answers = set()
        for _ in range(20):
            client.sendto(b"pid?", ("127.0.0.1", port))
            answers.add(client.recvfrom(64)[0])
    assert len(answers) == 1, f"one source address and port reached several members: {answers}"


def test_ipv6_loopback_socket() -> None:
    with portshard.listen("tcp://[::1]:0") as sock:
        assert sock.family == socket.AF_INET6
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        port = sock.getsockname()[1]
        with socket.create_connection(("::1", port), timeout=5):
            conn, peer = sock.accept()
            conn.close()
        assert peer[0] == "::1"


@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_wildcard_is_dual_stack(kind: str) -> None:
    with portshard.listen(f"{kind}://:0") as sock:
        assert sock.family == socket.AF_INET6
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        port = sock.getsockname()[1]
        peers = []
        for host in ("127.0.0.1", "::1"):
            if kind == "tcp":
                with socket.create_connection((host, port), timeout=5):
                    conn, peer = sock.accept()
                    conn.close()
            else:
                with socket.socket(family_of(host), socket.SOCK_DGRAM) as client:
                    client.sendto(b"hi", (host, port))
                    sock.settimeout(5)
                    _, peer = sock.recvfrom(16)
            peers.append(peer[0])
    assert peers == ["::ffff:127.0.0.1", "::1"]


def test_explicit_ipv6_any_does_not_take_ipv4() -> None:
    with portshard.listen("tcp://[::]:0") as sock:
        port = sock.getsockname()[1]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_listen_sets_reuseport_close_on_exec_and_backlog() -> None:
    with portshard.listen("tcp://127.0.0.1:0", backlog=7) as sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert not sock.get_inheritable()
    with portshard.listen("udp://127.0.0.1:0", inheritable=True) as sock:
        assert sock.get_inheritable()
        assert sock.type == socket.SOCK_DGRAM
    with portshard.listen("tcp://127.0.0.1:0", reuseport=False) as sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0


@pytest.mark.parametrize("backlog", [0, -1, True, 1.5, "10"])
def test_bad_backlog(backlog: object) -> None:
    with pytest.raises(ConfigError, match=f"backlog must be a whole number >= 1, not {backlog!r}"):
        portshard.listen("tcp://127.0.0.1:0", backlog=backlog)  # type: ignore[arg-type]


@pytest.mark.parametrize("backlog", [2**31, 2**64])
def test_a_backlog_above_a_c_int_is_clamped_as_the_kernel_clamps_it(backlog: int) -> None:
    with portshard.listen("tcp://127.0.0.1:0", backlog=backlog) as sock:
        assert sock.getsockname()[1] > 0


@pytest.mark.parametrize(
    ("address", "says"),
    [
        (portshard.Address(portshard.Proto.TCP, "127.0.0.1", 70000), "port 70000 is out of range"),
        (portshard.Address(portshard.Proto.UDP, "127.0.0.1", -1), "port -1 is out of range"),
        (portshard.Address("tcp", "127.0.0.1", 0), "proto must be portshard.Proto.TCP"),  # type: ignore[arg-type]
        (b"tcp://127.0.0.1:0", "must be a string, not b'tcp"),
        (None, "must be a string, not None"),
    ],
)
def test_a_hand_made_or_mistyped_address_is_refused_not_wrapped(address: object, says: str) -> None:
    # Before: Address(TCP, host, 70000) bound port 4464 (getaddrinfo wraps it), the others
    # raised AttributeError.
    with pytest.raises(AddressError, match=re.escape(says)):
        portshard.listen(address)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- real errors


@pytest.mark.parametrize(
    ("address", "says"),
    [
        ("http://127.0.0.1:0", "unknown scheme 'http'"),
        ("127.0.0.1", "has no port"),
        ("tcp://::1:0", "must be in brackets"),
        ("tcp://127.0.0.1:65536", "port 65536 is out of range; use 0-65535"),
        ("udp://127.0.0.1:99999", "port 99999 is out of range"),
    ],
)
def test_bad_address(address: str, says: str) -> None:
    with pytest.raises(AddressError, match=says):
        portshard.listen(address)


def test_host_that_does_not_resolve() -> None:
    with pytest.raises(AddressError) as info:
        portshard.listen("tcp://no-such-host.invalid:0")
    message = str(info.value)
    assert "'no-such-host.invalid' does not resolve" in message
    assert "use an IP address" in message


@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_port_held_without_reuseport_names_pid_and_program(procs: Procs, kind: str) -> None:
    holder = procs.python(
        PLAIN_HOLDER, kind, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
    )
    port = int(read_line(holder))
    with pytest.raises(PortInUse) as info:
        portshard.listen(f"{kind}://127.0.0.1:{port}")
    exc = info.value
    message = str(exc)
    assert exc.errno == errno.EADDRINUSE
    assert isinstance(exc, BindError) and isinstance(exc, OSError)
    assert message.startswith(f"cannot bind {kind}://127.0.0.1:{port}: "), message
    assert f"pid {holder.pid} ({comm(holder.pid)})" in message
    assert "without SO_REUSEPORT" in message
    assert "stop it or let it set SO_REUSEPORT" in message


@pytest.mark.parametrize("kind", ["tcp", "udp"])
@pytest.mark.parametrize(
    ("first", "second"),
    [("0.0.0.0", ""), ("0.0.0.0", "127.0.0.1"), ("127.0.0.1", "0.0.0.0")],
)
def test_the_same_port_on_an_overlapping_address_is_refused_not_split(
    procs: Procs, kind: str, first: str, second: str
) -> None:
    # Linux groups reuseport sockets by exact address: tcp://:P beside tcp://0.0.0.0:P would
    # get no IPv4 connection, tcp://127.0.0.1:P every loopback one. Refused, naming the form
    # that joins.
    code = TCP_MEMBER if kind == "tcp" else UDP_MEMBER
    member = procs.python(code, f"{kind}://{first}:0", stdout=subprocess.PIPE, bufsize=0)
    port = int(read_line(member))
    with pytest.raises(PortInUse) as info:
        portshard.listen(f"{kind}://{second}:{port}")
    message = str(info.value)
    assert f"pid {member.pid} ({comm(member.pid)}) on {first}:{port}" in message, message
    assert "balances only sockets bound to the same address" in message
    assert f"listen on {kind}://{first}:{port} as it does" in message
    with portshard.listen(f"{kind}://{first}:{port}"):  # the form it names joins
        pass
    with portshard.listen(f"{kind}://[::1]:{port}"):  # IPv6-only overlaps nothing IPv4
        pass


def test_one_process_may_hold_overlapping_addresses_it_serves_itself() -> None:
    # A supervisor with --listen tcp://:P --listen tcp://127.0.0.1:P gives every worker both.
    with portshard.listen("tcp://127.0.0.1:0") as first:
        port = first.getsockname()[1]
        with portshard.listen(f"tcp://:{port}"), portshard.listen(f"tcp://:{port}"):
            pass


def test_sharing_refused_when_asked_not_to_share() -> None:
    with portshard.listen("tcp://127.0.0.1:0") as group:
        port = group.getsockname()[1]
        with pytest.raises(PortInUse) as info:
            portshard.listen(f"tcp://127.0.0.1:{port}", reuseport=False)
    message = str(info.value)
    assert f"pid {os.getpid()}" in message
    assert "asked not to share (reuseport=False)" in message
    assert "pass reuseport=True" in message


@needs_root
@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_root_cannot_join_nobodys_group(procs: Procs, kind: str) -> None:
    nobody_uid()
    group = procs.python(
        NOBODY_GROUP,
        f"{kind}://127.0.0.1:0",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )
    port = int(read_line(group))
    with pytest.raises(PortInUse) as info:
        portshard.listen(f"{kind}://127.0.0.1:{port}")
    message = str(info.value)
    assert f"pid {group.pid} ({comm(group.pid)})" in message
    assert "owned by nobody" in message
    assert "created by the same effective user (root is not nobody)" in message
    assert "create the sockets as nobody" in message


@needs_root
@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_nobody_cannot_join_roots_group(procs: Procs, kind: str) -> None:
    nobody_uid()
    with portshard.listen(f"{kind}://127.0.0.1:0") as group:
        port = group.getsockname()[1]
        child = procs.python(
            NOBODY_LISTEN,
            f"{kind}://127.0.0.1:{port}",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
        )
        line = read_line(child)
    assert line.startswith(f"PortInUse {errno.EADDRINUSE} cannot bind"), line
    assert "owned by root" in line
    assert "created by the same effective user (nobody is not root)" in line
    assert child.wait(timeout=10) == 0


@needs_root
def test_low_port_as_nobody_is_permission_denied(procs: Procs) -> None:
    nobody_uid()
    with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
        start = int(f.read())
    if start <= 1:
        pytest.skip("net.ipv4.ip_unprivileged_port_start lets anyone bind port 1 here")
    child = procs.python(
        NOBODY_LISTEN,
        "tcp://127.0.0.1:1",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )
    line = read_line(child)
    assert line.startswith(f"BindError {errno.EACCES} cannot bind tcp://127.0.0.1:1: "), line
    assert f"port 1 is below net.ipv4.ip_unprivileged_port_start ({start} here)" in line
    assert "CAP_NET_BIND_SERVICE" in line
    assert f"use a port >= {start}" in line


@pytest.mark.parametrize(
    ("host", "shown"), [("192.0.2.1", "192.0.2.1"), ("2001:db8::1", "[2001:db8::1]")]
)
def test_address_not_on_this_machine(host: str, shown: str) -> None:
    with socket.socket(family_of(host), socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError as probe_error:
            if probe_error.errno != errno.EADDRNOTAVAIL:
                raise
        else:
            pytest.skip(f"{host} is an address of this machine (or nonlocal bind is on)")
    with pytest.raises(BindError) as info:
        portshard.listen(f"tcp://{shown}:0")
    exc = info.value
    assert exc.errno == errno.EADDRNOTAVAIL
    assert str(exc).startswith(f"cannot bind tcp://{shown}:0: {host} is not an address")
    assert "'ip addr'" in str(exc)
    assert "tcp://:0 for every interface" in str(exc)


def test_every_error_is_one_family() -> None:
    for bad in ("tcp://127.0.0.1:65536", "tcp://no-such-host.invalid:0"):
        with pytest.raises(PortshardError):
            portshard.listen(bad)


def test_cli_bad_input_exits_nonzero_with_a_message_and_no_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "portshard", "doctor", "--bogus"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert re.search(r"No such option:? .?--bogus", result.stderr), result.stderr
    assert "Usage:" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
