"""Scenario 5: one slow worker, shared queue vs per-worker queues (and steering)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from bench.suite import servers
from bench.suite.harness import Config, Measurement, Metric, Scenario, ScenarioResult, Settings
from bench.suite.httprun import Starter, measure
from bench.suite.scenarios.common import Env, expect

EVERY, STALL_MS = 20, 50
SETTLE = 2.0  # seconds of full load before each measured run (quick: 0.5)
IN_FLIGHT = (8, 64)  # wrk's connections: issue 11's low concurrency, and a heavy load

ABOUT = """\
One of the workers (slot 0) stalls {ms} ms on every {every}th request it serves (a GC pause,
a slow disk, a noisy neighbour); the others are the same Python worker as in scenario 1.
**shared queue**: one socket in every worker's epoll set, so whoever is free takes the next
connection. **reuseport**: one socket per worker; the kernel hashes connections to sockets
without knowing that one is stuck, so a share of them waits behind each stall. **portshard**:
`portshard run` with `--steering off` (plain reuseport under a supervisor), and with each
steering backend this portshard offers, which should keep the slow worker's share near what
it can serve. Connection per request; req/s from wrk, latencies from the raw timings of the
Python probe, "slow share" = the fraction of responses the slow worker gave (wrk's count).
Every configuration first runs {settle:g} s under the full load, unmeasured: the figures are
the steady state. Each group runs at {inflight} connections in flight (wrk's connections; 8 is
issue 11's low concurrency, where the old overload rule never fired). "CPU/req" is the whole
server's CPU (workers and supervisor) per request answered (wrk's and the probe's): steadier
than req/s on a shared machine. The full sweep (2 and 4 workers x 4-256 in flight x a
periodic stall, a 3x slower worker, a CPU hog, none; long-lived connections) is
`bench/experiments/steering_sweep.py`, whose figures are in docs/ARCHITECTURE.md.
"""

METRICS = [
    Metric("rps", "req/s", better="higher", ratio=True),
    Metric("p50_ms", "p50", "ms", "lower", 2),
    Metric("p99_ms", "p99", "ms", "lower", 1, ratio=True),
    Metric("max_ms", "max", "ms", "lower", 0),
    Metric("slow_share", "slow share", "", "", 3),
    Metric("failed", "errors", "", "lower"),
    Metric("cpu_supervisor", "supervisor CPU", "", "", 3),
    Metric("cpu_us", "CPU/req", "us", "lower", 0, ratio=True),
]


def _run(start: Starter, inflight: int, settle: float) -> Callable[[Settings], Measurement]:
    """One HTTP run at ``inflight`` wrk connections, with the whole server's CPU per request."""

    def run(settings: Settings) -> Measurement:
        at = dataclasses.replace(
            settings, wrk_connections=inflight, wrk_threads=min(settings.wrk_threads, inflight)
        )
        m = measure(at, start, keepalive=False, slow_slot=0, settle=settle)
        answered = m.metrics["rps"] + m.metrics.get("probe_n", 0.0) / settings.seconds
        if answered > 0:
            m.metrics["cpu_us"] = 1e6 * m.metrics["cpu_server"] / answered
        return m

    return run


def scenario(settings: Settings, env: Env) -> Scenario:
    slow = ["--slow-slot", "0", "--slow-every", str(EVERY), "--slow-ms", str(STALL_MS)]
    settle = 0.5 if settings.quick else SETTLE
    configs: list[Config] = []
    inflights = (8,) if settings.quick else IN_FLIGHT
    for n, inflight in [
        (n, c)
        for n in ((settings.workers,) if settings.quick else sorted({2, 4, settings.workers}))
        for c in inflights
    ]:
        group = f"{n} workers, one slow, {inflight} in flight"
        prefix = f"{n}x{inflight}"

        def forked(n: int = n) -> Starter:
            return lambda a, log: servers.forked("epoll", n, [*a, *slow], log)

        def group_of(n: int = n) -> Starter:
            return lambda a, log: servers.reuseport_group(n, [*a, *slow], log)

        def portshard(flags: list[str], n: int = n) -> Starter:
            return lambda a, log: servers.portshard(n, flags, [*a, *slow, "--port", "{port}"], log)

        entries: list[tuple[str, str, Starter, float]] = [
            ("shared", "shared queue (epoll)", forked(), 0.3),
            ("reuseport", "reuseport, own sockets", group_of(), 0.4),
        ]
        if "steering" in env.portshard and settings.quick:
            entries.append(
                ("ps-auto", "portshard --steering auto", portshard(["--steering", "auto"]), 1.0)
            )
        elif "steering" in env.portshard:
            entries.append(
                ("ps-off", "portshard --steering off", portshard(["--steering", "off"]), 1.0)
            )
            for b in env.steering_backends():
                entries.append(
                    (f"ps-{b}", f"portshard --steering {b}", portshard(["--steering", b]), 1.0)
                )
        else:
            entries.append(("ps", "portshard (no steering yet)", portshard([]), 1.0))
        for key, label, start, startup in entries:
            configs.append(
                Config(
                    f"{prefix}/{key}",
                    label,
                    _run(start, inflight, settle),
                    group=group,
                    baseline=f"{prefix}/shared",
                    expect_s=expect(settings, startup + settle),
                )
            )
    return Scenario(
        "s5_slow",
        "5. One slow worker",
        ABOUT.format(
            ms=STALL_MS,
            every=EVERY,
            settle=settle,
            inflight=" and ".join(str(c) for c in ((8,) if settings.quick else IN_FLIGHT)),
        ),
        configs,
        METRICS,
        settings.rounds,
        notes=notes,
        plot=plot,
        headline=headline,
    )


def notes(res: ScenarioResult) -> list[str]:
    out = []
    for cfg in res.scenario.configs:
        if cfg.skip or cfg.baseline == cfg.key:
            continue
        r, p = res.ratio(cfg.key, "rps"), res.ratio(cfg.key, "p99_ms")
        if r.n:
            out.append(
                f"{cfg.group}, {cfg.label}: {r.median:.2f}x the shared queue's requests/s "
                f"(range {r.lo:.2f}-{r.hi:.2f}), p99 {p.median:.1f}x (range {p.lo:.1f}-{p.hi:.1f})."
            )
    return out


def headline(res: ScenarioResult) -> list[tuple[str, str]]:
    rows = []
    groups: list[str] = []
    for cfg in res.scenario.configs:
        if cfg.group not in groups:
            groups.append(cfg.group)
    for group in groups:
        parts = []
        for cfg in res.scenario.configs:
            if cfg.group != group or cfg.skip or cfg.baseline == cfg.key:
                continue
            r, p = res.ratio(cfg.key, "rps"), res.ratio(cfg.key, "p99_ms")
            if r.n:
                name = cfg.label.replace("portshard --steering ", "steering ")
                parts.append(f"{name} {r.median:.2f}x / {p.median:.1f}x")
        if parts:
            rows.append((f"{group}: req/s / p99 vs a shared queue (medians)", "; ".join(parts)))
    return rows


def plot(res: ScenarioResult, out: Path) -> list[Path]:
    from bench.suite.plots import bars, cdfs  # matplotlib only when plotting

    return [
        bars(
            res,
            out / "s5_slow.png",
            [("rps", "requests/s (wrk)"), ("p99_ms", "p99 ms (raw)")],
            log=True,
        ),
        cdfs(res, out / "s5_slow_cdf.png", "5. One slow worker: latency CDF"),
    ]
