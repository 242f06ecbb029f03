"""What people read: the status table and log lines (text or JSON)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import click

from .supervisor.state import SlotState, State
from .supervisor.status import SlotStatus, Status

__all__ = ["JsonFormatter", "TextFormatter", "format_uptime", "render_status"]

_STATE_COLOUR: dict[State | SlotState, str] = {
    State.READY: "green",
    State.STARTING: "yellow",
    State.DRAINING: "cyan",
    State.STOPPING: "cyan",
    SlotState.BACKOFF: "red",
    SlotState.EMPTY: "red",
    SlotState.REMOVING: "cyan",
}


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


def _queue(slot: SlotStatus) -> str:
    parts = [f"{q.queued}/{q.backlog}" for q in (slot.queue or {}).values()]
    return " ".join(parts) or "-"


def _steering(slot: SlotStatus) -> str:
    steer = slot.steering
    if not steer:
        return "-"
    if isinstance(steer, Mapping):
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


def render_status(status: Status | Mapping[str, Any], *, colour: bool = False) -> str:
    """The `portshard status` table (from the status, or its JSON); colour only when asked
    (the CLI asks on a TTY)."""
    st = status if isinstance(status, Status) else Status.from_json(status)

    def paint(text: str, fg: str | None, bold: bool = False) -> str:
        return click.style(text, fg=fg, bold=bold or None) if colour and fg else text

    head = (
        f"{st.name} (pid {st.pid}): {st.workers} workers, generation "
        f"{st.generation}, up {format_uptime(st.uptime)}, reloads "
        f"{st.reloads_ok} ok / {st.reloads_failed} failed"
    )
    if st.stopping:
        head += ", " + paint("stopping", "yellow")
    elif st.state.value == "draining":
        head += ", " + paint("draining (portshard drain)", "yellow")
    lines = [paint(head, "white", bold=True) if colour else head]
    lines.append("listen:  " + ", ".join(item.address for item in st.listen))
    if st.steering:
        lines.append(f"steering: {st.steering.get('backend', '?')}")
    if st.metrics:
        lines.append(f"metrics: {st.metrics}")
    if st.health:
        lines.append(f"health:  {st.health}/healthz")
    lines += _table(st, paint if colour else None)
    lines.append(
        "QUEUE = connections waiting in the slot's accept queue / its backlog; "
        "CONNS = client connections the worker holds"
    )
    return "\n".join(lines)


def _table(st: Status, paint: Callable[..., str] | None) -> list[str]:
    """One row per slot, columns aligned; ``paint`` colours the state and header."""
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
    states: list[State | SlotState | None] = [None]
    for slot in st.slots:
        rows.append(
            (
                str(slot.slot),
                str(slot.pid or "-"),
                slot.mode or "-",
                slot.state.value,
                str(slot.generation),
                format_uptime(slot.uptime),
                str(slot.restarts),
                _queue(slot),
                "-" if slot.connections is None else str(slot.connections),
                _rate(slot.new_per_s),
                _steering(slot),
            )
        )
        states.append(slot.state)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for row, state in zip(rows, states, strict=True):
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=True)]
        if paint is not None and state is not None:
            cells[3] = paint(cells[3], _STATE_COLOUR.get(state))
            if row[6] != "0":
                cells[6] = paint(cells[6], "yellow")
        elif paint is not None:
            cells = [paint(c, "white", bold=True) for c in cells]
        lines.append("  ".join(cells).rstrip())
    return lines


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s portshard[%(process)d] %(levelname)s %(message)s", datefmt="%H:%M:%S"
        )


class JsonFormatter(logging.Formatter):
    """One JSON object per line for log shippers; lines about a slot or worker carry `slot`
    and `pid` fields (given by the logging call as ``extra=``, see ``worker.log_fields``)."""

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
        for key in ("slot", "pid"):
            value = getattr(record, key, None)
            if isinstance(value, int):
                entry[key] = value
        stream = getattr(record, "stream", None)  # a worker's own line: stdout or stderr
        if isinstance(stream, str):
            entry["stream"] = stream
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)
