"""What people read: the status table and log lines (text or JSON)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import click

from .logfmt import JsonFormatter, TextFormatter
from .supervisor.state import SlotState, State
from .supervisor.status import SlotStatus, Status, healthy, totals, worst_first

__all__ = ["JsonFormatter", "TextFormatter", "compact_rows", "format_uptime", "render_status"]

# Lines of a status screen that are not slot rows (head, listen, steering, metrics, totals,
# table header, "... and K more", the legend): what a compact table leaves for rows.
_OVERHEAD = 10
MIN_ROWS = 5

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


def compact_rows(slots: int, lines: int, layout: str | None = None) -> int | None:
    """How many slot rows `status` shows on a terminal of ``lines`` lines, or None for the
    full table: ``layout`` "all" is always full, "compact" always compact, None (the default)
    compact only when the slots do not fit."""
    rows = max(MIN_ROWS, lines - _OVERHEAD - 2)
    if layout == "all" or (layout is None and slots + _OVERHEAD <= lines):
        return None
    return rows


def _supervisor_line(st: Status, paint: Callable[[str, str | None], str]) -> list[str]:
    """Its own life (issue 15): shown once it has been upgraded or adopted, or an upgrade
    was refused."""
    lin = st.supervisor
    if lin is None or (lin.generation == 1 and not lin.upgrade_error):
        return []
    began = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lin.since))
    text = (
        f"supervisor: generation {lin.generation} (this one by {lin.began} at {began}; "
        f"{lin.upgrades} upgrade(s), {lin.adoptions} adoption(s), first started "
        f"{format_uptime(time.time() - lin.first)} ago)"
    )
    adopted = sum(1 for s in st.slots for w in s.workers if w.adopted is not None)
    if adopted:
        text += f"; {adopted} worker(s) adopted"
    lines = [text]
    if lin.upgrade_error:
        lines.append(paint(f"last upgrade refused: {lin.upgrade_error}", "red"))
    return lines


def render_status(
    status: Status | Mapping[str, Any], *, colour: bool = False, rows: int | None = None
) -> str:
    """The `portshard status` table (from the status, or its JSON); colour only when asked
    (the CLI asks on a TTY). ``rows`` makes it compact: totals first, then at most ``rows``
    slots, the worst first, and a count of the healthy slots left out."""
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
    lines += _supervisor_line(st, paint)
    if st.steering:
        lines.append(f"steering: {st.steering.get('backend', '?')}")
    if st.metrics:
        lines.append(f"metrics: {st.metrics}")
    if st.health:
        lines.append(f"health:  {st.health}/healthz")
    if rows is None:
        lines += _table(st.slots, paint if colour else None)
    else:
        lines += _compact(st, rows, paint if colour else None)
    lines.append(
        "QUEUE = connections waiting in the slot's accept queue / its backlog; "
        "CONNS = client connections the worker holds"
    )
    return "\n".join(lines)


def _compact(st: Status, rows: int, paint: Callable[..., str] | None) -> list[str]:
    """Totals, then the worst ``rows`` slots; the slots left out are counted (and said to be
    healthy only when they all are)."""
    t = totals(st.slots)
    states = ", ".join(f"{n} {name}" for name, n in t.by_state.items()) or "none"
    lines = [
        f"slots:   {t.slots} ({states})",
        f"totals:  {t.ready}/{t.slots} workers ready, {t.connections} connections, "
        f"{t.queued} queued, {t.restarts} restarts, {t.excluded} excluded by steering",
    ]
    ranked = worst_first(st.slots)
    shown, left = ranked[:rows], ranked[rows:]
    lines.append(f"worst {len(shown)} of {t.slots} slots first ({t.unhealthy} not healthy):")
    lines += _table(tuple(shown), paint)
    if left:
        sick = sum(1 for s in left if not healthy(s))
        what = "healthy slots" if not sick else f"slots ({sick} of them not healthy)"
        lines.append(f"... and {len(left)} more {what}; --all shows every slot")
    return lines


def _table(slots: tuple[SlotStatus, ...], paint: Callable[..., str] | None) -> list[str]:
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
    for slot in slots:
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
