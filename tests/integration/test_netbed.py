"""Several hosts behind real load balancers (issue 16): HAProxy with agent checks, and nftables
DNAT as kube-proxy programs it, on network namespaces (bench/netbed/, `make netbed`).

Under a connection-per-request load through each virtual address: a rolling reload of every
host fails nothing; a host that reports draining gets no new connection once the balancers have
had their interval, and can then be stopped and started again without a failure. The reduced
form (3 hosts x 2 workers, a few seconds of load per case) runs in `make test`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bench.netbed.bed import SETTLE, VIP_HAPROXY, VIP_NFT, Bed, NsLoad
from bench.netbed.netns import leftover

from tests.conftest import wait_until

from .conftest import need

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (creates network namespaces)"),
    pytest.mark.timeout(120),
]
BALANCERS = {"haproxy": VIP_HAPROXY, "nftables": VIP_NFT}


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    for tool in ("ip", "haproxy", "nft"):
        need(tool)
    tmp = Path(tmp_path_factory.mktemp("netbed"))
    with Bed(tmp) as b:
        yield b
    assert leftover(b.prefix) == [], "a network namespace of the test bed is left"


def _loads(bed: Bed) -> dict[str, NsLoad]:
    loads = {name: bed.load(vip, concurrency=4, max_seconds=60) for name, vip in BALANCERS.items()}
    for load in loads.values():
        load.start()
    for load in loads.values():
        load.wait_for(30)
    return loads


def _stop(loads: dict[str, NsLoad]) -> None:
    for load in loads.values():
        load.stop()


def _served_since(load: NsLoad, t: float, n: int = 20) -> None:
    """Wait until ``n`` more requests begun after ``t`` have finished."""
    wait_until(lambda: sum(1 for r in list(load.results) if r.start >= t) >= n, 20, "load")


def test_rolling_reload_of_every_host_fails_nothing(bed: Bed) -> None:
    before = {h.name: {s["pid"] for s in bed.status(h)["slots"]} for h in bed.hosts}
    loads = _loads(bed)
    try:
        for host in bed.hosts:
            bed.reload_host(host)
        done = time.monotonic()
        for load in loads.values():
            _served_since(load, done, 30)
    finally:
        _stop(loads)
    for name, load in loads.items():
        assert not load.failed, f"{name}: {load.by_kind()}"
        assert load.count("ok") >= 60, f"{name}: {load.by_kind()}"
        assert load.hosts_after(0) == {"h1", "h2", "h3"}, name
    for host in bed.hosts:
        after = bed.status(host)["slots"]
        assert not {s["pid"] for s in after} & before[host.name], f"{host.name}: not reloaded"


def test_drained_host_gets_no_new_connection_then_stops_and_comes_back(bed: Bed) -> None:
    host = bed.hosts[1]
    assert bed.endpoints is not None
    loads = _loads(bed)
    try:
        for load in loads.values():
            wait_until(lambda ld=load: host.name in ld.hosts_after(0), 10, "the host serving")
        drained_at = time.monotonic()
        bed.drain_host(host)  # what `portshard drain` will do first: health says draining
        wait_until(lambda: host.name not in bed.endpoints.current, 5, "the controller")
        assert bed.agent_reply(host) == "drain\n"
        time.sleep(SETTLE)  # every balancer has had its interval
        out_at = time.monotonic()
        for load in loads.values():
            _served_since(load, out_at)
        bed.stop_host(host)
        stopped_at = time.monotonic()
        for load in loads.values():
            _served_since(load, stopped_at)
        for name, load in loads.items():
            assert host.name not in load.hosts_after(out_at), f"{name} still sends to {host.name}"
            assert load.hosts_after(out_at) == {"h1", "h3"}, name
        bed.start_host(host)
        back_at = time.monotonic()
        for load in loads.values():
            wait_until(lambda ld=load: host.name in ld.hosts_after(back_at), 10, "the host back")
        assert bed.agent_reply(host) == "ready 100%\n"
    finally:
        _stop(loads)
    for name, load in loads.items():
        assert not load.failed, f"{name}: {load.by_kind()}"
        last = max(r.start for r in load.results if r.ok and r.body.startswith(host.name + " "))
        assert last >= drained_at  # it served until it drained and again after it came back


def test_host_with_half_its_slots_not_ready_gets_half_the_weight(bed: Bed) -> None:
    """HAProxy: 'ready 50%' from a host whose slots are half not ready -> half the share of the
    others (weights 50:100:100 -> 20% : 40% : 40%). The weight comes from the stand-in agent
    (bench/netbed/agent.py, from `portshard status`) until --health serves it."""
    host = bed.hosts[0]
    bed.stop_host(host)
    bed.start_host(host, wait=False, stall_slot=1)  # slot 1's worker never becomes ready
    try:
        wait_until(lambda: bed.agent_reply(host) == "ready 50%\n", 10, "the agent's weight")
        time.sleep(SETTLE)
        load = bed.load(VIP_HAPROXY, concurrency=4, max_seconds=30, max_requests=600)
        load.start()
        load.wait_for(600, timeout=30)
        load.stop()
        assert not load.failed, load.by_kind()
        served = {h.name: 0 for h in bed.hosts}
        for r in load.results:
            served[r.body.split()[0]] += 1
        share = served[host.name] / len(load.results)
        assert 0.12 <= share <= 0.28, served
    finally:
        bed.stop_host(host)
        bed.start_host(host)
