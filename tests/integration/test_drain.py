"""`portshard run --health` and `portshard drain` for real (issue 16): a probe and an agent
check on one port, the host draining at once while it still serves for its settle time, then
stopping with exit 0; a deadline that kills and says so; the CLI's errors. (bench/netbed/ runs
the same behind HAProxy and nftables: tests/integration/test_netbed.py.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest
import yaml
from bench.netbed.netns import call_in, exec_prefix, namespaces

from tests.conftest import ROOT, wait_until
from tests.supervisor_fixture import FDWORKER, PORTSHARD, Running, Start, no_process_left

from .conftest import need

MANIFEST = ROOT / "examples" / "k8s" / "deployment.yaml"


def exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data


def healthz(port: int) -> tuple[int, dict[str, object]]:
    data = exchange(port, b"GET /healthz HTTP/1.1\r\nHost: probe\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def agent(port: int) -> str:
    return exchange(port, b"agent\n").decode()


def served(port: int) -> bytes:
    return exchange(port, b"GET / HTTP/1.0\r\n\r\n").partition(b"\r\n\r\n")[2]


def health_port(sup: Running) -> int:
    url = str(sup.status()["health"])
    assert url.startswith("http://127.0.0.1:"), url
    return int(url.rsplit(":", 1)[1])


def drain(sup: Running, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*PORTSHARD, "drain", "--control", sup.control, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_health_says_draining_at_once_the_port_serves_to_settle_then_it_stops(
    start: Start,
) -> None:
    tag = f"--tag={uuid.uuid4().hex[:12]}"
    sup = start(
        "-w", "2", "--listen", "tcp://127.0.0.1:0", "--health", "0", "--", *FDWORKER, tag
    )  # fmt: skip
    port, hport = sup.port, health_port(sup)
    assert healthz(hport) == (200, {"state": "serving", "ready": 2, "slots": 2, "capacity": 1.0})
    assert agent(hport) == "ready 100%\n"
    assert sup.status()["state"] == "running"
    began = time.monotonic()
    proc = drain(sup, "--wait", "--settle", "2")
    _, body = wait_until(lambda: (c := healthz(hport))[0] == 503 and c, 5, "503")
    assert body["state"] == "draining" and agent(hport) == "drain\n"
    assert sup.status()["state"] == "draining"
    # the settle time: what a balancer still sends is served
    while time.monotonic() < began + 1.5:
        assert served(port).split()[0] in (b"0", b"1")
        time.sleep(0.1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.startswith("drained in ") and "the supervisor has stopped" in out
    assert sup.wait_exit(10) == 0
    assert time.monotonic() - began >= 2.0
    assert "draining: health says so now" in sup.text()
    wait_until(lambda: no_process_left(tag), 10, "every worker gone")


def test_drain_deadline_kills_a_worker_that_holds_on_and_exits_non_zero(start: Start) -> None:
    sup = start(
        "-w", "2", "--listen", "tcp://127.0.0.1:0", "--", *FDWORKER, env={"WORK_MS": "20000"}
    )  # fmt: skip
    client = socket.create_connection(("127.0.0.1", sup.port), timeout=30)
    try:
        client.sendall(b"GET / HTTP/1.0\r\n\r\n")  # a worker holds it for 20 s
        wait_until(lambda: any(s["connections"] for s in sup.status()["slots"]), 10, "held")
        began = time.monotonic()
        proc = drain(sup, "--wait", "--settle", "0.5", "--deadline", "3")
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - began
    finally:
        client.close()
    assert proc.returncode != 0 and out == ""
    assert "deadline passed with 1 worker(s) still running" in err, err
    assert "Traceback" not in err
    assert 2.5 <= took < 15, took
    assert sup.wait_exit(10) == 1


def test_drain_without_wait_returns_and_reload_is_refused_meanwhile(start: Start) -> None:
    sup = start("-w", "1", "--listen", "tcp://127.0.0.1:0", "--", *FDWORKER)
    res = sup.ctl("drain", "--settle", "5")
    assert res.stdout.startswith("draining")
    refused = sup.ctl("reload", check=False)
    assert refused.returncode != 0 and "draining" in refused.stderr
    sup.ctl("drain", "--settle", "0.1", "--deadline", "20")  # a second drain joins the first
    stop = sup.ctl("stop")
    assert stop.returncode == 0
    assert sup.wait_exit(20) == 0  # a stop skips the rest of the settle time


def test_drain_cli_errors_are_one_line(shared_sup: Running) -> None:
    sup = shared_sup
    bad = sup.ctl("drain", "--settle", "10", "--deadline", "5", check=False)
    assert bad.returncode == 2 and "longer than --deadline 5" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert sup.status()["state"] == "running"  # nothing was sent
    missing = subprocess.run(
        [*PORTSHARD, "drain", "--control", sup.control + ".none", "--wait"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode != 0 and "no supervisor at" in missing.stderr


def test_health_address_errors_name_the_option(start: Start) -> None:
    res = subprocess.run(
        [*PORTSHARD, "run", "--health", "nope:x", "--listen", "tcp://127.0.0.1:0", "--", "true"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode != 0 and "--health 'nope:x'" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a network namespace of its own)")
def test_the_kubernetes_example_runs_as_written() -> None:
    """examples/k8s/deployment.yaml's container command, readiness probe and preStop hook,
    run literally (only the name made unique and the paths made local) in a network namespace
    of the test's own: the probe is 200, the hook drains (the probe 503 at once), the
    supervisor exits 0 within terminationGracePeriodSeconds."""
    need("ip")
    manifest = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    pod = next(d for d in manifest if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    name = f"k8s{uuid.uuid4().hex[:8]}"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    probe = c["readinessProbe"]["httpGet"]
    local = {"portshard": " ".join(PORTSHARD), "python3": sys.executable, "hello": name}
    local["/app/hello_pid.py"] = str(ROOT / "examples" / "hello_pid.py")

    def here(argv: list[str]) -> list[str]:
        return [w for a in argv for w in local.get(a, a).split(" ")]

    def ready() -> int:
        request = f"GET {probe['path']} HTTP/1.1\r\nHost: kubelet\r\n\r\n".encode()
        try:
            reply = call_in(name, lambda: exchange(ports[probe["port"]], request))
        except OSError:
            return 0
        return int(reply.split()[1])

    with namespaces([name]):
        log = open(f"/tmp/{name}.log", "wb")  # noqa: SIM115 - closed below
        sup = subprocess.Popen(
            [*exec_prefix(name), *here(c["command"])], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_until(lambda: ready() == 200, 30, "the readiness probe")
            hook = subprocess.Popen(
                here(c["lifecycle"]["preStop"]["exec"]["command"]),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            wait_until(lambda: ready() == 503, 10, "the probe failing")  # out at the first
            out, err = hook.communicate(timeout=pod["terminationGracePeriodSeconds"])
            assert hook.returncode == 0, err
            assert "drained in" in out
            assert sup.wait(10) == 0
        finally:
            if sup.poll() is None:
                sup.kill()
                sup.wait(10)
            log.close()
            os.unlink(f"/tmp/{name}.log")
