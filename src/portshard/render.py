"""What people read: the status table and log lines (text or JSON)."""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

import click

__all__ = ["JsonFormatter", "TextFormatter", "format_uptime", "render_status"]

_STATE_COLOUR = {
    "ready": "green",
    "starting": "yellow",
    "draining": "cyan",
    "stopping": "cyan",
    "backoff": "red",
    "empty": "red",
    "removing": "cyan",
}
_WORKER_PREFIX = re.compile(r"^slot (\d+) pid (\d+): ")


def format_uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _queue(slot: dict[str, Any]) -> str:
    parts = [f"{q['queued']}/{q['backlog']}" for q in slot.get("queue", {}).values()]
    return " ".join(parts) or "-"


def _steering(slot: dict[str, Any]) -> str:
    steer = slot.get("steering")
    if not steer:
        return "-"
    if isinstance(steer, dict):
        if steer.get("excluded"):
            return f"excluded ({steer.get('reason', '?')})"
        weight = steer.get("weight")
        return f"weight {weight}" if weight is not None else "in"
    return str(steer)


def _rate(value: float | None) -> str:
    """New connections per second (known under eBPF steering only)."""
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def render_status(st: dict[str, Any], *, colour: bool = False) -> str:
    """The `portshard status` table; colour only when asked (the CLI asks on a TTY)."""

    def paint(text: str, fg: str | None, bold: bool = False) -> str:
        return click.style(text, fg=fg, bold=bold or None) if colour and fg else text

    reloads = st["reloads"]
    head = (
        f"{st['name']} (pid {st['pid']}): {st['workers']} workers, generation "
        f"{st['generation']}, up {format_uptime(st.get('uptime'))}, reloads "
        f"{reloads['ok']} ok / {reloads['failed']} failed"
    )
    if st.get("stopping"):
        head += ", " + paint("stopping", "yellow")
    lines = [paint(head, "white", bold=True) if colour else head]
    lines.append("listen:  " + ", ".join(item["address"] for item in st["listen"]))
    if st.get("steering"):
        steering = st["steering"]
        backend = steering.get("backend", "?") if isinstance(steering, dict) else steering
        lines.append(f"steering: {backend}")
    if st.get("metrics"):
        lines.append(f"metrics: {st['metrics']}")
    header = (
        "SLOT",
        "PID",
        "MODE",
        "STATE",
        "GEN",
        "UPTIME",
        "RESTARTS",
        "QUEUE",
        "CONNS",
        "NEW/S",
        "STEERING",
    )
    rows: list[tuple[str, ...]] = [header]
    states: list[str] = [""]
    for slot in st["slots"]:
        conns = slot.get("connections")
        rows.append(
            (
                str(slot["slot"]),
                str(slot["pid"] or "-"),
                slot.get("mode") or "-",
                slot["state"],
                str(slot["generation"]),
                format_uptime(slot.get("uptime")),
                str(slot["restarts"]),
                _queue(slot),
                "-" if conns is None else str(conns),
                _rate(slot.get("new_per_s")),
                _steering(slot),
            )
        )
        states.append(slot["state"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row, state in zip(rows, states, strict=True):
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=True)]
        if colour and state:
            cells[3] = paint(cells[3], _STATE_COLOUR.get(state))
            if row[6] != "0":
                cells[6] = paint(cells[6], "yellow")
        elif colour:
            cells = [paint(c, "white", bold=True) for c in cells]
        lines.append("  ".join(cells).rstrip())
    lines.append(
        "QUEUE = connections waiting in the slot's accept queue / its backlog; "
        "CONNS = client connections the worker holds"
    )
    return "\n".join(lines)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s portshard[%(process)d] %(levelname)s %(message)s", datefmt="%H:%M:%S"
        )


class JsonFormatter(logging.Formatter):
    """One JSON object per line for log shippers; worker lines carry `slot` and `pid` fields."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "supervisor_pid": record.process,
            "msg": message,
        }
        match = _WORKER_PREFIX.match(message)
        if match:
            entry["slot"] = int(match.group(1))
            entry["pid"] = int(match.group(2))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)
