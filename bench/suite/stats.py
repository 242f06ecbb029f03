"""Small statistics: percentiles of raw samples, medians with ranges, Jain's fairness index."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(sorted_samples: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of samples already sorted ascending (nan when empty)."""
    if not sorted_samples:
        return math.nan
    rank = math.ceil(p / 100 * len(sorted_samples))
    return sorted_samples[min(max(rank, 1), len(sorted_samples)) - 1]


def latency_summary(samples: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean/stdev of raw latencies (seconds in, milliseconds out)."""
    s = sorted(samples)
    if not s:
        return {"n": 0}
    ms = 1000.0
    return {
        "n": len(s),
        "p50_ms": percentile(s, 50) * ms,
        "p90_ms": percentile(s, 90) * ms,
        "p99_ms": percentile(s, 99) * ms,
        "max_ms": s[-1] * ms,
        "mean_ms": statistics.fmean(s) * ms,
        "stdev_ms": (statistics.pstdev(s) if len(s) > 1 else 0.0) * ms,
    }


def cdf_points(samples: Sequence[float], points: int = 200) -> list[float]:
    """``points`` evenly spaced quantiles (ms) of the raw samples: enough to draw a CDF."""
    s = sorted(samples)
    if not s:
        return []
    return [
        round(s[min(int(i / (points - 1) * (len(s) - 1)), len(s) - 1)] * 1000, 4)
        for i in range(points)
    ]


def jain(shares: Sequence[float]) -> float:
    """Jain's fairness index: 1.0 when every worker did the same, 1/n when one did all."""
    if not shares or not any(shares):
        return math.nan
    return sum(shares) ** 2 / (len(shares) * sum(x * x for x in shares))


@dataclass(frozen=True)
class Spread:
    """The median of a figure over rounds, with its minimum and maximum."""

    median: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        clean = [v for v in values if v is not None and not math.isnan(v)]
        if not clean:
            return cls(math.nan, math.nan, math.nan, 0)
        return cls(statistics.median(clean), min(clean), max(clean), len(clean))

    def as_dict(self) -> dict[str, float]:
        return {"median": self.median, "min": self.lo, "max": self.hi, "n": self.n}


def times(sp: Spread, digits: int = 2) -> str:
    """A ratio with its range, for text: ``1.23x (1.10-1.30)``; ``-`` when missing."""
    if not sp.n:
        return "-"
    if sp.n == 1:
        return f"{sp.median:.{digits}f}x"
    return f"{sp.median:.{digits}f}x ({sp.lo:.{digits}f}-{sp.hi:.{digits}f})"


def value(sp: Spread, digits: int = 0) -> str:
    """A median with its range, for text: ``12.3 (11.0-14.1)``; ``-`` when missing."""
    if not sp.n:
        return "-"
    if sp.n == 1 or sp.lo == sp.hi:
        return f"{sp.median:,.{digits}f}"
    return f"{sp.median:,.{digits}f} ({sp.lo:,.{digits}f}-{sp.hi:,.{digits}f})"
