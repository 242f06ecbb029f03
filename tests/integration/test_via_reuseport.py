"""`portshard run --via reuseport`: each copy binds its own socket and portshard only sets
SO_REUSEPORT on it (libreuseport's mode: the shim for dynamically linked programs, the seccomp
trap for static ones), while still supervising the processes (respawn, reload, status).

The workers below set only SO_REUSEADDR: without portshard, the second copy's bind() fails with
EADDRINUSE, so every answer from a second pid shows that portshard set SO_REUSEPORT.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from portshard.linux import sockdiag
from tests.conftest import ROOT
from tests.supervisor_fixture import PORTSHARD, Running, Start, warden_pids

SELF_BINDING = """
import os, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(128)
while True:
    c, _ = s.accept()
    c.recv(1000)
    c.sendall(b"HTTP/1.0 200 OK\\r\\n\\r\\n%d" % os.getpid())
    c.close()
"""


def free_port() -> int:
    """A port nothing listens on now (each copy binds it itself, so port 0 cannot be used)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_tcp(start: Start, workers: int, *command: str) -> tuple[Running, int]:
    """`portshard run --via reuseport` of ``command`` (with ``{port}``) on a free TCP port."""
    port = free_port()
    sup = start(
        "-w", str(workers), "--via", "reuseport", "--listen", f"tcp://127.0.0.1:{port}", "--",
        *command,
    )  # fmt: skip
    return sup, port


