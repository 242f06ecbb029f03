"""Address mismatches between what a program binds and what portshard serves (issue 12, item 7).

- A narrower address on the managed port (127.0.0.1:P, uvicorn's default, when portshard
  listens on every interface) gets the managed socket, and a line says so.
- Another address on the managed port gets a line naming both addresses and the fix.
- Another port altogether gets a line naming that port.

Each under the LD_PRELOAD shim (a dynamically linked Python server) and under the seccomp trap
(a Go server built with CGO_ENABLED=0). A wildcard listener is only ever opened inside a
network namespace the test creates.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.integration.conftest import need
from tests.supervisor_fixture import Start

APPS = ROOT / "tests" / "workers" / "recipes"
PID_SERVER = [sys.executable, str(APPS / "pid_server.py")]

# Runs inside `unshare --net`: portshard on every interface, the program on 127.0.0.1:{port}.
NARROWER = r"""
import json, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from bench.load.loadgen import Load
from tests.supervisor_fixture import Running
from pathlib import Path
control, argv = Path(sys.argv[2]), json.loads(sys.argv[3])
sup = Running(["-w", "2", "--listen", "tcp://:0", "--", *argv], control)
try:
    sup.wait_ready(60)
    st = sup.status()
    with Load("127.0.0.1", sup.port, concurrency=4, max_requests=200) as load:
        load.wait_for(200)
    print(json.dumps({"kinds": load.by_kind(), "pids": len(load.served_by()),
                      "modes": [s["mode"] for s in st["slots"]], "log": sup.text()}))
finally:
    sup.close()
"""


@pytest.fixture(scope="session")
def go_recipe_server(build_dir: Path) -> str:
    out = build_dir / "recipe_server_addr"
    env = {**os.environ, "CGO_ENABLED": "0", "GO111MODULE": "off"}
    if not env.get("HOME") and not env.get("GOCACHE"):
        env["GOCACHE"] = str(build_dir / "gocache")
        env["GOPATH"] = str(build_dir / "gopath")
    subprocess.run(
        [need("go"), "build", "-o", str(out), str(APPS / "server.go")],
        check=True,
        timeout=300,
        env=env,
        cwd=build_dir,
    )
    return str(out)


def program(kind: str, address: str, request: pytest.FixtureRequest) -> tuple[list[str], str]:
    """The server binding ``address`` (HOST:{port} or HOST:N), and the mode it runs under."""
    host, _, port = address.rpartition(":")
    if kind == "preload":
        return [*PID_SERVER, host, port], "preload"
    return [request.getfixturevalue("go_recipe_server"), address], "seccomp"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: its own network namespace")
@pytest.mark.skipif(not (shutil.which("unshare") and shutil.which("ip")), reason="no unshare/ip")
@pytest.mark.parametrize("kind", ["preload", "seccomp"])
def test_a_narrower_bind_gets_the_wildcard_socket_and_a_line_says_so(
    kind: str, short_tmp: Path, request: pytest.FixtureRequest
) -> None:
    argv, mode = program(kind, "127.0.0.1:{port}", request)
    script = short_tmp / "child.py"
    script.write_text(NARROWER)
    res = subprocess.run(
        [
            "unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
            sys.executable, str(script), str(ROOT), str(short_tmp / "c.sock"), json.dumps(argv),
        ],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"{kind}: {out['kinds']} from {out['pids']} pids")
    assert out["modes"] == [mode, mode]
    assert set(out["kinds"]) == {"ok"} and out["kinds"]["ok"] >= 200, out["log"]
    assert out["pids"] == 2
    log = out["log"]
    assert "asked for 127.0.0.1:" in log and "gets portshard's socket on [::]:" in log, log
    assert "--listen tcp://127.0.0.1:" in log
    assert "does not match" not in log


@pytest.mark.parametrize("kind", ["preload", "seccomp"])
def test_another_address_on_the_port_names_both_and_the_fix(
    kind: str, start: Start, request: pytest.FixtureRequest
) -> None:
    argv, _ = program(kind, "127.0.0.2:{port}", request)
    sup = start(
        "-w", "1", "--listen", "tcp://127.0.0.1:0", "--ready-timeout", "3", "--", *argv, wait=False
    )
    assert sup.wait_exit(60) == 1
    log = sup.text()
    line = next((x for x in log.splitlines() if "does not match" in x), "")
    assert "to 127.0.0.2:" in line and "socket on 127.0.0.1:" in line, log
    assert "--listen tcp://127.0.0.2:" in line, line


@pytest.mark.parametrize("kind", ["preload", "seccomp"])
def test_a_listener_on_another_port_is_named(
    kind: str, start: Start, request: pytest.FixtureRequest
) -> None:
    other = free_port()
    argv, _ = program(kind, f"127.0.0.1:{other}", request)
    sup = start(
        "-w", "1", "--listen", "tcp://127.0.0.1:0", "--ready-timeout", "3", "--", *argv, wait=False
    )
    assert sup.wait_exit(60) == 1
    log = sup.text()
    line = next((x for x in log.splitlines() if f"port {other}, which portshard" in x), "")
    assert "does not manage" in line and f"--listen tcp://:{other}" in line, log
    assert "{port}" in line
    assert sum(f"port {other}, which" in x for x in log.splitlines()) == 1  # once per port
