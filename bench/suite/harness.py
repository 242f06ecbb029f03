"""The harness: scenarios of configurations, run interleaved (A B C, B C A, ...), repeated, with a
noise check on every run, summarised as medians with min-max and ratios paired within a round.

A run whose measured window had more than ``max_steal`` of the machine stolen by the
hypervisor, or more than ``max_foreign`` used by processes that are not ours, is run again (up
to ``retries`` times); the quietest attempt is kept and the report says how many were retried
and which stayed noisy.
"""

from __future__ import annotations

import math
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bench.procs import BenchError
from bench.suite.machine import CpuUse
from bench.suite.stats import Spread

REPEAT_PAUSE = 2.0  # seconds to wait before repeating a noisy run


@dataclass(frozen=True)
class Settings:
    quick: bool
    rounds: int  # rounds of every scenario (the overhead scenario uses overhead_rounds)
    overhead_rounds: int
    seconds: float  # length of one throughput measurement
    workers: int
    wrk_connections: int
    wrk_threads: int
    probe_clients: int  # the raw-latency probe beside wrk: clients, each pausing probe_pause
    probe_pause: float
    reloads: int  # reloads per run of the reload scenarios
    retries: int
    retry_budget_s: float  # at most this much time spent repeating noisy runs, in all
    max_steal: float
    max_foreign: float
    out: Path
    logs: Path


@dataclass
class Measurement:
    metrics: dict[str, float]  # figures summarised over rounds (median, min-max, ratios)
    cpu: CpuUse | None = None  # the measured window, for the noise check
    detail: dict[str, Any] = field(default_factory=dict)  # kept in the JSON (shares, CDFs...)


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    run: Callable[[Settings], Measurement]
    group: str = ""  # configurations are tabled and plotted by group
    baseline: str | None = None  # key of the configuration its ratios are against
    skip: str | None = None  # why it cannot run here (shown in the report)
    expect_s: float = 5.0  # expected length of one run, for the time-left estimate
    noisy_retry: bool = True  # retry when the machine was noisy (throughput runs)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str = ""
    better: Literal["higher", "lower", ""] = ""
    digits: int = 0
    ratio: bool = False  # also report the ratio against the baseline, paired by round


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    about: str  # Markdown: what it shows and how it is measured
    configs: list[Config]
    metrics: list[Metric]
    rounds: int
    notes: Callable[[ScenarioResult], list[str]] | None = None
    plot: Callable[[ScenarioResult, Path], list[Path]] | None = None
    # rows for the headline table: (what is compared, the figure with its range)
    headline: Callable[[ScenarioResult], list[tuple[str, str]]] | None = None


@dataclass
class Run:
    config: str
    round: int
    attempts: int
    seconds: float
    measurement: Measurement | None
    error: str | None = None

    @property
    def noise(self) -> float:
        cpu = self.measurement.cpu if self.measurement else None
        return cpu.steal + cpu.foreign if cpu else 0.0


@dataclass
class ScenarioResult:
    scenario: Scenario
    runs: list[Run] = field(default_factory=list)
    seconds: float = 0.0

    def runs_of(self, key: str) -> list[Run]:
        return [r for r in self.runs if r.config == key and r.measurement is not None]

    def values(self, key: str, metric: str) -> list[float]:
        return [
            r.measurement.metrics.get(metric, math.nan)
            for r in self.runs_of(key)
            if r.measurement is not None
        ]

    def spread(self, key: str, metric: str) -> Spread:
        return Spread.of(self.values(key, metric))

    def ratio(self, key: str, metric: str) -> Spread:
        """metric(config) / metric(its baseline), paired within each round."""
        cfg = next((c for c in self.scenario.configs if c.key == key), None)
        if cfg is None or cfg.baseline is None:
            return Spread.of([])
        return self.paired(key, cfg.baseline, metric)

    def paired(self, key: str, other: str, metric: str) -> Spread:
        """metric(key) / metric(other), paired within each round."""
        base = {r.round: r for r in self.runs_of(other)}
        ratios = []
        for r in self.runs_of(key):
            b = base.get(r.round)
            if b is None or b.measurement is None or r.measurement is None:
                continue
            num = r.measurement.metrics.get(metric, math.nan)
            den = b.measurement.metrics.get(metric, math.nan)
            if den and not math.isnan(den):
                ratios.append(num / den)
        return Spread.of(ratios)

    def errors(self) -> list[tuple[str, int, str]]:
        return [(r.config, r.round, r.error) for r in self.runs if r.error]