def answer(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := c.recv(4096):
            data += chunk
    return data.decode(errors="replace").split()[-1]


def test_each_copy_binds_its_own_socket_and_is_supervised(start: Start) -> None:
    sup, port = run_tcp(start, 3, sys.executable, "-c", SELF_BINDING, "{port}")
    st = sup.status()
    assert [s["mode"] for s in st["slots"]] == ["reuseport+preload"] * 3
    assert st["steering"]["backend"] == "off" and all(s["queue"] == {} for s in st["slots"])
    pids = sup.pids()
    own = [sockdiag.listening_sockets_of(pid) for pid in pids]
    assert all(len(x) == 1 for x in own) and len(set().union(*own)) == 3, own
    assert not sockdiag.listening_sockets_of(st["pid"]), "the supervisor holds no socket"
    for pid in pids:
        with open(f"/proc/{pid}/environ", "rb") as f:
            assert b"LISTEN_FDS=" not in f.read()
    served = {answer(port) for _ in range(60)}
    assert len(served & {str(p) for p in pids}) >= 2
    sup.ctl("reload", "--wait")
    new = sup.pids()
    assert not set(new) & set(pids)
    assert {answer(port) for _ in range(60)} <= {str(p) for p in new}
    assert "--via reuseport: each copy binds its own socket" in sup.text()


def test_a_static_binary_gets_so_reuseport_from_the_seccomp_trap(
    start: Start, static_server: str
) -> None:
    sup, port = run_tcp(start, 2, static_server, "{port}")
    assert [s["mode"] for s in sup.status()["slots"]] == ["reuseport+seccomp"] * 2
    pids = {str(p) for p in sup.pids()}
    assert {answer(port) for _ in range(60)} == pids


ADMIN_FIRST = (
    """
import os, socket, sys
admin = socket.socket()
admin.bind(("127.0.0.1", 0))
admin.listen()
admin.settimeout(1.5)
try:
    admin.accept()  # waits on a port portshard does not serve: not ready yet
except socket.timeout:
    pass
"""
    + SELF_BINDING
)


def test_readiness_looks_only_at_the_served_port(start: Start) -> None:
    sup, port = run_tcp(start, 1, sys.executable, "-c", ADMIN_FIRST, "{port}")
    after = re.search(r"ready after ([0-9.]+)s", sup.text())
    assert after and float(after.group(1)) >= 1.4, sup.text()
    assert answer(port) == str(sup.pids()[0])


UDP_SELF_BINDING = """
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(100)
    s.sendto(b"%d" % os.getpid(), peer)
"""


def test_udp_copies_bind_their_own_sockets(start: Start) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sup = start(
        "-w", "2", "--via", "reuseport", "--listen", f"udp://127.0.0.1:{port}", "--",
        sys.executable, "-c", UDP_SELF_BINDING, "{port}",
    )  # fmt: skip
    pids = {str(p) for p in sup.pids()}
    answers = set()
    for _ in range(40):  # a new source port each time: flows hash over both sockets
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.settimeout(5)
            c.sendto(b"?", ("127.0.0.1", port))
            answers.add(c.recvfrom(100)[0].decode())
    assert answers == pids


@pytest.mark.parametrize(
    "args, message",
    [
        (["--listen", "tcp://127.0.0.1:0"], "port 0 does not work with --via reuseport"),
        (["--listen", "tcp://127.0.0.1:8", "--steering", "ebpf"], "needs the supervisor's sockets"),
        (["--listen", "tcp://127.0.0.1:8", "--", "x", "{fd}"], "there is no {fd}; use {port}"),
    ],
)
def test_what_reuseport_mode_cannot_do_is_refused_with_the_reason(
    args: list[str], message: str
) -> None:
    command = [] if "--" in args else ["--", "true"]
    res = subprocess.run(
        [*PORTSHARD, "run", "-w", "2", "--via", "reuseport", *args, *command],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode != 0 and message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


RELOADS_IN_A_NAMESPACE = """
import json, socket, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from bench.load.loadgen import Load
from portshard.control.client import request
from portshard.errors import ControlError
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
control = sys.argv[2]
cmd = [sys.executable, "-m", "portshard", "run", "-w", "2", "--via", "reuseport",
       "--listen", f"tcp://127.0.0.1:{port}", "--control", control, *sys.argv[3:], "--",
       sys.executable, "-c",
       "import os,socket,sys,time\\n"
       "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\\n"
       "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(128)\\n"
       "while True:\\n"
       "    c,_=s.accept(); c.recv(1000); time.sleep(0.002)\\n"
       "    c.sendall(b'HTTP/1.0 200 OK\\\\r\\\\n\\\\r\\\\n%d' % os.getpid()); c.close()\\n",
       "{port}"]
sup = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    try:
        if request(control, "status")["ready"]:
            break
    except ControlError:
        pass
    time.sleep(0.1)
with Load("127.0.0.1", port, concurrency=8, max_seconds=60) as load:
    load.wait_for(200)
    for _ in range(3):
        request(control, "reload", timeout=60, wait=True)
    load.wait_for(load.count() + 200)
sup.terminate()
err = sup.communicate(timeout=30)[1]
print(json.dumps({"requests": load.count(), "kinds": load.by_kind(), "log": err}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: its own network namespace")
@pytest.mark.skipif(not (shutil.which("unshare") and shutil.which("ip")), reason="no unshare/ip")
def test_reloads_lose_nothing_where_the_kernel_migrates_closing_listeners(
    short_tmp: Path,
) -> None:
    # In a network namespace of the test's own, --migrate sets tcp_migrate_req=1 there (the
    # host's setting is untouched): an old copy's socket hands its queue to the new one.
    script = short_tmp / "child.py"
    script.write_text(RELOADS_IN_A_NAMESPACE)
    res = subprocess.run(
        [
            "unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
            sys.executable, str(script), str(ROOT), str(short_tmp / "c.sock"), "--migrate",
        ],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"--via reuseport, 3 reloads with tcp_migrate_req=1: {out['kinds']}")
    assert out["kinds"].get("ok", 0) >= 400 and set(out["kinds"]) == {"ok"}, out["kinds"]
    assert "hands what was queued on it to the others" in out["log"]


def test_a_killed_supervisor_of_reuseport_copies_is_adopted(start: Start) -> None:
    # The slots hold no socket under --via reuseport, but the adopter looked one up for each
    # kept --listen address: IndexError, the rerun died ("the supervisor failed") and the
    # copies were left to the warden (found with dnsmasq, kill -9 and the same run again).
    sup, port = run_tcp(start, 2, sys.executable, "-c", SELF_BINDING, "{port}")
    pids = sup.pids()
    assert sup.proc is not None
    sup.proc.kill()
    sup.wait_exit(5)
    args = ["-w", "2", "--via", "reuseport", "--listen", f"tcp://127.0.0.1:{port}", "--"]
    again = Running([*args, sys.executable, "-c", SELF_BINDING, "{port}"], Path(sup.control))
    adopted = False
    try:
        st = again.wait_ready(30)
        adopted = True
        assert sorted(s["pid"] for s in st["slots"]) == sorted(pids), again.text()
        assert st["supervisor"]["adoptions"] == 1
        assert {answer(port) for _ in range(40)} <= {str(p) for p in pids}
        again.ctl("reload", "--wait")
        assert not set(again.pids()) & set(pids)
    finally:
        again.close()
        if not adopted:  # the dead supervisor's warden and its copies: nobody else stops them
            for pid in [*warden_pids(Path(sup.control)), *pids]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
