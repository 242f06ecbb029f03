"""The compact status table (issue 17): totals first, the worst slots first, a bounded number
of rows; rendered from a Status built here (pure, no supervisor)."""

from __future__ import annotations

from portshard.render import compact_rows, render_status
from portshard.supervisor.state import SlotState, State
from portshard.supervisor.status import (
    ListenStatus,
    QueueStatus,
    SlotStatus,
    Status,
    healthy,
    totals,
    worst_first,
)


def ready(slot: int, **changes: object) -> SlotStatus:
    fields: dict[str, object] = {
        "slot": slot,
        "pid": 1000 + slot,
        "state": State.READY,
        "mode": "fds",
        "queue": {"tcp0": QueueStatus(0, 4096)},
        "connections": 1,
        "steering": {"excluded": False, "weight": 1.0},
    }
    fields.update(changes)
    return SlotStatus(**fields)  # type: ignore[arg-type]


def many(n: int = 128) -> tuple[SlotStatus, ...]:
    """``n`` ready slots, with a few bad ones at known places."""
    slots = [ready(i) for i in range(n)]
    slots[77] = ready(
        77, pid=None, state=SlotState.BACKOFF, restarts=3, failures=2, mode=None, connections=None
    )
    slots[5] = ready(5, state=State.STARTING, connections=0)
    slots[40] = ready(40, steering={"excluded": True, "reason": "stalled"})
    slots[90] = ready(90, queue={"tcp0": QueueStatus(17, 4096)})
    slots[100] = ready(100, restarts=9)
    return tuple(slots)


def status(slots: tuple[SlotStatus, ...]) -> Status:
    return Status(
        name="web",
        pid=10,
        uptime=61.0,
        generation=2,
        stopping=False,
        ready=True,
        reloads_ok=1,
        reloads_failed=0,
        listen=(ListenStatus("tcp0", "tcp://127.0.0.1:8080", "tcp", 8080),),
        workers=len(slots),
        slots=slots,
    )


def slot_rows(text: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("SLOT")) + 1
    rows = []
    for line in lines[start:]:
        if not line[:1].isdigit():
            break
        rows.append(line.split())
    return rows


def test_worst_first_order() -> None:
    order = [s.slot for s in worst_first(many())]
    # no worker, then not ready, then excluded, then the most queued, then the most restarts
    assert order[:5] == [77, 5, 40, 90, 100]
    assert order[5:] == [i for i in range(128) if i not in (77, 5, 40, 90, 100)]


def test_totals() -> None:
    t = totals(many())
    assert t.slots == 128
    assert t.by_state == {"starting": 1, "ready": 126, "backoff": 1}
    assert t.ready == 126
    assert t.connections == 126  # slot 5 holds 0, slot 77 has no worker
    assert t.queued == 17 and t.restarts == 12 and t.excluded == 1
    assert t.unhealthy == 4  # 77, 5, 40, 90 (restarts alone are not unhealthy)
    assert not healthy(many()[90]) and healthy(many()[100])


def test_compact_table_totals_then_worst_rows() -> None:
    text = render_status(status(many()), rows=10)
    lines = text.splitlines()
    assert len(lines) <= 10 + 10, "bounded: the rows plus a fixed head and foot"
    assert lines[2] == "slots:   128 (1 starting, 126 ready, 1 backoff)"
    assert lines[3] == (
        "totals:  126/128 workers ready, 126 connections, 17 queued, 12 restarts, "
        "1 excluded by steering"
    )
    assert "worst 10 of 128 slots first (4 not healthy)" in text
    rows = slot_rows(text)
    assert [r[0] for r in rows] == ["77", "5", "40", "90", "100", "0", "1", "2", "3", "4"]
    assert rows[0][3] == "backoff" and rows[3][7] == "17/4096"
    assert "... and 118 more healthy slots; --all shows every slot" in text


def test_compact_says_when_left_out_slots_are_not_healthy() -> None:
    text = render_status(status(many()), rows=2)
    assert [r[0] for r in slot_rows(text)] == ["77", "5"]
    assert "... and 126 more slots (2 of them not healthy)" in text


def test_full_table_unchanged_without_rows() -> None:
    text = render_status(status(tuple(ready(i) for i in range(8))))
    assert "totals:" not in text and "more" not in text
    assert [r[0] for r in slot_rows(text)] == [str(i) for i in range(8)]


def test_compact_from_json_as_the_cli_gets_it() -> None:
    text = render_status(status(many()).to_json(), rows=3)
    assert [r[0] for r in slot_rows(text)] == ["77", "5", "40"]


def test_when_compact() -> None:
    assert compact_rows(4, 24) is None  # fits
    assert compact_rows(64, 24) == 12  # does not fit: rows for the terminal
    assert compact_rows(128, 8) == 5  # a tiny terminal still shows a few
    assert compact_rows(128, 200) is None
    assert compact_rows(4, 24, "compact") == 12
    assert compact_rows(128, 24, "all") is None
