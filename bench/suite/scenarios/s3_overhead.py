"""Scenario 3: what running under `portshard run` costs, in each `--via` mode."""

from __future__ import annotations

from pathlib import Path

from bench.suite import servers
from bench.suite.harness import Config, Metric, Scenario, ScenarioResult, Settings
from bench.suite.httprun import Starter
from bench.suite.scenarios.common import Env, expect, http_config
from bench.suite.stats import times

ABOUT = """\
The same server ({n} copies of the Python worker) started by itself (each copy binds its own
SO_REUSEPORT socket) and under `portshard run -w {n}`, once per `--via` mode this portshard
offers (how a worker gets its socket: `fds` passes it as LISTEN_FDS, `preload` swaps it in at
the program's `bind()` through an LD_PRELOAD shim, `seccomp` does the same from a seccomp
trap, `reuseport` only sets SO_REUSEPORT on the program's own socket), with steering off so
that only the way in differs, and once with portshard's defaults. The supervisor is not in the
data path, so the ratio should be 1.0 within the noise; it runs {rounds} rounds, connection per
request (the case with the most socket calls per request). "supervisor CPU" is the
supervisor process's own CPU over the measurement (its sampling and steering), in CPUs.
New modes appear here by themselves: the list comes from `portshard run --help`.
"""

METRICS = [
    Metric("rps", "req/s", better="higher", ratio=True),
    Metric("p50_ms", "p50", "ms", "lower", 2),
    Metric("p99_ms", "p99", "ms", "lower", 2, ratio=True),
    Metric("failed", "errors", "", "lower"),
    Metric("cpu_server", "server CPU", "", "", 2),
    Metric("cpu_supervisor", "supervisor CPU", "", "", 3),
]


def portshard_starter(workers: int, flags: list[str]) -> Starter:
    return lambda a, log: servers.portshard(workers, flags, [*a, "--port", "{port}"], log)


def scenario(settings: Settings, env: Env) -> Scenario:
    n = settings.workers
    group = "connection per request"
    configs: list[Config] = [
        http_config(
            "itself",
            f"by itself ({n} copies, own sockets)",
            lambda a, log: servers.reuseport_group(n, a, log),
            keepalive=False,
            baseline="itself",
            group=group,
            expect_s=expect(settings, 0.4),
        )
    ]
    off = env.flag("steering", "off")
    modes = env.via_modes()
    if settings.quick:
        modes = modes[:1]
    for mode in modes:
        configs.append(
            http_config(
                f"via-{mode}",
                f"portshard run --via {mode}" + (" --steering off" if off else ""),
                portshard_starter(n, ["--via", mode, *off]),
                keepalive=False,
                baseline="itself",
                group=group,
                expect_s=expect(settings, 1.0),
            )
        )
    if not settings.quick or not modes:
        configs.append(
            http_config(
                "defaults",
                "portshard run (defaults)",
                portshard_starter(n, []),
                keepalive=False,
                baseline="itself",
                group=group,
                expect_s=expect(settings, 1.0),
            )
        )
    return Scenario(
        "s3_overhead",
        "3. Overhead of running under portshard",
        ABOUT.format(n=n, rounds=settings.overhead_rounds),
        configs,
        METRICS,
        settings.overhead_rounds,
        notes=notes,
        plot=plot,
        headline=headline,
    )


def notes(res: ScenarioResult) -> list[str]:
    out = []
    for cfg in res.scenario.configs:
        if cfg.key == "itself" or cfg.skip:
            continue
        r = res.ratio(cfg.key, "rps")
        if r.n:
            verdict = (
                "within the spread of the rounds"
                if r.lo <= 1.0 <= r.hi
                else "outside the spread of the rounds"
            )
            out.append(
                f"{cfg.label}: {r.median:.3f}x by itself (range {r.lo:.3f}-{r.hi:.3f}, "
                f"{r.n} rounds; 1.0 is {verdict})."
            )
    return out


def headline(res: ScenarioResult) -> list[tuple[str, str]]:
    parts = []
    for cfg in res.scenario.configs:
        r = res.ratio(cfg.key, "rps")
        if cfg.key != "itself" and r.n:
            name = cfg.key.removeprefix("via-")
            parts.append(f"{name} {times(r, 3)}")
    return [("under portshard run vs by itself, req/s, per --via mode", "; ".join(parts))]


def plot(res: ScenarioResult, out: Path) -> list[Path]:
    from bench.suite.plots import ratio_bars  # matplotlib only when plotting

    return [ratio_bars(res, out / "s3_overhead.png", "rps", "requests/s vs by itself")]
