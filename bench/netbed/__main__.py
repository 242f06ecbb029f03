"""The multi-host test bed as one command (root): ``python -m bench.netbed`` (``make netbed``).

Builds the bed (bed.py: three hosts under ``portshard run -w 2`` behind HAProxy and nftables,
in network namespaces it deletes again), then:

1. **Throughput**: requests/s through each balancer against direct (the client connecting to
   the hosts itself), a new connection per request (wrk, ``Connection: close``), three wrk
   processes of ``--connections``/3 each in every configuration (one per host for direct, all
   on the virtual address through a balancer); interleaved rounds, the order rotating; medians
   with min-max, and the ratio to direct paired within each round.
2. **Rolling reload** of all three hosts (``portshard reload --wait``, one after another) under
   a connection-per-request load through both virtual addresses: failed requests per balancer.
3. **Drain**: host h2 reports draining; how long until each balancer stops sending it new
   connections (the last request it served, from when it said so), then ``portshard stop``
   after the balancers' interval, ``portshard run`` again, and how long until each sends to it
   again; failed requests per balancer.

Prints a Markdown table and writes every figure to ``--out`` (bench/results/netbed.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.load.wrk import Wrk
from bench.netbed.bed import PORT, SETTLE, VIP_HAPROXY, VIP_NFT, Bed, NsLoad
from bench.netbed.netns import exec_prefix, leftover
from bench.procs import ROOT

BALANCERS = {"haproxy": VIP_HAPROXY, "nftables": VIP_NFT}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def throughput(
    bed: Bed, config: str, seconds: float, connections: int, tmp: Path
) -> dict[str, Any]:
    """One run: three wrk processes at once from the client namespace; summed requests/s."""
    targets = [h.addr for h in bed.hosts] if config == "direct" else [BALANCERS[config]] * 3
    runs = []
    for target in targets:
        w = Wrk(
            PORT,
            seconds=seconds,
            connections=max(1, connections // 3),
            threads=1,
            keepalive=False,
            script_dir=tmp,
            host=target,
        )
        w.args = [*exec_prefix(bed.client), *w.args]
        runs.append(w.start())
    results = [w.wait() for w in runs]
    hosts: dict[str, int] = {}
    for r in results:
        for body, n in r.bodies.items():
            name = body.split()[0] if body else "?"
            hosts[name] = hosts.get(name, 0) + n
    return {
        "rps": sum(r.rps for r in results),
        "errors": sum(r.failed for r in results),
        "hosts": hosts,
        "wrk_cpu": sum(r.cpu for r in results),
    }


def _loads(bed: Bed) -> dict[str, NsLoad]:
    loads = {n: bed.load(vip, concurrency=4, max_seconds=120) for n, vip in BALANCERS.items()}
    for load in loads.values():
        load.start()
    for load in loads.values():
        load.wait_for(30)
    return loads


def _summary(load: NsLoad) -> dict[str, Any]:
    return {"requests": load.count(), "failed": len(load.failed), "kinds": load.by_kind()}


def rolling_reload(bed: Bed) -> dict[str, Any]:
    loads = _loads(bed)
    took = []
    try:
        for host in bed.hosts:
            t = time.monotonic()
            bed.reload_host(host)
            took.append(round(time.monotonic() - t, 2))
        time.sleep(1)
    finally:
        for load in loads.values():
            load.stop()
    return {"reload_s": took, **{n: _summary(ld) for n, ld in loads.items()}}


def _until(cond: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s")
        time.sleep(0.05)


def drain(bed: Bed) -> dict[str, Any]:
    host = bed.hosts[1]
    loads = _loads(bed)
    try:
        drained_at = time.monotonic()
        bed.drain_host(host)
        time.sleep(SETTLE)
        stop_at = time.monotonic()
        bed.stop_host(host)
        stopped_at = time.monotonic()
        time.sleep(0.5)
        start_at = time.monotonic()
        bed.start_host(host)
        for load in loads.values():
            _until(lambda ld=load: host.name in ld.hosts_after(start_at), 15)
        time.sleep(0.5)
    finally:
        for load in loads.values():
            load.stop()
    out: dict[str, Any] = {"settle_s": SETTLE, "stop_s": round(stopped_at - stop_at, 2)}
    for name, load in loads.items():
        mine = [r.start for r in load.results if r.ok and r.body.split()[0] == host.name]
        last = max((t for t in mine if t < stopped_at), default=drained_at)
        first_back = min((t for t in mine if t >= start_at), default=float("nan"))
        out[name] = {
            **_summary(load),
            "out_after_s": round(max(0.0, last - drained_at), 3),
            "back_after_s": round(first_back - start_at, 3),  # from portshard run
            "served_after_settle": sum(1 for t in mine if stop_at <= t < start_at),
        }
    return out


def bench_throughput(bed: Bed, a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    configs = ["direct", *BALANCERS]
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    for rnd in range(a.rounds):
        order = configs[rnd % 3 :] + configs[: rnd % 3]
        for config in order:
            r = throughput(bed, config, a.seconds, a.connections, tmp)
            runs[config].append(r)
            say(f"  round {rnd + 1} {config}: {r['rps']:.0f} req/s, {r['errors']} errors")
    summary = {}
    for config in configs:
        rps = [r["rps"] for r in runs[config]]
        ratios = [r["rps"] / d["rps"] for r, d in zip(runs[config], runs["direct"], strict=True)]
        summary[config] = {
            "rps": statistics.median(rps),
            "min": min(rps),
            "max": max(rps),
            "ratio": statistics.median(ratios),
            "errors": sum(r["errors"] for r in runs[config]),
        }
    return {"runs": runs, "summary": summary}


def table(res: dict[str, Any]) -> str:
    s, rr, dr = res["throughput"]["summary"], res["reload"], res["drain"]
    lines = [
        "| path | req/s (new connection each) | vs direct | rolling reload failed "
        "| drain: out after | drain failed | back after start |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("direct", *BALANCERS):
        t = s[name]
        row = f"| {name} | {t['rps']:.0f} ({t['min']:.0f}-{t['max']:.0f}) | {t['ratio']:.2f} |"
        if name == "direct":
            row += " | | | |"
        else:
            row += (
                f" {rr[name]['failed']} of {rr[name]['requests']} |"
                f" {dr[name]['out_after_s']:.2f} s | {dr[name]['failed']} of"
                f" {dr[name]['requests']} | {dr[name]['back_after_s']:.2f} s |"
            )
        lines.append(row)
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description="The multi-host test bed (issue 16).")
    p.add_argument("--seconds", type=float, default=3.0, help="per throughput run [3]")
    p.add_argument("--rounds", type=int, default=3, help="throughput rounds [3]")
    p.add_argument("--connections", type=int, default=24, help="wrk connections in all [24]")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "netbed.json")
    a = p.parse_args()
    if os.geteuid() != 0:
        say("python -m bench.netbed: needs root (it creates network namespaces); try sudo")
        return 2
    with tempfile.TemporaryDirectory(prefix="netbed-") as d:
        tmp = Path(d)
        t0 = time.monotonic()
        with Bed(tmp) as bed:
            say(f"bed up in {time.monotonic() - t0:.1f} s: 3 hosts x 2 workers, HAProxy, nftables")
            say("throughput:")
            res: dict[str, Any] = {"throughput": bench_throughput(bed, a, tmp)}
            say("rolling reload of every host under load ...")
            res["reload"] = rolling_reload(bed)
            say("drain, stop and start of h2 under load ...")
            res["drain"] = drain(bed)
            prefix = bed.prefix
        left = leftover(prefix)
    res["settings"] = vars(a) | {"out": str(a.out)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(table(res))
    say(f"wrote {a.out}; namespaces left: {left or 'none'}")
    failed = sum(res[k][b]["failed"] for k in ("reload", "drain") for b in BALANCERS)
    return 1 if failed or left else 0


if __name__ == "__main__":
    sys.exit(main())
