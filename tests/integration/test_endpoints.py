"""The control socket and the web endpoint under abuse (issue 14): connection floods at a low
descriptor limit, a full control queue, DNS rebinding, and --control pointing at something
that is not a stale socket of ours. The supervisor keeps serving its port through all of it."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from portshard.control.client import request
from portshard.endpoint import Limits, Peer, StreamServer
from tests.conftest import wait_until
from tests.supervisor_fixture import FDWORKER, PORTSHARD, Running, Start


def http(port: int, path: str = "/", host: str | None = "127.0.0.1") -> tuple[int, bytes]:
    head = f"GET {path} HTTP/1.0\r\n" + (f"Host: {host}\r\n" if host else "") + "\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head.encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


def served(port: int) -> str:
    return http(port, "/")[1].decode()


def metrics_port(st: dict[str, object]) -> int:
    return int(str(st["metrics"]).rsplit(":", 1)[1].split("/")[0])


@contextlib.contextmanager
def idle_flood(sup: Running, port: int, target: int) -> Iterator[None]:
    """400 idle connections to ``target`` (an endpoint of the supervisor, whose descriptor limit
    the caller lowered to 256), held for three of its sampling rounds while ``port`` keeps
    serving; the caller's block runs under the flood, then the descriptors are counted."""
    assert sup.proc is not None
    flood: list[socket.socket] = []
    try:
        for _ in range(400):
            s = socket.socket()
            s.setblocking(False)
            flood.append(s)
            err = s.connect_ex(("127.0.0.1", target))
            assert err in (0, errno.EINPROGRESS), os.strerror(err)
        deadline = time.monotonic() + 3.0  # three sampling rounds of the supervisor
        while time.monotonic() < deadline:
            assert sup.proc.poll() is None, f"the supervisor died:\n{sup.text()}"
            assert served(port).startswith(("0 ", "1 "))
            time.sleep(0.2)
        yield
        fds = len(os.listdir(f"/proc/{sup.proc.pid}/fd"))
        assert fds < 256 - 32, f"{fds} descriptors open: the caps do not hold"
    finally:
        for s in flood:
            s.close()


def test_a_flood_of_idle_metrics_connections_at_a_low_fd_limit_takes_nothing_down(
    start: Start,
) -> None:
    # issue 14 item 1: with `ulimit -n 256`, 400 idle connections to --metrics made the
    # supervisor's sampling fail with EMFILE, and it killed every worker.
    sup = start(
        "-w", "2", "--listen", "tcp://127.0.0.1:0", "--metrics", "127.0.0.1:0", "--", *FDWORKER
    )  # fmt: skip
    assert sup.proc is not None
    resource.prlimit(sup.proc.pid, resource.RLIMIT_NOFILE, (256, 256))
    st = sup.status()
    port, mport = sup.port, metrics_port(st)
    with idle_flood(sup, port, mport):
        after = sup.status()
        assert [s["state"] for s in after["slots"]] == ["ready", "ready"]
        assert [s["pid"] for s in after["slots"]] == [s["pid"] for s in st["slots"]]
    # The flood gone, the endpoint answers again (its idle peers expired, its queue drained).
    code, body = wait_until(lambda: http(mport, "/metrics"), 20, "metrics answers again")
    assert code == 200 and b"portshard_workers 2.0" in body
    assert sup.proc.poll() is None


def test_the_web_endpoint_answers_only_its_own_names(shared_sup: Running) -> None:
    # issue 14 item 8: any Host was answered, so a page on evil.example whose name is
    # re-pointed at 127.0.0.1 (DNS rebinding) could read /api/status.
    sup = shared_sup
    mport = metrics_port(sup.status())
    for host in ("evil.example", f"evil.example:{mport}", "10.1.2.3", "127.0.0.1.evil.example"):
        code, body = http(mport, "/api/status", host)
        assert code == 421, host
        assert b"DNS rebinding" in body and f"http://127.0.0.1:{mport}/".encode() in body
    for host in (f"127.0.0.1:{mport}", "localhost", f"localhost:{mport}", "[::1]", None):
        code, body = http(mport, "/api/status", host)
        assert code == 200, host
        assert json.loads(body)["status"]["workers"] == 1


def test_200_concurrent_status_calls_all_get_answers(shared_sup: Running) -> None:
    # issue 14 item 8: the control backlog was 16 and the 17th caller got a BlockingIOError
    # traceback.
    sup = shared_sup
    barrier = threading.Barrier(200)
    answers: list[object] = []

    def ask() -> None:
        barrier.wait(30)
        try:
            answers.append(request(sup.control, "status", timeout=60)["workers"])
        except Exception as exc:
            answers.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert answers == [1] * 200, [a for a in answers if a != 1][:3]


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PORTSHARD, *args], capture_output=True, text=True, timeout=timeout)


