"""The examples do what their docstrings say: real processes, real sockets, loopback, port 0."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

import portshard
from tests.conftest import PYTHON, ROOT, Procs

from ._util import launch_with_fds, notify_receiver, read_line, receive_with_pid

EXAMPLES = ROOT / "examples"
ECHO = str(EXAMPLES / "echo_server.py")
HELLO = str(EXAMPLES / "hello_pid.py")


def _start(procs: Procs, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return procs.start(
        [PYTHON, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
        env=env,
    )


def _banner_port(proc: subprocess.Popen[bytes]) -> int:
    line = read_line(proc, stderr=True)
    match = re.search(r":(\d+)/?$", line)
    assert match, line
    return int(match.group(1))


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=10)


def _get(port: int) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_echo_servers_share_a_port_and_prefix_their_pid(procs: Procs) -> None:
    first = _start(procs, ECHO, "tcp://127.0.0.1:0")
    port = _banner_port(first)
    second = _start(procs, ECHO, f"tcp://127.0.0.1:{port}")
    assert _banner_port(second) == port
    pids = {first.pid, second.pid}
    seen = set()
    for _ in range(200):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"hello\nworld\n")
            conn.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := conn.recv(256):
                reply += chunk
        pid = int(reply.split(b":", 1)[0])
        assert reply == b"%d: hello\n%d: world\n" % (pid, pid)
        seen.add(pid)
        if seen == pids:
            break
    assert seen == pids
    assert _stop(first) == 0
    assert _stop(second) == 0


def test_echo_server_udp(procs: Procs) -> None:
    server = _start(procs, ECHO, "udp://127.0.0.1:0")
    port = _banner_port(server)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(5)
        client.sendto(b"ping", ("127.0.0.1", port))
        assert client.recvfrom(64)[0] == b"%d: ping" % server.pid
    assert _stop(server) == 0


def test_echo_server_bad_address_is_a_message_not_a_traceback(procs: Procs) -> None:
    proc = _start(procs, ECHO, "tcp://127.0.0.1:99999")
    assert proc.wait(timeout=10) == 1
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    assert "port 99999 is out of range" in err
    assert "Traceback" not in err


def test_hello_pid_standalone(procs: Procs) -> None:
    server = _start(procs, HELLO, "--listen", "tcp://127.0.0.1:0")
    port = _banner_port(server)
    assert _get(port) == (200, f"Hello from PID {server.pid}\n")
    assert _stop(server) == 0


def test_hello_pid_under_a_supervisor(procs: Procs, short_tmp: Path) -> None:
    """LISTEN_FDS wins over --listen (a UDP address here, which hello_pid would refuse)."""
    notify_path = str(short_tmp / "notify")
    with (
        portshard.listen("tcp://127.0.0.1:0") as sock,
        notify_receiver(notify_path) as receiver,
    ):
        run_hello = f"import runpy; runpy.run_path({HELLO!r}, run_name='__main__')"
        env = {"LISTEN_FDS": "1", "LISTEN_PID": "self", "NOTIFY_SOCKET": notify_path}
        child = launch_with_fds(
            procs, [sock.fileno()], run_hello, env, "--listen", "udp://127.0.0.1:0"
        )
        assert receive_with_pid(receiver) == (b"READY=1", child.pid)
        assert _get(sock.getsockname()[1]) == (200, f"Hello from PID {child.pid}\n")
        assert _stop(child) == 0


def test_hello_pid_port_in_use_is_a_message(procs: Procs) -> None:
    with socket.socket() as plain:
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        port = plain.getsockname()[1]
        proc = _start(procs, HELLO, "--listen", f"tcp://127.0.0.1:{port}")
        assert proc.wait(timeout=10) == 1
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    assert f"pid {os.getpid()}" in err and "without SO_REUSEPORT" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("script", [ECHO, HELLO, str(EXAMPLES / "demo.py")])
def test_examples_say_how_to_run_them(script: str) -> None:
    result = subprocess.run([PYTHON, script, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert "usage:" in result.stdout
