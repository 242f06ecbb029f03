"""PNG plots of scenario results (matplotlib, headless)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt

from bench.suite.harness import ScenarioResult

matplotlib.use("Agg")  # files only, no display (before the first figure is made)

BASE = "#7f7f7f"
OTHER = "#1f77b4"


def groups_of(res: ScenarioResult) -> list[str]:
    seen: list[str] = []
    for cfg in res.scenario.configs:
        if cfg.skip is None and cfg.group not in seen:
            seen.append(cfg.group)
    return seen


def bars(
    res: ScenarioResult, path: Path, metrics: list[tuple[str, str]], *, log: bool = False
) -> Path:
    """Horizontal bars (median, min-max whiskers): one panel per metric and group that has
    that metric; the baseline of each group is grey."""
    panels = []
    for metric, title in metrics:
        for group in groups_of(res):
            cfgs = [x for x in res.scenario.configs if x.group == group and x.skip is None]
            if any(res.spread(c.key, metric).n for c in cfgs):
                panels.append((metric, title, group, cfgs))
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols) or 1
    tallest = max((len(p[3]) for p in panels), default=1)
    fig, axes = plt.subplots(
        rows, cols, figsize=(6.2 * cols, (0.45 * tallest + 1.2) * rows), squeeze=False
    )
    for i, (metric, title, group, cfgs) in enumerate(panels):
        ax: Any = axes[i // cols][i % cols]
        meds, los, his, colors = [], [], [], []
        for cfg in cfgs:
            sp = res.spread(cfg.key, metric)
            ok = sp.n > 0 and not math.isnan(sp.median)
            meds.append(sp.median if ok else 0.0)
            los.append(sp.median - sp.lo if ok else 0.0)
            his.append(sp.hi - sp.median if ok else 0.0)
            colors.append(BASE if cfg.baseline in (None, cfg.key) else OTHER)
        y = list(range(len(cfgs)))
        ax.barh(y, meds, xerr=[los, his], color=colors, capsize=3)
        ax.set_yticks(y, [c.label for c in cfgs], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{group}: {title}" if group else title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        if log and any(m > 0 for m in meds):
            ax.set_xscale("log")
        ax.grid(axis="x", alpha=0.3)
    for j in range(len(panels), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle(f"{res.scenario.title} (median, whiskers min-max)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cdfs(res: ScenarioResult, path: Path, title: str) -> Path:
    """Latency CDFs of the raw probe timings, one line per configuration (its median round
    by p99), one panel per group; log scale."""
    groups = groups_of(res)
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(6.2 * len(groups), 4), squeeze=False)
    for c, group in enumerate(groups):
        ax: Any = axes[0][c]
        for cfg in res.scenario.configs:
            if cfg.group != group or cfg.skip is not None:
                continue
            runs = sorted(
                (r for r in res.runs_of(cfg.key) if r.measurement is not None),
                key=lambda r: r.measurement.metrics.get("p99_ms", 0.0) if r.measurement else 0.0,
            )
            if not runs or runs[len(runs) // 2].measurement is None:
                continue
            m = runs[len(runs) // 2].measurement
            assert m is not None
            pts = m.detail.get("probe_cdf_ms") or []
            if not pts:
                continue
            ys = [i / (len(pts) - 1) for i in range(len(pts))] if len(pts) > 1 else [1.0]
            ax.plot([max(p, 1e-3) for p in pts], ys, label=cfg.label)
        ax.set_xscale("log")
        ax.set_xlabel("latency, ms (raw per-request timings, Python probe)", fontsize=8)
        ax.set_ylabel("fraction of requests", fontsize=8)
        ax.set_title(group, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ratio_bars(res: ScenarioResult, path: Path, metric: str, title: str) -> Path:
    """Ratios against the baseline, paired by round (median, whiskers min-max), a line at 1."""
    cfgs = [c for c in res.scenario.configs if c.skip is None and c.baseline not in (None, c.key)]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(cfgs) + 1.4))
    meds, los, his = [], [], []
    for cfg in cfgs:
        sp = res.ratio(cfg.key, metric)
        ok = sp.n > 0
        meds.append(sp.median if ok else 0.0)
        los.append(sp.median - sp.lo if ok else 0.0)
        his.append(sp.hi - sp.median if ok else 0.0)
    y = list(range(len(cfgs)))
    ax.barh(y, meds, xerr=[los, his], color=OTHER, capsize=3)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(y, [c.label for c in cfgs], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ratio (paired within each round)", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"{res.scenario.title}: {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
