"""What the stand-alone experiments share: a figure as median (min-max), and the machine's
load average (printed with each table: the machine is shared)."""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from portshard.control.client import request
from portshard.errors import PortshardError


def summary(values: list[float], digits: int = 1) -> str:
    """``median (min-max)``; one value alone as itself."""
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def report(results: Path, rows: Any, load_before: str, text: str) -> None:
    """Print the table with the load average before and now, and write both with the rows."""
    load_after = uptime()
    print(f"\n{text}\n\nbefore: {load_before}\nafter:  {load_after}")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(
        json.dumps({"rows": rows, "uptime": [load_before, load_after], "table": text}, indent=1)
    )


def wait_ready(
    sup: subprocess.Popen[bytes], control: Path, timeout: float, why: Callable[[], str]
) -> None:
    """Until the `portshard run` behind ``control`` says every worker is ready; SystemExit
    with ``why()`` (the log's tail, say) if it exits or ``timeout`` s pass first."""
    deadline = time.monotonic() + timeout
    while not (control.exists() and _ready(control)):
        if sup.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(why())
        time.sleep(0.05)


def _ready(control: Path) -> bool:
    try:
        return bool(request(str(control), "status", timeout=10).get("ready"))
    except (OSError, PortshardError):
        return False
