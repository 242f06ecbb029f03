"""Scenario 1: accept strategies, the same tiny Python HTTP worker under each."""

from __future__ import annotations

from pathlib import Path

from bench.suite import servers
from bench.suite.harness import Config, Metric, Scenario, ScenarioResult, Settings
from bench.suite.httprun import Starter
from bench.suite.scenarios.common import HTTP_METRICS, MODES, Env, cpus, expect, http_config
from bench.suite.stats import times

ABOUT = """\
The same Python worker (an epoll loop, `bench/workers/httpd.py`; it answers every request
with its pid) behind each way of sharing a port among {n} processes: one process alone; one
shared socket whose workers block in `accept()` (pre-fork; they close after each response,
like gunicorn's sync workers, so keep-alive does not apply to them); one shared socket in every
worker's epoll set (every worker wakes for every connection: the thundering herd); the same
with `EPOLLEXCLUSIVE` (what nginx does with `accept_mutex off`); one SO_REUSEPORT socket per
worker, each process binding its own; and `portshard run -w {n}` with its defaults (the
supervisor owns the sockets; steering on if this portshard has it). Requests/s and errors
come from wrk; p50/p99/max from the Python probe's raw timings; the share of each worker from
the response bodies wrk counted; "empty wakeups" are accept() calls that found nothing (a
worker woken for a connection another worker took), per connection accepted, counted by the
workers themselves.
"""


def scenario(settings: Settings, env: Env) -> Scenario:
    n = settings.workers

    def starters() -> list[tuple[str, str, Starter, float]]:
        def forked(mode: str) -> Starter:
            return lambda a, log: servers.forked(mode, n, a, log)

        ps_args = ["--port", "{port}"]
        return [
            ("single", "one process", lambda a, log: servers.single(a, log), 0.3),
            ("blocking", f"shared socket, blocking accept ({n} pre-fork)", forked("blocking"), 0.3),
            ("epoll", f"shared socket, epoll ({n}, thundering herd)", forked("epoll"), 0.3),
            ("exclusive", f"shared socket, EPOLLEXCLUSIVE ({n})", forked("exclusive"), 0.3),
            (
                "reuseport",
                f"SO_REUSEPORT, one socket per worker ({n})",
                lambda a, log: servers.reuseport_group(n, a, log),
                0.4,
            ),
            (
                "portshard",
                f"portshard run -w {n} (defaults)",
                lambda a, log: servers.portshard(n, [], [*a, *ps_args], log),
                1.0,
            ),
        ]

    wanted = {"single", "reuseport", "portshard"} if settings.quick else None
    configs: list[Config] = []
    for keepalive in (False,) if settings.quick else (False, True):
        mode = "ka" if keepalive else "close"
        for key, label, start, startup in starters():
            if wanted is not None and key not in wanted:
                continue
            configs.append(
                http_config(
                    f"{mode}/{key}",
                    label,
                    start,
                    keepalive=keepalive,
                    baseline=f"{mode}/single",
                    expect_s=expect(settings, startup),
                    worker_counters=True,
                )
            )
    metrics = [*HTTP_METRICS, Metric("empty_wakeups", "empty wakeups/conn", "", "lower", 2)]
    return Scenario(
        "s1_accept",
        "1. Accept strategies",
        ABOUT.format(n=n),
        configs,
        metrics,
        settings.rounds,
        notes=notes,
        plot=plot,
        headline=headline,
    )


def notes(res: ScenarioResult) -> list[str]:
    out = []
    for mode in ("close", "ka"):
        what = MODES[mode == "ka"].capitalize()
        rp = res.ratio(f"{mode}/reuseport", "rps")
        herd = res.paired(f"{mode}/reuseport", f"{mode}/epoll", "rps")
        ps = res.paired(f"{mode}/portshard", f"{mode}/reuseport", "rps")
        if rp.n:
            out.append(
                f"{what}: a socket per worker did {times(rp)} the requests/s of one process "
                f"and {times(herd)} those of a shared socket with epoll; portshard run did "
                f"{times(ps)} plain reuseport (paired within rounds)."
            )
    wrk = res.spread("close/single", "cpu_wrk")
    server = res.spread("close/single", "cpu_server")
    if wrk.n and server.n:
        out.append(
            f"Connection per request, one process: wrk used {wrk.median:.2f} CPU and the "
            f"server {server.median:.2f} (of {cpus()}). On loopback the client pays for its "
            f"end of every handshake and teardown, so the load generator takes a large share "
            f"of the machine and these figures are bounded by it; with {cpus()} CPUs, more "
            f"workers cannot get much more CPU either. Keep-alive shows the servers."
        )
    e = res.spread("close/epoll", "empty_wakeups")
    x = res.spread("close/exclusive", "empty_wakeups")
    if e.n and x.n:
        out.append(
            f"Thundering herd, connection per request: workers polling one socket made "
            f"{e.median:.2f} accept() calls that found nothing per connection, against "
            f"{x.median:.2f} with EPOLLEXCLUSIVE (each wasted wakeup is a context switch)."
        )
    return out


def headline(res: ScenarioResult) -> list[tuple[str, str]]:
    def both(key: str, other: str) -> str:
        return "; ".join(
            f"{'keep-alive' if mode == 'ka' else 'conn/request'} "
            f"{times(res.paired(f'{mode}/{key}', f'{mode}/{other}', 'rps'))}"
            for mode in ("close", "ka")
            if res.runs_of(f"{mode}/{key}")
        )

    rows = [
        ("a socket per worker vs one shared socket (epoll), req/s", both("reuseport", "epoll")),
        ("portshard run vs reuseport by hand, req/s", both("portshard", "reuseport")),
    ]
    e = res.spread("close/epoll", "empty_wakeups")
    x = res.spread("close/exclusive", "empty_wakeups")
    if e.n and x.n:
        rows.append(
            (
                "thundering herd: empty accept() calls per connection, epoll / EPOLLEXCLUSIVE",
                f"{e.median:.3f} / {x.median:.3f}",
            )
        )
    return [(what, fig) for what, fig in rows if fig]


def plot(res: ScenarioResult, out: Path) -> list[Path]:
    from bench.suite.plots import bars  # matplotlib only when plotting

    return [
        bars(res, out / "s1_accept.png", [("rps", "requests/s (wrk)"), ("p99_ms", "p99 ms (raw)")])
    ]
