"""Acceptance tests for `portshard run`: real supervisor, real workers, bounded loopback load."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
from bench.load.loadgen import Load

from tests.conftest import wait_until
from tests.supervisor_fixture import FDWORKER, Start, no_process_left, settle


def tagged_worker() -> tuple[list[str], str]:
    tag = f"--tag={uuid.uuid4().hex[:12]}"
    return [*FDWORKER, tag], tag


def test_workers_share_one_port(start: Start) -> None:
    worker, tag = tagged_worker()
    sup = start("-w", "4", "--listen", "tcp://127.0.0.1:0", "--", *worker)
    st = sup.status()
    assert st["listen"][0]["port"] > 0
    assert [s["slot"] for s in st["slots"]] == [0, 1, 2, 3]
    assert all(s["state"] == "ready" and s["restarts"] == 0 for s in st["slots"])
    assert all(s["queue"]["tcp0"]["backlog"] > 0 for s in st["slots"])
    with Load("127.0.0.1", sup.port, concurrency=8, max_requests=400) as load:
        load.wait_for(400)
    assert not load.failed
    assert len(load.served_by()) >= 3, load.served_by()
    sup.close()
    assert sup.proc.returncode == 0
    wait_until(lambda: no_process_left(tag), 5, "workers gone")


def test_rolling_reloads_under_load_fail_nothing(start: Start) -> None:
    # 5 reloads (20 handovers) under load; each handover is its own chance to lose a request,
    # so a loss that is not rare shows here, and the rare ones are the soak's (make soak).
    worker, _ = tagged_worker()
    sup = start("-w", "4", "--listen", "tcp://127.0.0.1:0", "--", *worker, env={"WORK_MS": "1"})
    port = sup.port
    with Load("127.0.0.1", port, concurrency=16, max_seconds=90) as load:
        load.wait_for(200)
        for _ in range(5):
            sup.reload()
        settle(0.3)
    st = sup.status()
    assert st["reloads"] == {"ok": 5, "failed": 0}
    assert all(s["generation"] == 6 for s in st["slots"])
    print(
        f"reloads: {load.count()} requests, {len(load.failed)} failed, by kind {load.by_kind()}, "
        f"max latency {max(r.latency for r in load.results) * 1000:.1f} ms"
    )
    assert not load.failed, load.by_kind()
    assert load.count() > 500


def test_sigkill_of_workers_fails_at_most_the_requests_in_hand(start: Start) -> None:
    worker, _ = tagged_worker()
    sup = start("-w", "4", "--listen", "tcp://127.0.0.1:0", "--", *worker, env={"WORK_MS": "2"})
    rng = random.Random(7)
    kills = 0
    sup.reload()  # workers started by a reload are respawned like any other
    with Load("127.0.0.1", sup.port, concurrency=16, max_seconds=90) as load:
        load.wait_for(200)
        for _ in range(5):
            slot = rng.randrange(4)
            pid = sup.status()["slots"][slot]["pid"]
            os.kill(pid, signal.SIGKILL)
            kills += 1
            wait_until(
                lambda s=slot, p=pid: (
                    sup.status()["slots"][s]["pid"] not in (None, p)
                    and sup.status()["slots"][s]["state"] == "ready"
                ),
                10,
                "respawn",
            )
        settle(0.3)
    st = sup.status()
    print(f"kills: {load.count()} requests, failed {load.by_kind()}")
    assert sum(s["restarts"] for s in st["slots"]) == kills
    # A one-request-at-a-time worker holds at most one connection: nothing queued is reset.
    assert len(load.failed) <= kills, load.by_kind()
    assert all(r.kind in ("reset", "empty") for r in load.failed)


@pytest.mark.parametrize("steering", ["auto", "off"])
def test_scale_down_and_up_under_load_fails_nothing(start: Start, steering: str) -> None:
    # With steering off a removed slot's socket must stop listening before its last copy (the
    # warden's) goes: the kernel hashed connections to it until then and reset them (16 in
    # ~1,000 requests).
    worker, _ = tagged_worker()
    sup = start(
        "-w", "4", "--steering", steering, "--listen", "tcp://127.0.0.1:0", "--", *worker,
        env={"WORK_MS": "1"},
    )  # fmt: skip
    with Load("127.0.0.1", sup.port, concurrency=16, max_seconds=60) as load:
        load.wait_for(200)
        sup.ctl("scale", "2")
        assert len(sup.status()["slots"]) == 2
        before = load.count()
        load.wait_for(before + 200)
        sup.ctl("scale", "4")
        assert [s["state"] for s in sup.status()["slots"]] == ["ready"] * 4
        load.wait_for(load.count() + 200)
    print(f"scale: {load.count()} requests, {load.by_kind()}")
    assert not load.failed, load.by_kind()


@contextlib.contextmanager
def udp_clients(count: int = 200) -> Iterator[list[socket.socket]]:
    """``count`` UDP flows: a socket each, bound to its own loopback port (closed after)."""
    clients: list[socket.socket] = []
    try:
        for _ in range(count):
            c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            c.bind(("127.0.0.1", 0))
            c.settimeout(5)
            clients.append(c)
        yield clients
    finally:
        for c in clients:
            c.close()


def udp_slots(port: int, clients: list[socket.socket]) -> list[str]:
    seen = []
    for c in clients:
        c.sendto(b"hi", ("127.0.0.1", port))
    for c in clients:
        data, _ = c.recvfrom(100)
        seen.append(data.decode().split()[0])
    return seen


def test_udp_flows_stay_on_their_slot_across_reloads(start: Start) -> None:
    worker, _ = tagged_worker()
    sup = start("-w", "4", "--listen", "udp://127.0.0.1:0", "--", *worker)
    port = sup.port
    with udp_clients(200) as clients:
        first = udp_slots(port, clients)
        assert len(set(first)) >= 3
        moved = 0
        for _ in range(2):  # a flow hashes to a slot, not a worker: the first reload moves it
            sup.reload()
            now = udp_slots(port, clients)
            moved += sum(a != b for a, b in zip(first, now, strict=True))
        print(f"udp: 200 flows, 2 reloads, {moved} moved")
        assert moved == 0


def test_stop_under_load_answers_every_accepted_connection(start: Start) -> None:
    worker, tag = tagged_worker()
    sup = start(
        "-w",
        "2",
        "--listen",
        "tcp://127.0.0.1:0",
        "--grace",
        "10",
        "--",
        *worker,
        env={"WORK_MS": "5"},
    )
    with Load("127.0.0.1", sup.port, concurrency=32, max_seconds=60, timeout=3) as load:
        load.wait_for(200)
        sup.proc.send_signal(signal.SIGTERM)
        assert sup.wait_exit(30) == 0
        settle(0.2)
    print(f"stop: {load.by_kind()}")
    # Connections the kernel completed are all answered; later ones are refused or time out.
    lost = [r for r in load.failed if r.kind not in ("refused", "connect_timeout")]
    assert not lost, load.by_kind()
    wait_until(lambda: no_process_left(tag), 5, "workers gone")


@pytest.mark.parametrize(
    "command,expect",
    [
        (["/nonexistent/server"], "No such file or directory"),
        (
            [sys.executable, "-c", "import sys; sys.exit(3)"],
            "exited before it was ready (exit status 3)",
        ),
        ([sys.executable, "-c", "import time; time.sleep(60)"], "not ready within 1s"),
    ],
    ids=["missing", "exits-at-once", "never-ready"],
)
def test_bad_worker_commands_stop_with_a_clear_error(
    start: Start, command: list[str], expect: str
) -> None:
    tag = f"tag{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    sup = start(
        "-w",
        "2",
        "--listen",
        "tcp://127.0.0.1:0",
        "--ready-timeout",
        "1",
        "--name",
        tag,
        "--",
        *command,
        wait=False,
    )
    code = sup.wait_exit(20)
    text = sup.text()
    assert code != 0
    assert expect in text, text
    said = [line.split(" ", 2)[-1].split(expect)[0] for line in text.splitlines() if expect in line]
    assert len(said) == len(set(said)), f"the reason is logged more than once: {said}"
    assert "Traceback" not in text
    assert time.monotonic() - t0 < 10
    assert no_process_left(tag)
    assert not os.path.exists(sup.control)
