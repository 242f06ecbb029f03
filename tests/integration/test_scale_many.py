"""Many workers (issue 17): boot, reload under load and stop at 16 and 64 workers, and 3
listen addresses (TCP v4, TCP v6, UDP) x 16 workers.

Before the fd placement fix, any worker count from 16 up failed to boot ("cannot run worker
command: Invalid argument"): 16 is the smallest count that failed and 64 the largest the issue
asks for (32 ran here too, and checked nothing these two do not; test_spawn_fds.py places every
fd layout without processes). The worker is tests/workers/tinyworker.py (standard library only,
run with -I -S) so that 64 of them start quickly on 2 shared vCPUs. Every load is bounded in
requests and seconds; reloads replace several slots at once (--surge) to keep this file short.
"""

from __future__ import annotations

import socket
import sys
import time
import uuid

import pytest
from bench.load.loadgen import Load

from tests.conftest import ROOT, wait_until
from tests.supervisor_fixture import Running, Start, no_process_left

TINY = [sys.executable, "-I", "-S", str(ROOT / "tests" / "workers" / "tinyworker.py")]


def boot(start: Start, workers: int, *listen: str, surge: int = 1) -> tuple[Running, str]:
    tag = f"--tag={uuid.uuid4().hex[:12]}"
    args = ["-w", str(workers), "--surge", str(surge), "--ready-timeout", "60"]
    for address in listen:
        args += ["--listen", address]
    sup = start(*args, "--", *TINY, tag, wait=False)
    sup.wait_ready(timeout=30 + workers)
    return sup, tag


def stop(sup: Running, tag: str) -> None:
    sup.ctl("stop")
    assert sup.wait_exit(60) == 0, sup.text()
    wait_until(lambda: no_process_left(tag), 10, "every worker gone")


def served_pids(results: list[str]) -> set[int]:
    return {int(body.split()[1]) for body in results if body}


@pytest.mark.parametrize("workers", [16, 64])
def test_boot_reload_under_load_and_stop(start: Start, workers: int) -> None:
    sup, tag = boot(start, workers, "tcp://127.0.0.1:0", surge=workers // 8)
    st = sup.status()
    assert [s["slot"] for s in st["slots"]] == list(range(workers))
    assert all(s["state"] == "ready" for s in st["slots"])
    old = {s["pid"] for s in st["slots"]}
    assert len(old) == workers
    with Load("127.0.0.1", sup.port, concurrency=8, max_requests=20_000, max_seconds=60) as load:
        load.wait_for(100)
        sup.ctl("reload", "--wait", timeout=120)
        load.wait_for(load.count() + 100)
    st = sup.status()
    assert st["reloads"] == {"ok": 1, "failed": 0}
    new = {s["pid"] for s in st["slots"]}
    assert len(new) == workers and not new & old, "every slot has a new worker"
    assert not load.failed, load.by_kind()
    print(f"{workers} workers: {load.count()} requests during a reload, 0 failed")
    stop(sup, tag)


def udp_ask(port: int, clients: int = 32) -> set[int]:
    """Each of ``clients`` sockets (a flow each) sends one datagram; the pids that answered."""
    pids = set()
    deadline = time.monotonic() + 10
    for _ in range(clients):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(max(deadline - time.monotonic(), 0.1))
            s.sendto(b"?", ("127.0.0.1", port))
            pids.add(int(s.recv(256).split()[1]))
    return pids


def test_three_addresses_times_sixteen_workers(start: Start) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    sup, tag = boot(start, 16, "tcp://127.0.0.1:0", "tcp://[::1]:0", "udp://127.0.0.1:0", surge=4)
    st = sup.status()
    ports = [a["port"] for a in st["listen"]]
    assert len(ports) == 3 and all(ports)
    pids = {s["pid"] for s in st["slots"]}
    with (
        Load("127.0.0.1", ports[0], concurrency=4, max_requests=4000, max_seconds=60) as v4,
        Load("::1", ports[1], concurrency=4, max_requests=4000, max_seconds=60) as v6,
    ):
        v4.wait_for(50)
        v6.wait_for(50)
        assert udp_ask(ports[2]) <= pids
        sup.ctl("reload", "--wait", timeout=120)
        v4.wait_for(v4.count() + 50)
        v6.wait_for(v6.count() + 50)
    new = {s["pid"] for s in sup.status()["slots"]}
    assert not new & pids
    assert not v4.failed, v4.by_kind()
    assert not v6.failed, v6.by_kind()
    assert served_pids([r.body for r in v4.results + v6.results]) <= pids | new
    assert udp_ask(ports[2]) <= new, "UDP answered by the new workers"
    stop(sup, tag)
