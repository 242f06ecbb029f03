"""Write the results: results.json (every figure of every run), report.md, PNG plots, and
headline.md (the table the README shows)."""

from __future__ import annotations

import json
import math
import re
import statistics
import traceback
from pathlib import Path
from typing import Any

from bench.suite.harness import Run, ScenarioResult, Settings
from bench.suite.stats import Spread

METHOD = """\
## How these figures were measured

- **Tools.** Requests/s, errors and each worker's share: **wrk** (Debian's 4.x), whose Lua
  script counts the responses by body (every worker answers with its pid). Latency p50/p99/max:
  **raw per-request timings** from a Python asyncio probe (`bench/load/loadgen.py`: {probe} clients,
  each pausing {pause:g} ms between requests) running beside wrk during the same window. wrk's
  own percentiles are corrected for coordinated omission, which can inflate a bimodal tail
  several times over; they are kept in results.json (`wrk_p99_ms`) for reference only.
  Reload failures: the same asyncio load generator, a new connection per request. UDP: Python
  asyncio clients (`bench/load/udpload.py`).
- **Where the client is the bottleneck.** On loopback the client pays for its half of every
  TCP handshake and teardown, and the kernel work of both ends runs on the same {cpus} CPUs:
  connection-per-request figures are bounded by the load generator (wrk alone uses about a
  CPU; see the "wrk CPU" column), so they understate what the servers could do with a client on
  another machine. The Python probe runs at a bounded rate and only measures latency. The UDP
  clients are Python and cost more per datagram than a bare Python echo, which is why the UDP
  worker does some work per datagram; they still share the CPUs with the servers, so the UDP
  ratios are floors. Keep-alive figures are the ones where the servers, not the clients, set the
  pace.
- **Noise.** Configurations run interleaved, every one once per round, the order rotating
  (A B C, B C A, ...), {rounds} rounds (the overhead scenario {orounds}), each run on freshly
  started servers. Tables give the median over rounds with the min-max range; ratios are
  computed within each round against the baseline measured in that same round, then
  summarised. Every throughput run reads /proc/stat: if the hypervisor
  stole more than {steal:.0%} of the CPU, or other processes used more than {foreign:.0%} of the
  machine, the run was repeated (up to {retries} more times) and the quietest attempt kept.
  The load generator is not pinned to a CPU (pinning hides differences between servers).
- **Bounds.** Every load is bounded in time (wrk `-d`, the probe's and the UDP clients'
  deadlines) and in count (the asyncio loaders' request caps), and every child process is
  killed on the way out.
- **Ports.** Python servers and `portshard run` bind port 0. nginx and HAProxy cannot, so the
  bench binds port 0, closes it and passes the number on; a race with another process is
  possible and retried.
"""


def fmt(x: float, digits: int) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def cell(sp: Spread, digits: int) -> str:
    if not sp.n:
        return "-"
    if sp.n == 1 or sp.lo == sp.hi:
        return fmt(sp.median, digits)
    return f"{fmt(sp.median, digits)} <sub>{fmt(sp.lo, digits)}-{fmt(sp.hi, digits)}</sub>"


def ratio_cell(sp: Spread) -> str:
    if not sp.n:
        return "-"
    if sp.n == 1:
        return f"{sp.median:.2f}x"
    return f"{sp.median:.2f}x <sub>{sp.lo:.2f}-{sp.hi:.2f}</sub>"


