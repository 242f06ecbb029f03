"""Helpers for tests that run real child processes on real sockets (loopback, port 0)."""

from __future__ import annotations

import os
import pwd
import selectors
import socket
import struct
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import Procs

# Children that drop to `nobody` import everything they need first: after setresuid they may
# not be able to read the interpreter's own directory (here it lives under /root), and
# getaddrinfo() lazily imports the idna codec.
AS_NOBODY = """
import encodings.idna, os, pwd, sys
import portshard
_nobody = pwd.getpwnam("nobody")
os.setgroups([])
os.setresgid(_nobody.pw_gid, _nobody.pw_gid, _nobody.pw_gid)
os.setresuid(_nobody.pw_uid, _nobody.pw_uid, _nobody.pw_uid)
"""


def nobody_uid() -> int:
    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        pytest.skip("no user 'nobody' on this machine")


def read_line(proc: subprocess.Popen[bytes], timeout: float = 10.0, *, stderr: bool = False) -> str:
    """One line of ``proc``'s stdout (or stderr), started with PIPE and bufsize=0."""
    stream = proc.stderr if stderr else proc.stdout
    assert stream is not None
    deadline = time.monotonic() + timeout
    line = b""
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise AssertionError(f"pid {proc.pid} printed no line in {timeout}s: {line!r}")
            byte = stream.read(1)
            if not byte:
                err = b""
                if proc.stderr is not None and not stderr:
                    proc.wait(timeout=5)
                    err = proc.stderr.read()
                raise AssertionError(
                    f"pid {proc.pid} exited ({proc.poll()}) before printing a line; "
                    f"stdout {line!r}, stderr:\n{err.decode(errors='replace')}"
                )
            line += byte
    return line.decode().strip()


def start_group(
    procs: Procs, code: str, first: str, count: int, *, template: str
) -> tuple[int, list[subprocess.Popen[bytes]]]:
    """Start ``count`` children running ``code ADDRESS``; the first binds ``first`` (port 0).

    Each child prints its bound port once listening. The rest get ``template.format(port=P)``,
    so all join the first one's group. Returns the port and the children.
    """
    children: list[subprocess.Popen[bytes]] = []
    port = 0
    for i in range(count):
        address = first if i == 0 else template.format(port=port)
        child = procs.python(
            code, address, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
        )
        children.append(child)
        got = int(read_line(child))
        if i == 0:
            port = got
        assert got == port, f"child {i} bound port {got}, not the group's port {port}"
    return port, children


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def tcp_pids(host: str, port: int, want: set[int], limit: int = 400) -> Counter[int]:
    """Connect (a new source port each time) until every pid in ``want`` has answered."""
    seen: Counter[int] = Counter()
    for _ in range(limit):
        with socket.create_connection((host, port), timeout=5) as conn:
            data = b""
            while chunk := conn.recv(64):
                data += chunk
        seen[int(data)] += 1
        if set(seen) >= want:
            break
    return seen


def udp_pids(host: str, port: int, want: set[int], limit: int = 400) -> Counter[int]:
    """One datagram from each of up to ``limit`` fresh sockets, until every pid has answered."""
    seen: Counter[int] = Counter()
    for _ in range(limit):
        with socket.socket(family_of(host), socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            client.sendto(b"pid?", (host, port))
            data, _ = client.recvfrom(64)
        seen[int(data)] += 1
        if set(seen) >= want:
            break
    return seen


def process_gone(pid: int) -> bool:
    """True once ``pid`` no longer exists, or is only a zombie left for a parent to reap."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def is_root() -> bool:
    return os.geteuid() == 0


# Put the fds named in argv[1] ("7,9") at 3, 4, ... as a supervisor does, set LISTEN_PID to
# this pid if it is "self", then exec python running argv[2]: exec keeps the pid, so the
# program sees LISTEN_PID equal to its own pid, as under systemd.
_LAUNCH = """
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",") if fd]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
if os.environ.get("LISTEN_PID") == "self":
    os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-c", *sys.argv[2:]])
"""


def launch_with_fds(
    procs: Procs, fds: list[int], code: str, env: dict[str, str], *args: str
) -> subprocess.Popen[bytes]:
    """Run ``code`` (with ``args``) in a child that finds ``fds`` at 3, 4, ... and ``env``."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    full.update(env)
    return procs.python(
        _LAUNCH,
        ",".join(map(str, fds)),
        code,
        *args,
        pass_fds=fds,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )


def notify_receiver(address: str) -> socket.socket:
    """A NOTIFY_SOCKET as a supervisor has it: AF_UNIX datagrams, sender credentials on."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.settimeout(10)
    return sock


def receive_with_pid(sock: socket.socket) -> tuple[bytes, int]:
    """One datagram and the sender's pid, as the kernel vouches for it (SCM_CREDENTIALS)."""
    data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
    pid: int = next(
        struct.unpack("3i", cdata)[0]
        for level, kind, cdata in ancillary
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
    )
    return data, pid


def write_config(path: Path, command: list[str], workers: int) -> None:
    """A portshard.toml running ``command`` with ``workers`` workers on a loopback port 0."""
    quoted = ", ".join(f'"{arg}"' for arg in command)
    path.write_text(f'command = [{quoted}]\nlisten = ["tcp://127.0.0.1:0"]\nworkers = {workers}\n')


def reuseport_listeners(n: int, socks: list[socket.socket]) -> list[socket.socket]:
    """``n`` TCP listeners of one reuseport group on a free loopback port, appended to
    ``socks`` as they are made (the caller closes them, also when this raises)."""
    for _ in range(n):
        sock = socket.socket()
        socks.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", socks[0].getsockname()[1] if len(socks) > 1 else 0))
        sock.listen(64)
    return socks