def test_the_cli_says_in_one_line_what_is_wrong_with_the_control_socket(short_tmp: Path) -> None:
    stale = short_tmp / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # bound, never listening: what a killed supervisor leaves
    busy = short_tmp / "busy.sock"
    plain = short_tmp / "plain"
    plain.write_text("x")
    with socket.socket(socket.AF_UNIX) as full:
        full.bind(str(busy))
        full.listen(0)
        held = []
        with contextlib.suppress(BlockingIOError):  # fill its queue: it never accepts
            for _ in range(8):
                c = socket.socket(socket.AF_UNIX)
                c.setblocking(False)
                held.append(c)
                c.connect(str(busy))
        cases = {
            short_tmp / "absent.sock": "no supervisor at",
            stale: "no supervisor listening at",
            plain: "no supervisor listening at",
            busy: "is busy",
        }
        for path, message in cases.items():
            res = cli("status", "--control", str(path))
            lines = res.stderr.strip().splitlines()
            assert res.returncode == 1, res.stderr
            assert len(lines) == 1 and message in lines[0] and str(path) in lines[0], lines
            assert "Traceback" not in res.stderr
        for c in held:
            c.close()


def _run_on(control: Path) -> subprocess.CompletedProcess[str]:
    return cli(
        "run", "--control", str(control), "--listen", "tcp://127.0.0.1:0", "-w", "1", *FDWORKER,
        timeout=30,
    )  # fmt: skip


def test_control_never_removes_what_is_not_a_stale_socket_of_ours(short_tmp: Path) -> None:
    # issue 14 item 7: --control PATH unlinked whatever was at PATH, a regular file included.
    plain = short_tmp / "notes.txt"
    plain.write_text("precious\n")
    res = _run_on(plain)
    assert res.returncode != 0 and "is a regular file" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and plain.read_text() == "precious\n"

    directory = short_tmp / "dir"
    directory.mkdir()
    res = _run_on(directory)
    assert res.returncode != 0 and "is a directory" in res.stderr and directory.is_dir()

    live = short_tmp / "live.sock"
    with socket.socket(socket.AF_UNIX) as other:  # another program's socket, answering
        other.bind(str(live))
        other.listen(8)
        res = _run_on(live)
        assert res.returncode != 0 and "a live socket of another program" in res.stderr
        assert f"pid {os.getpid()}" in res.stderr and live.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a socket of another user")
def test_control_refuses_another_users_stale_socket(short_tmp: Path) -> None:
    theirs = short_tmp / "theirs.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(theirs))
    os.chown(theirs, 65534, 65534)
    res = _run_on(theirs)
    assert res.returncode != 0 and "is a socket of uid 65534" in res.stderr and theirs.exists()


def test_control_replaces_a_stale_socket_of_ours(start: Start, short_tmp: Path) -> None:
    path = short_tmp / "s0.sock"  # the fixture's first control path
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    os.chmod(path, 0o600)
    sup = start("-w", "1", "--listen", "tcp://127.0.0.1:0", "--", *FDWORKER)
    assert sup.control == str(path) and sup.status()["workers"] == 1


def test_an_endpoint_at_emfile_sheds_the_newest_client_and_keeps_serving() -> None:
    """The base server alone, at a descriptor limit so low that accept() hits EMFILE."""
    script = r"""
import resource, selectors, socket, sys, time
from portshard.endpoint import Limits, StreamServer
class Echo(StreamServer):
    def on_data(self, peer):
        if b"\n" in peer.buf:
            self.send(peer, b"pong\n")
sel = selectors.DefaultSelector()
lsock = socket.socket()
lsock.bind(("127.0.0.1", 0))
lsock.listen(512)
resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
srv = Echo(lsock, sel, Limits(max_conns=1000, idle=2.0, fd_reserve=0, pause=0.2, backlog=512))
print(lsock.getsockname()[1], flush=True)
done = []
sel.register(sys.stdin, selectors.EVENT_READ, lambda mask: done.append(1))  # EOF: the test is over
end = time.monotonic() + float(sys.argv[1])
while not done and time.monotonic() < end:
    for key, mask in sel.select(0.05):
        key.data(mask)
    srv.expire(time.monotonic())
print("shed", srv.shed, flush=True)
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "30"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    idle: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        for _ in range(100):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            idle.append(s)
        time.sleep(0.5)

        def ping() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
                    c.sendall(b"ping\n")
                    return c.recv(16) == b"pong\n"
            except OSError:  # shed (the newest client goes first) or still queued: again
                return False

        assert wait_until(ping, 6, "an answer while flooded")
        assert proc.poll() is None
    finally:
        for s in idle:
            s.close()
        out, _ = proc.communicate(timeout=40)  # closes its stdin: it stops and says what it shed
    assert proc.returncode == 0
    assert int(out.split()[-1]) > 0, "nothing was shed: the limit was never reached"


_CEILING_SERVER = r"""
import resource, selectors, socket, sys, time
from portshard.endpoint import Limits, StreamServer
class Echo(StreamServer):
    def on_data(self, peer):
        if b"\n" in peer.buf:
            self.send(peer, b"pong\n")