def scenario_markdown(res: ScenarioResult, plots: list[Path]) -> str:
    sc = res.scenario
    lines = [f"## {sc.title}", "", sc.about.strip(), ""]
    groups: list[str] = []
    for cfg in sc.configs:
        if cfg.group not in groups:
            groups.append(cfg.group)
    for group in groups:
        cfgs = [c for c in sc.configs if c.group == group]
        # Only the figures this group has.
        metrics = [
            m for m in sc.metrics if any(res.spread(c.key, m.key).n for c in cfgs if not c.skip)
        ]
        base = next((c for c in cfgs if c.baseline == c.key), None)
        if group:
            lines += [f"### {group}", ""]
        head = ["configuration"]
        for m in metrics:
            head.append(f"{m.label} ({m.unit})" if m.unit else m.label)
            if m.ratio and base is not None:
                head.append(f"{m.label} vs baseline")
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for cfg in cfgs:
            label = cfg.label + (" (baseline)" if base is not None and cfg.key == base.key else "")
            if cfg.skip:
                lines.append(f"| {label} | not run: {cfg.skip} |" + " |" * (len(head) - 2))
                continue
            row = [label]
            for m in metrics:
                row.append(cell(res.spread(cfg.key, m.key), m.digits))
                if m.ratio and base is not None:
                    is_base = cfg.key == base.key
                    row.append("1" if is_base else ratio_cell(res.ratio(cfg.key, m.key)))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    runs = res.runs
    retried = sum(1 for r in runs if r.attempts > 1)
    others = [r.measurement.cpu.foreign for r in runs if r.measurement and r.measurement.cpu]
    busy = f"; other processes used {statistics.median(others):.0%} of the machine (median)"
    lines.append(
        f"*{len(runs)} runs in {res.seconds:.0f} s; {retried} repeated because the machine was "
        f"noisy{busy if others else ''}; medians with min-max over rounds.*"
    )
    lines.append("")
    for path in plots:
        lines += [f"![{sc.title}]({path.name})", ""]
    notes = sc.notes(res) if sc.notes else []
    for key, rnd, err in res.errors():
        notes.append(f"**error** in {key}, round {rnd + 1}: {err}")
    if notes:
        lines += [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def run_json(run: Run) -> dict[str, Any]:
    m = run.measurement
    return {
        "config": run.config,
        "round": run.round + 1,
        "attempts": run.attempts,
        "seconds": round(run.seconds, 2),
        "error": run.error,
        "metrics": {k: _num(v) for k, v in m.metrics.items()} if m else None,
        "cpu": m.cpu.as_dict() if m and m.cpu else None,
        "detail": m.detail if m else None,
    }


def _num(v: float) -> float | None:
    return None if isinstance(v, float) and math.isnan(v) else round(v, 6)


def _spread_json(sp: Spread) -> dict[str, float | None]:
    return {k: _num(v) if isinstance(v, float) else v for k, v in sp.as_dict().items()}


def scenario_json(res: ScenarioResult, plots: list[Path], notes: list[str]) -> dict[str, Any]:
    sc = res.scenario
    configs = []
    for cfg in sc.configs:
        metric_keys = sorted(
            {k for r in res.runs_of(cfg.key) if r.measurement for k in r.measurement.metrics}
        )
        configs.append(
            {
                "key": cfg.key,
                "label": cfg.label,
                "group": cfg.group,
                "baseline": cfg.baseline,
                "skip": cfg.skip,
                "summary": {k: _spread_json(res.spread(cfg.key, k)) for k in metric_keys},
                "ratios": {
                    m.key: _spread_json(res.ratio(cfg.key, m.key))
                    for m in sc.metrics
                    if m.ratio and cfg.baseline is not None
                },
            }
        )
    return {
        "title": sc.title,
        "rounds": sc.rounds,
        "seconds": round(res.seconds, 1),
        "metrics": [
            {"key": m.key, "label": m.label, "unit": m.unit, "better": m.better} for m in sc.metrics
        ],
        "configs": configs,
        "runs": [run_json(r) for r in res.runs],
        "notes": notes,
        "plots": [p.name for p in plots],
    }


def noise_summary(results: list[ScenarioResult]) -> dict[str, Any]:
    cpus = [r.measurement.cpu for res in results for r in res.runs if r.measurement]
    steals = [c.steal for c in cpus if c]
    foreign = [c.foreign for c in cpus if c]
    runs = [r for res in results for r in res.runs]
    return {
        "runs": len(runs),
        "repeated": sum(1 for r in runs if r.attempts > 1),
        "attempts": sum(r.attempts for r in runs),
        "errors": sum(1 for r in runs if r.error),
        "steal_median": statistics.median(steals) if steals else None,
        "steal_max": max(steals) if steals else None,
        "others_median": statistics.median(foreign) if foreign else None,
        "others_max": max(foreign) if foreign else None,
    }


def headline_rows(results: list[ScenarioResult]) -> list[tuple[str, str, str]]:
    rows = []
    for res in results:
        if res.scenario.headline is None:
            continue
        try:
            for what, figure in res.scenario.headline(res):
                rows.append((res.scenario.title, what, figure))
        except (KeyError, StopIteration, ValueError, ZeroDivisionError):
            traceback.print_exc()
    return rows


def headline_markdown(
    rows: list[tuple[str, str, str]], machine: dict[str, Any], when: str, others: float | None
) -> str:
    busy = (
        f"; other processes used {others:.0%} of the machine during the median run, hence "
        f"the wide ranges"
        if others and others > 0.05
        else ""
    )
    lines = [
        f"Measured {when} on {machine.get('cpus')} vCPU, Linux {machine.get('kernel')} "
        f"(`make bench`; ratios paired within rounds, medians with min-max in brackets{busy}; "
        f"the full report is written to `bench/results/report.md`):",
        "",
        "| scenario | comparison | result |",
        "|---|---|---|",
    ]
    for title, what, figure in rows:
        lines.append(f"| {re.sub(r'^[0-9]+[.] ', '', title)} | {what} | {figure} |")
    return "\n".join(lines) + "\n"


def write(
    results: list[ScenarioResult],
    settings: Settings,
    meta: dict[str, Any],
    out: Path,
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, list[Path]] = {}
    plot_error = None
    for res in results:
        plots[res.scenario.key] = []
        if res.scenario.plot is None or plot_error:
            continue
        try:
            plots[res.scenario.key] = res.scenario.plot(res, out)
        except ImportError as exc:  # matplotlib is the optional `bench` extra
            plot_error = f"no plots: {exc} (pip install -e '.[bench]'; make bench does)"
    notes = {r.scenario.key: (r.scenario.notes(r) if r.scenario.notes else []) for r in results}
    rows = headline_rows(results)
    data = {
        **meta,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(settings).items()},
        "noise": noise_summary(results),
        "headline": [{"scenario": t, "comparison": w, "result": f} for t, w, f in rows],
        "plot_error": plot_error,
        "scenarios": {
            r.scenario.key: scenario_json(r, plots[r.scenario.key], notes[r.scenario.key])
            for r in results
        },
    }
    (out / "results.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    headline = headline_markdown(
        rows, meta["machine"], meta["finished"][:10], data["noise"]["others_median"]
    )
    (out / "headline.md").write_text(headline)
    (out / "report.md").write_text(report_markdown(results, settings, data, plots, headline))
    return data


