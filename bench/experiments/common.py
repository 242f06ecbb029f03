"""What the stand-alone experiments share: a figure as median (min-max), and the machine's
load average (printed with each table: the machine is shared)."""

from __future__ import annotations

import statistics
import subprocess


def summary(values: list[float], digits: int = 1) -> str:
    """``median (min-max)``; one value alone as itself."""
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