sel = selectors.DefaultSelector()
lsock = socket.socket()
lsock.bind(("127.0.0.1", 0))
lsock.listen(512)
# RLIMIT 96 less a reserve of 64: the ceiling is fd 32, about 25 peers; the cap is far above.
resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96))
srv = Echo(lsock, sel, Limits(max_conns=1000, idle=30.0, fd_reserve=64, backlog=512))
print(lsock.getsockname()[1], flush=True)
done = []
sel.register(sys.stdin, selectors.EVENT_READ, lambda mask: done.append(1))
end = time.monotonic() + 60
while not done and time.monotonic() < end:
    for key, mask in sel.select(0.05):
        key.data(mask)
    srv.expire(time.monotonic())
print("peers", len(srv.peers), flush=True)
"""


def test_silent_connections_at_the_descriptor_ceiling_give_way_to_a_real_request() -> None:
    # A local user's 150 half-sent requests (slowloris) at a low descriptor limit: each new
    # connection at the ceiling was shed with a pause of 0.5 s and no peer gave way, so a
    # request behind them waited ~75 s (`status` took 30 s under a flood at `ulimit -n 140`).
    # Now a peer silent for evict_after gives way, as at the cap, and no real client is
    # told "busy" while our own young peers hold the descriptors.
    proc = subprocess.Popen(
        [sys.executable, "-c", _CEILING_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    hogs: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        for _ in range(150):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET / HT")  # half a request, never finished
            hogs.append(s)
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=20) as real:
            real.sendall(b"ping\n")
            assert real.recv(16) == b"pong\n"
        took = time.monotonic() - started
        assert took < 10, f"the real request waited {took:.1f}s behind silent connections"
        assert proc.poll() is None
    finally:
        for s in hogs:
            s.close()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert int(out.split()[-1]) < 64, out  # the peers stayed near the ceiling


class Echo(StreamServer):
    name = "echo"

    def on_data(self, peer: Peer) -> None:
        if b"\n" in peer.buf:
            self.send(peer, b"pong\n")


def _pump(sel: selectors.BaseSelector, srv: StreamServer, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for key, mask in sel.select(0.01):
            key.data(mask)
        srv.expire(time.monotonic())


def test_an_endpoint_at_its_cap_leaves_the_rest_in_the_queue_and_expires_idle_peers() -> None:
    sel = selectors.DefaultSelector()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    srv = Echo(lsock, sel, Limits(max_conns=2, idle=0.5, backlog=16))
    port = lsock.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    try:
        _pump(sel, srv, 0.1)
        assert len(srv.peers) == 2  # the third waits in the kernel's queue
        clients[2].sendall(b"ping\n")
        _pump(sel, srv, 0.1)
        assert len(srv.peers) == 2
        _pump(sel, srv, 0.6)  # the two idle peers expire; the third is accepted and answered
        assert clients[2].recv(16) == b"pong\n"
        assert clients[0].recv(16) == b""  # expired: closed without an answer
    finally:
        for c in clients:
            c.close()
        srv.close_all()
        sel.close()
    assert srv.sock.fileno() == -1


def test_a_flood_of_idle_health_connections_at_a_low_fd_limit_takes_nothing_down(
    start: Start,
) -> None:
    # --health faces the network (a probe from kubelet or a balancer needs a routable address):
    # the same caps as --metrics; an idle peer gets the agent line after 2 s and goes.
    sup = start(
        "-w", "2", "--listen", "tcp://127.0.0.1:0", "--health", "127.0.0.1:0", "--", *FDWORKER
    )  # fmt: skip
    assert sup.proc is not None
    resource.prlimit(sup.proc.pid, resource.RLIMIT_NOFILE, (256, 256))
    st = sup.status()
    port, hport = sup.port, int(str(st["health"]).rsplit(":", 1)[1])
    with idle_flood(sup, port, hport):
        pass
    code, body = wait_until(lambda: http(hport, "/healthz"), 20, "health answers again")
    assert code == 200 and json.loads(body)["ready"] == 2
    assert [s["pid"] for s in sup.status()["slots"]] == [s["pid"] for s in st["slots"]]


def test_silent_connections_at_the_cap_give_way_to_a_real_request() -> None:
    # A local user holding the endpoint's cap of idle connections (reopening each one as it
    # expires) made every /metrics scrape wait for the 10 s idle expiry and time out: at the
    # cap, a peer that has been silent for evict_after gives way to the next connection.
    sel = selectors.DefaultSelector()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    srv = Echo(lsock, sel, Limits(max_conns=4, idle=10.0, backlog=16, evict_after=0.2))
    port = lsock.getsockname()[1]
    hogs = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(4)]
    real = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        _pump(sel, srv, 0.05)
        assert len(srv.peers) == 4  # the cap holds; the real one waits in the kernel's queue
        real.sendall(b"ping\n")
        _pump(sel, srv, 0.5)  # well before the 10 s idle expiry
        assert real.recv(16) == b"pong\n"
        assert hogs[0].recv(16) == b""  # the oldest silent peer gave way
    finally:
        for c in [*hogs, real]:
            c.close()
        srv.close_all()
        sel.close()
