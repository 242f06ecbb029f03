"""Scenario 2: the nginx experiment (accept_mutex on/off, reuseport), and a proxy in front."""

from __future__ import annotations

from pathlib import Path

from bench.suite import servers
from bench.suite.harness import Config, Scenario, ScenarioResult, Settings
from bench.suite.httprun import Starter
from bench.suite.scenarios.common import (
    HTTP_METRICS,
    MODES,
    Env,
    cpus,
    expect,
    http_config,
    skipped,
)
from bench.suite.stats import times, value

ABOUT = """\
nginx (Debian's package) with {n} workers answering `return 200 "$pid"` (no file, no
upstream), in its three ways of accepting: `accept_mutex on` (workers take turns holding the
listening socket; the default before 1.11.3), `accept_mutex off` (every worker polls the one
socket; on Linux 4.5+ nginx adds it with `EPOLLEXCLUSIVE`) and `listen ... reuseport` (one socket
per worker). Configurations are generated in a temporary directory. nginx cannot listen on port
0 and report the port, so the bench binds port 0 itself, closes it, and gives nginx that
number: another process could take the port in between (acceptable for a benchmark; the bench
retries with a new port if nginx fails to bind).

Second part, the proxy alternative: HAProxy (its defaults: a thread per CPU, keep-alive to the
servers, round robin) in front of {n} Python workers, each on a port of its own, against the
same {n} workers under `portshard run` with no proxy in the data path. Same figures and tools
as scenario 1.
"""


def scenario(settings: Settings, env: Env) -> Scenario:
    n = settings.workers
    configs: list[Config] = []
    for keepalive in (False,) if settings.quick else (False, True):
        mode = "ka" if keepalive else "close"
        group = f"nginx, {MODES[keepalive]}"
        nginx_modes = [
            ("accept_mutex_on", "nginx accept_mutex on"),
            ("accept_mutex_off", "nginx accept_mutex off"),
            ("reuseport", "nginx reuseport"),
        ]
        if settings.quick:
            nginx_modes = [nginx_modes[0], nginx_modes[2]]
        for nmode, label in nginx_modes:
            configs.append(
                skipped(
                    http_config(
                        f"{mode}/nginx-{nmode}",
                        label,
                        nginx_starter(nmode, n),
                        keepalive=keepalive,
                        baseline=f"{mode}/nginx-accept_mutex_on",
                        group=group,
                        expect_s=expect(settings, 0.3),
                    ),
                    env.nginx,
                )
            )
        group = f"proxy or kernel, {MODES[keepalive]}"
        configs.append(
            http_config(
                f"{mode}/portshard",
                f"portshard run -w {n}, no proxy",
                lambda a, log: servers.portshard(n, [], [*a, "--port", "{port}"], log),
                keepalive=keepalive,
                baseline=f"{mode}/portshard",
                group=group,
                expect_s=expect(settings, 1.0),
            )
        )
        configs.append(
            skipped(
                http_config(
                    f"{mode}/haproxy",
                    f"HAProxy -> {n} Python workers",
                    lambda a, log: servers.haproxy(n, a, log),
                    keepalive=keepalive,
                    baseline=f"{mode}/portshard",
                    group=group,
                    expect_s=expect(settings, 0.6),
                ),
                env.haproxy,
            )
        )
    return Scenario(
        "s2_nginx",
        "2. nginx accept modes, and a proxy in front",
        ABOUT.format(n=n),
        configs,
        HTTP_METRICS,
        settings.rounds,
        notes=notes,
        plot=plot,
        headline=headline,
    )


def nginx_starter(mode: str, workers: int) -> Starter:
    return lambda _args, log: servers.nginx(mode, workers, log)


def notes(res: ScenarioResult) -> list[str]:
    out = []
    for mode in ("close", "ka"):
        what = MODES[mode == "ka"]
        rp = res.ratio(f"{mode}/nginx-reuseport", "rps")
        off = res.ratio(f"{mode}/nginx-accept_mutex_off", "rps")
        jains = {
            m: res.spread(f"{mode}/nginx-{m}", "jain")
            for m in ("accept_mutex_on", "accept_mutex_off", "reuseport")
        }
        if rp.n:
            out.append(
                f"nginx, {what}: reuseport did {times(rp)} the requests/s of accept_mutex on, "
                f"accept_mutex off {times(off)}. Fairness (Jain's index; 1 = even, "
                f"1/workers = one worker did everything): "
                + ", ".join(f"{m.replace('_', ' ')} {value(j, 2)}" for m, j in jains.items())
                + "."
            )
        hp = res.ratio(f"{mode}/haproxy", "rps")
        if hp.n:
            why = (
                "the proxy's own CPU comes out of what the workers get"
                if hp.median < 1
                else "HAProxy keeps its connections to the workers open, so the Python "
                "workers skip a handshake per request, which the direct setup pays"
            )
            out.append(
                f"HAProxy in front, {what}: {times(hp)} the requests/s of the same workers "
                f"under portshard, with no proxy; on {cpus()} CPUs, {why}."
            )
    return out


def headline(res: ScenarioResult) -> list[tuple[str, str]]:
    modes = [m for m in ("close", "ka") if res.runs_of(f"{m}/portshard")]

    def name(mode: str) -> str:
        return "keep-alive" if mode == "ka" else "conn/request"

    fair = []
    for mode in modes:
        jains = [
            res.spread(f"{mode}/nginx-{m}", "jain")
            for m in ("accept_mutex_on", "accept_mutex_off", "reuseport")
        ]
        if all(j.n for j in jains):
            fair.append(f"{name(mode)} " + " / ".join(f"{j.median:.2f}" for j in jains))
    rows = [
        (
            "nginx reuseport vs accept_mutex on, req/s",
            "; ".join(
                f"{name(m)} {times(res.ratio(f'{m}/nginx-reuseport', 'rps'))}"
                for m in modes
                if res.runs_of(f"{m}/nginx-reuseport")
            ),
        ),
        ("nginx fairness (Jain; 1 = even): accept_mutex on / off / reuseport", "; ".join(fair)),
        (
            "HAProxy in front of the workers vs portshard (no proxy), req/s",
            "; ".join(
                f"{name(m)} {times(res.ratio(f'{m}/haproxy', 'rps'))}"
                for m in modes
                if res.runs_of(f"{m}/haproxy")
            ),
        ),
    ]
    return [(what, fig) for what, fig in rows if fig]


def plot(res: ScenarioResult, out: Path) -> list[Path]:
    from bench.suite.plots import bars  # matplotlib only when plotting

    return [bars(res, out / "s2_nginx.png", [("rps", "requests/s (wrk)"), ("jain", "Jain")])]
