"""One HTTP throughput measurement, the same for every server configuration.

wrk drives the load (requests/s, errors, the responses each worker served, from its Lua
script). Beside it, a Python asyncio probe (bench.load.loadgen) sends a few requests at a bounded
rate and times each one: the latency percentiles come from those raw timings, not from wrk
(whose percentiles are corrected for coordinated omission). The CPU of the server, wrk and the
probe is measured over the same window, with the machine's steal and everyone else's use.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from bench.load.loadgen import Load
from bench.load.wrk import Wrk
from bench.procs import BenchError
from bench.suite.harness import Measurement, Settings
from bench.suite.machine import CpuSample, cpu_use
from bench.suite.servers import HOST, Running
from bench.suite.stats import cdf_points, jain, latency_summary

# (extra worker arguments, log file) -> a running server
Starter = Callable[[list[str], Path], AbstractContextManager[Running]]


def warm_up(port: int, keepalive: bool) -> None:
    """A few hundred requests first: imports, caches and the accept path are warm, and a
    server that answers wrongly fails here rather than in the figures."""
    load = Load(HOST, port, concurrency=4, max_requests=300, max_seconds=5, keepalive=keepalive)
    load.start()
    deadline = time.monotonic() + 5
    while len(load.results) < load.max_requests and time.monotonic() < deadline:
        time.sleep(0.01)
    load.stop()
    if load.count("ok") < load.count() * 0.9 or not load.count():
        raise BenchError(f"warm-up failed: {load.by_kind()}")


def worker_stats(pids: list[int], stats_dir: Path, timeout: float = 3.0) -> list[dict[str, Any]]:
    """Ask each worker (SIGUSR1) for its counters and read them back."""
    for old in stats_dir.glob("*.json"):
        old.unlink()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    paths = [stats_dir / f"{pid}.json" for pid in pids]
    while not all(p.exists() for p in paths) and time.monotonic() < deadline:
        time.sleep(0.02)
    return [json.loads(p.read_text()) for p in paths if p.exists()]


def measure(
    settings: Settings,
    start: Starter,
    *,
    keepalive: bool,
    worker_counters: bool = False,
    slow_slot: int | None = None,
    settle: float = 0.0,
) -> Measurement:
    stats_dir = settings.logs / "stats"
    stats_dir.mkdir(parents=True, exist_ok=True)
    args = ["--stats", str(stats_dir)]
    with start(args, settings.logs / "servers.log") as srv:
        warm_up(srv.port, keepalive)
        if settle:  # the full load for a while first: a server that adapts has adapted
            Wrk(
                srv.port,
                seconds=settle,
                connections=settings.wrk_connections,
                threads=settings.wrk_threads,
                keepalive=keepalive,
                script_dir=settings.logs,
            ).start().wait()
        alone = (srv.supervisor,) if srv.supervisor else ()
        s0, t0 = CpuSample.take(srv.roots, alone), os.times()
        wrk = Wrk(
            srv.port,
            seconds=settings.seconds,
            connections=settings.wrk_connections,
            threads=settings.wrk_threads,
            keepalive=keepalive,
            script_dir=settings.logs,
        ).start()
        time.sleep(0.2)  # the probe measures while wrk's load is on, not its ramp-up
        probe = Load(
            HOST,
            srv.port,
            concurrency=settings.probe_clients,
            max_requests=200_000,
            max_seconds=max(settings.seconds - 0.5, 0.3),
            timeout=5.0,
            keepalive=keepalive,
            pause=settings.probe_pause,
        ).start()
        res = wrk.wait()
        probe.stop()
        s1, t1 = CpuSample.take(srv.roots, alone), os.times()
        counters = worker_stats(srv.workers, stats_dir) if worker_counters else []
    cpu = cpu_use(s0, s1)
    wall = max(t1.elapsed - t0.elapsed, 1e-6)
    counts = [res.bodies.get(str(pid), 0) for pid in srv.workers]
    answered = sum(res.bodies.values()) or 1
    lat = latency_summary([r.latency for r in probe.results if r.ok])
    metrics: dict[str, float] = {
        "rps": res.rps,
        "failed": float(res.failed),
        "p50_ms": lat.get("p50_ms", float("nan")),
        "p99_ms": lat.get("p99_ms", float("nan")),
        "max_ms": lat.get("max_ms", float("nan")),
        "stdev_ms": lat.get("stdev_ms", float("nan")),
        "jain": jain(counts),
        "wrk_p99_ms": res.corrected_ms["p99"],
        "probe_n": float(lat["n"]),
        "probe_failed": float(len(probe.failed)),
        "cpu_server": sum(cpu.roots.values()),
        "cpu_wrk": res.cpu,
        "cpu_probe": (t1.user + t1.system - t0.user - t0.system) / wall,
        "steal": cpu.steal,
        "foreign": cpu.foreign,
    }
    if srv.supervisor:
        metrics["cpu_supervisor"] = cpu.alone.get(srv.supervisor, float("nan"))
    if slow_slot is not None and counts:
        metrics["slow_share"] = counts[slow_slot] / answered
    if counters:
        accepted = sum(c["accepted"] for c in counters) or 1
        metrics["empty_wakeups"] = sum(c["accept_empty"] for c in counters) / accepted
    detail = {
        "shares": [round(c / answered, 4) for c in counts],
        "wrk_errors": res.errors,
        "wrk_corrected_ms": res.corrected_ms,
        "probe_kinds": probe.by_kind(),
        "probe_latency": lat,
        "probe_cdf_ms": cdf_points([r.latency for r in probe.results if r.ok]),
        "cpu": cpu.as_dict(),
        "workers": len(srv.workers),
        **srv.info,
    }
    return Measurement(metrics, cpu, detail)
