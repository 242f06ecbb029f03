"""Scenario 4: failed connections per reload under load."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.suite.harness import Config, Measurement, Metric, Scenario, ScenarioResult, Settings
from bench.suite.machine import CpuSample, cpu_use
from bench.suite.reload_run import in_netns, tcp_reload
from bench.suite.scenarios.common import Env, skipped
from bench.suite.stats import value

ABOUT = """\
{n} workers (the Python worker, 1 ms of work per request) under a steady load from the
Python asyncio load generator (`bench/load/loadgen.py`, {c} clients, a new connection per request),
through {r} rolling reloads per run (every worker replaced, one at a time). **naive**: each
worker binds its own SO_REUSEPORT socket; a reload starts the new copy, waits until it
listens, then stops the old one gracefully (SIGTERM: it finishes what it holds and exits).
Its socket closes, and the kernel resets the connections queued on it. **naive +
tcp_migrate_req**: the same with `net.ipv4.tcp_migrate_req=1`, which hands a closing
listener's queue to another socket of the group. **portshard**: `portshard run` (defaults)
and `portshard reload --wait`: the sockets belong to the supervisor and stay open.
Each run happens in a network namespace the bench creates (`unshare --net`, loopback up, the
sysctl set there only; the host's value is never touched), so all three see the same stack.
Failed = refused, reset, empty reply or timeout, as the load generator classified them.
"""

METRICS = [
    Metric("failed_per_reload", "failed/reload", "", "lower", 1),
    Metric("requests", "requests", "", "", 0),
    Metric("reload_s", "reload took", "s", "lower", 2),
    Metric("max_ms", "max latency", "ms", "lower", 0),
]


def scenario(settings: Settings, env: Env) -> Scenario:
    n = settings.workers
    conc = 16 if settings.quick else 32
    per = 1.2 * n * settings.reloads + 2.5  # start, load, reloads (portshard's are slower)

    def config(key: str, label: str, kind: str, migrate: bool) -> Config:
        def run(s: Settings) -> Measurement:
            args = [
                "--kind",
                kind,
                "--workers",
                str(n),
                "--reloads",
                str(s.reloads),
                "--concurrency",
                str(conc),
                "--log",
                str(s.logs / "reload.log"),
            ]
            a = CpuSample.take()
            if env.netns is None:
                out = in_netns(args, migrate, timeout=120 + 30 * s.reloads)
            else:
                out = tcp_reload(
                    kind,
                    workers=n,
                    reloads=s.reloads,
                    concurrency=conc,
                    work_ms=1.0,
                    log=s.logs / "reload.log",
                )
            cpu = cpu_use(a, CpuSample.take())
            return Measurement(metrics(out, s.reloads), cpu, out)

        cfg = Config(key, label, run, group="", expect_s=per, noisy_retry=False)
        return skipped(cfg, env.netns if migrate else None)

    configs = [
        config("naive", "naive: each worker its own socket", "naive", False),
        config("naive-migrate", "naive + tcp_migrate_req=1", "naive", True),
        config("portshard", "portshard run + reload --wait", "portshard", False),
    ]
    return Scenario(
        "s4_reload",
        "4. Reload under load",
        ABOUT.format(n=n, c=conc, r=settings.reloads),
        configs,
        METRICS,
        settings.rounds,
        notes=notes,
        plot=plot,
        headline=headline,
    )


def metrics(out: dict[str, Any], reloads: int) -> dict[str, float]:
    return {
        "failed_per_reload": out["failed"] / max(reloads, 1),
        "requests": float(out["requests"]),
        "reload_s": statistics.median(out["reload_s"]) if out["reload_s"] else float("nan"),
        "max_ms": float(out["max_ms"] or "nan"),
    }


def notes(res: ScenarioResult) -> list[str]:
    out = []
    for cfg in res.scenario.configs:
        if cfg.skip:
            out.append(f"{cfg.label}: not run ({cfg.skip}).")
            continue
        sp = res.spread(cfg.key, "failed_per_reload")
        kinds: dict[str, int] = {}
        for run in res.runs_of(cfg.key):
            if run.measurement:
                for k, v in run.measurement.detail.get("by_kind", {}).items():
                    kinds[k] = kinds.get(k, 0) + int(v)
        if sp.n:
            what = ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())) or "none"
            out.append(
                f"{cfg.label}: {sp.median:.1f} failed connections per reload "
                f"(range {sp.lo:.1f}-{sp.hi:.1f}; all runs: {what})."
            )
    return out


def headline(res: ScenarioResult) -> list[tuple[str, str]]:
    labels, figures = [], []
    for key, label in (
        ("naive", "naive"),
        ("naive-migrate", "naive + tcp_migrate_req"),
        ("portshard", "portshard"),
    ):
        sp = res.spread(key, "failed_per_reload")
        if sp.n:
            labels.append(label)
            figures.append(value(sp, 1))
    return [(f"failed connections per rolling reload: {' / '.join(labels)}", " / ".join(figures))]


def plot(res: ScenarioResult, out: Path) -> list[Path]:
    from bench.suite.plots import bars  # matplotlib only when plotting

    return [
        bars(
            res,
            out / "s4_reload.png",
            [("failed_per_reload", "failed connections per reload"), ("reload_s", "reload, s")],
        )
    ]