class Progress:
    """Plain progress lines on stderr: what runs now, how far, and about how long is left.

    The estimate starts from each configuration's expected length and is scaled by how long
    the finished runs really took compared with their expectation."""

    def __init__(self, plan: list[tuple[Scenario, Config]], total_s: float) -> None:
        self.total = len(plan)
        self.expected_left = total_s
        self.done = 0
        self.t0 = time.monotonic()
        self.spent_expected = 0.0

    def begin(self, sc: Scenario, cfg: Config, rnd: int, rounds: int, attempt: int) -> None:
        elapsed = time.monotonic() - self.t0
        scale = elapsed / self.spent_expected if self.spent_expected > 5 else 1.0
        left = self.expected_left * min(max(scale, 0.5), 3.0)
        again = f" (again: attempt {attempt + 1}, the last one was noisy)" if attempt else ""
        self.say(
            f"[{self.done + 1:>3}/{self.total} {_mmss(elapsed)} elapsed, ~{_mmss(left)} left] "
            f"{sc.title}: round {rnd + 1}/{rounds}, {cfg.label}{again}"
        )

    def end(self, cfg: Config, text: str, attempt: int = 0) -> None:
        if attempt == 0:  # repeats are not in the plan: they only stretch the estimate
            self.done += 1
            self.expected_left = max(self.expected_left - cfg.expect_s, 0.0)
            self.spent_expected += cfg.expect_s
        self.say(f"      {text}")

    @staticmethod
    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)


def _mmss(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 60}:{s % 60:02d}"


def plan(scenarios: list[Scenario]) -> list[tuple[Scenario, Config]]:
    return [
        (sc, cfg)
        for sc in scenarios
        for _ in range(sc.rounds)
        for cfg in sc.configs
        if cfg.skip is None
    ]


def run_all(scenarios: list[Scenario], settings: Settings, results: list[ScenarioResult]) -> None:
    """Run every scenario, appending to ``results`` as it goes (so an interrupted bench still
    has everything measured so far)."""
    steps = plan(scenarios)
    progress = Progress(steps, sum(cfg.expect_s for _, cfg in steps))
    budget = [settings.retry_budget_s]
    for sc in scenarios:
        result = ScenarioResult(sc)
        results.append(result)
        run_scenario(result, settings, progress, budget)


def run_scenario(
    result: ScenarioResult, settings: Settings, progress: Progress, budget: list[float]
) -> None:
    sc = result.scenario
    t0 = time.monotonic()
    configs = [c for c in sc.configs if c.skip is None]
    for rnd in range(sc.rounds):
        # Interleaved: every configuration once per round. The order rotates from round to
        # round (A B C, B C A, C A B), so neither a periodic load elsewhere on the machine nor
        # what the previous configuration left behind (TIME_WAIT sockets, warm caches) always
        # lands on the same configuration.
        shift = rnd % max(len(configs), 1)
        for cfg in configs[shift:] + configs[:shift]:
            result.runs.append(run_one(sc, cfg, rnd, settings, progress, budget))
            result.seconds = time.monotonic() - t0


def run_one(
    sc: Scenario,
    cfg: Config,
    rnd: int,
    settings: Settings,
    progress: Progress,
    budget: list[float],
) -> Run:
    """One configuration, once; again while the machine was noisy (within the retries and
    the time budget for them); the quietest attempt is kept."""
    attempts: list[Run] = []
    for attempt in range(1 + (settings.retries if cfg.noisy_retry else 0)):
        if attempt and budget[0] <= 0:
            progress.say("      (no time left for repeats: keeping the noisy run)")
            break
        if attempt:
            time.sleep(REPEAT_PAUSE)  # give whatever else was running a moment to finish
            budget[0] -= REPEAT_PAUSE
        progress.begin(sc, cfg, rnd, sc.rounds, attempt)
        t0 = time.monotonic()
        try:
            m: Measurement | None = cfg.run(settings)
            err = None
        except BenchError as exc:
            m, err = None, str(exc)
        except Exception as exc:  # a bug in one configuration must not lose the others' data
            m, err = None, f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        run = Run(cfg.key, rnd, attempt + 1, time.monotonic() - t0, m, err)
        if attempt:
            budget[0] -= run.seconds
        attempts.append(run)
        if err is not None:
            progress.end(cfg, f"error: {err}", attempt)
            return run
        cpu = m.cpu if m else None
        quiet = cpu is None or (
            cpu.steal <= settings.max_steal and cpu.foreign <= settings.max_foreign
        )
        progress.end(cfg, summary_line(sc, m, quiet), attempt)
        if quiet:
            break
    best = min(attempts, key=lambda r: r.noise)
    best.attempts = len(attempts)
    return best


def summary_line(sc: Scenario, m: Measurement | None, quiet: bool) -> str:
    if m is None:
        return "no result"
    parts = []
    for metric in sc.metrics[:4]:
        v = m.metrics.get(metric.key)
        if v is not None and not math.isnan(v):
            unit = f" {metric.unit}" if metric.unit else ""
            parts.append(f"{metric.label} {v:,.{metric.digits}f}{unit}")
    if m.cpu:
        parts.append(f"steal {m.cpu.steal:.1%}, others {m.cpu.foreign:.0%}")
        if not quiet:
            parts.append("NOISY")
    return "; ".join(parts)
