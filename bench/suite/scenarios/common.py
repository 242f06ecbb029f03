"""What the scenarios share: the tools found on this machine, HTTP figures, config helpers."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from bench.suite.harness import Config, Measurement, Metric, Settings
from bench.suite.httprun import Starter, measure
from bench.suite.reload_run import netns_usable
from bench.suite.servers import portshard_options


@dataclass(frozen=True)
class Env:
    """What this machine offers: a reason string for each missing piece, None if present."""

    portshard: dict[str, list[str]]  # option -> its choices, for the options that exist
    nginx: str | None
    haproxy: str | None
    wrk: str | None
    netns: str | None

    @classmethod
    def probe(cls) -> Env:
        def tool(name: str) -> str | None:
            if shutil.which(name):
                return None
            return f"{name} is not installed (Debian package {name}; `make bench` installs it)"

        return cls(portshard_options(), tool("nginx"), tool("haproxy"), tool("wrk"), netns_usable())

    def via_modes(self) -> list[str]:
        """`--via` modes to compare, [] before --via exists. Not auto (it only picks one of
        the others)."""
        return [m for m in self.portshard.get("via", []) if m != "auto"]

    def steering_backends(self) -> list[str]:
        """`--steering` backends (not auto, which picks one, nor off), [] before it exists."""
        return [m for m in self.portshard.get("steering", []) if m not in ("auto", "off")]

    def flag(self, option: str, value: str) -> list[str]:
        """``--option value`` if this portshard has that option, else nothing."""
        return [f"--{option}", value] if value in self.portshard.get(option, []) else []


MODES = {False: "connection per request", True: "keep-alive"}

HTTP_METRICS = [
    Metric("rps", "req/s", better="higher", ratio=True),
    Metric("p50_ms", "p50", "ms", "lower", 2),
    Metric("p99_ms", "p99", "ms", "lower", 2, ratio=True),
    Metric("max_ms", "max", "ms", "lower", 1),
    Metric("jain", "Jain", "", "higher", 3),
    Metric("failed", "errors", "", "lower"),
    Metric("cpu_server", "server CPU", "", "", 2),
    Metric("cpu_wrk", "wrk CPU", "", "", 2),
]


def http_config(
    key: str,
    label: str,
    start: Starter,
    *,
    keepalive: bool,
    baseline: str | None,
    group: str | None = None,
    expect_s: float,
    **measure_kw: bool | int | float | None,
) -> Config:
    def run(settings: Settings) -> Measurement:
        return measure(settings, start, keepalive=keepalive, **measure_kw)  # type: ignore[arg-type]

    return Config(
        key,
        label,
        run,
        group=group if group is not None else MODES[keepalive],
        baseline=baseline,
        expect_s=expect_s,
    )


def cpus() -> int:
    return os.cpu_count() or 1


def expect(settings: Settings, startup: float) -> float:
    """Expected length of one HTTP run: start-up, warm-up, the load, the stop."""
    return settings.seconds + startup + 0.6


def skipped(cfg: Config, reason: str | None) -> Config:
    if reason is None:
        return cfg
    return Config(
        cfg.key, cfg.label, cfg.run, cfg.group, cfg.baseline, reason, cfg.expect_s, cfg.noisy_retry
    )