def report_markdown(
    results: list[ScenarioResult],
    settings: Settings,
    data: dict[str, Any],
    plots: dict[str, list[Path]],
    headline: str,
) -> str:
    m = data["machine"]
    noise = data["noise"]
    ps = data.get("portshard", {})
    lines = [
        "# portshard benchmark report" + (" (quick)" if settings.quick else ""),
        "",
        f"{data['finished']}, {data['seconds'] / 60:.1f} min, `{data['command']}`.",
        "",
        "| machine | |",
        "|---|---|",
        f"| CPUs | {m.get('cpus')} ({m.get('cpu_model')}) |",
        f"| kernel | Linux {m.get('kernel')} ({m.get('os')}) |",
        f"| memory | {m.get('memory_mib')} MiB |",
        f"| Python | {m.get('python')} |",
        f"| wrk / nginx / HAProxy | {m.get('wrk')} / {m.get('nginx')} / {m.get('haproxy')} |",
        f"| portshard | {ps.get('version')} at {ps.get('git')}"
        + (" (uncommitted changes)" if ps.get("dirty") else "")
        + f"; `run` options: {ps.get('options')} |",
        f"| steal at start | {m.get('steal_at_start', 0):.1%} |",
        f"| steal during runs | median {_pct(noise['steal_median'])}, max "
        f"{_pct(noise['steal_max'])} |",
        f"| other processes during runs | median {_pct(noise['others_median'])}, max "
        f"{_pct(noise['others_max'])} of the machine |",
        f"| runs | {noise['runs']} ({noise['attempts']} attempts, {noise['repeated']} repeated "
        f"for noise, {noise['errors']} errors) |",
        f"| workers | {settings.workers} per configuration (scenario 5 also 2 and 4) |",
        "",
    ]
    if (noise["others_median"] or 0) > settings.max_foreign:
        lines += [
            f"> **The machine was busy.** Other processes used {_pct(noise['others_median'])} "
            f"of it during the median run (more than the {settings.max_foreign:.0%} a run may "
            f"see before it is repeated, and repeats ran out). Absolute figures are low and the "
            f"ranges wide; ratios are paired within rounds but still carry that noise. Run "
            f"again on a quiet machine for tight figures.",
            "",
        ]
    lines += [
        "## Headline",
        "",
        headline,
    ]
    if data.get("plot_error"):
        lines += [f"*{data['plot_error']}*", ""]
    for res in results:
        lines.append(scenario_markdown(res, plots[res.scenario.key]))
    lines.append(
        METHOD.format(
            probe=settings.probe_clients,
            pause=settings.probe_pause * 1000,
            cpus=m.get("cpus"),
            rounds=settings.rounds,
            orounds=settings.overhead_rounds,
            steal=settings.max_steal,
            foreign=settings.max_foreign,
            retries=settings.retries,
        )
    )
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"
