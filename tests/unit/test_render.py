"""The status table and the log formats."""

from __future__ import annotations

import json
import logging
from typing import Any

from portshard.render import JsonFormatter, format_uptime, render_status


def status(**changes: Any) -> dict[str, Any]:
    st: dict[str, Any] = {
        "name": "web",
        "pid": 10,
        "uptime": 3725.0,
        "generation": 3,
        "stopping": False,
        "reloads": {"ok": 2, "failed": 1},
        "workers": 2,
        "metrics": None,
        "listen": [{"address": "tcp://:8080"}],
        "slots": [
            {
                "slot": 0,
                "pid": 11,
                "mode": "fds",
                "state": "ready",
                "generation": 3,
                "uptime": 59.0,
                "restarts": 0,
                "queue": {"tcp0": {"queued": 2, "backlog": 4096}},
                "connections": 3,
                "new_per_s": 1234.4,  # counted by the eBPF steering program
            },
            {
                "slot": 1,
                "pid": None,
                "mode": "fds",
                "state": "backoff",
                "generation": 3,
                "uptime": None,
                "restarts": 4,
                "queue": {"tcp0": {"queued": 9, "backlog": 4096}},
                "connections": None,
                "steering": {"excluded": True, "reason": "dead"},
            },
        ],
    }
    st.update(changes)
    return st


def test_table_plain() -> None:
    text = render_status(status())
    assert "\x1b[" not in text
    lines = text.splitlines()
    assert lines[0].startswith("web (pid 10): 2 workers, generation 3, up 1h02m")
    assert "reloads 2 ok / 1 failed" in lines[0]
    header = next(line for line in lines if line.startswith("SLOT"))
    assert header.split() == [
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
    ]
    row0 = next(line for line in lines if line.startswith("0 ")).split()
    assert row0 == ["0", "11", "fds", "ready", "3", "59s", "0", "2/4096", "3", "1234", "-"]
    row1 = next(line for line in lines if line.startswith("1 "))
    assert "backoff" in row1 and "excluded (dead)" in row1 and " - " in row1


def test_table_slot_without_worker_shows_dashes() -> None:
    st = status()
    st["slots"][1]["mode"] = None  # status --json says null when no worker runs in the slot
    row1 = next(line for line in render_status(st).splitlines() if line.startswith("1 "))
    assert "None" not in row1
    assert row1.split()[:4] == ["1", "-", "-", "backoff"]


def test_table_colour_only_when_asked() -> None:
    text = render_status(status(stopping=True), colour=True)
    assert "\x1b[32m" in text  # ready in green
    assert "stopping" in text.splitlines()[0]


def test_uptime() -> None:
    assert [format_uptime(x) for x in (None, 5, 65, 3700, 90000)] == [
        "-",
        "5s",
        "1m05s",
        "1h01m",
        "1d01h",
    ]


def test_json_log_lines_carry_slot_and_pid() -> None:
    record = logging.LogRecord(
        "portshard.supervisor",
        logging.WARNING,
        __file__,
        1,
        "slot %d pid %d: exited (%s)",
        (2, 4242, "exit status 3"),
        None,
    )
    record.__dict__.update(slot=2, pid=4242)  # what extra=log_fields(2, 4242) sets
    entry = json.loads(JsonFormatter().format(record))
    assert entry["slot"] == 2 and entry["pid"] == 4242 and entry["level"] == "warning"
    assert entry["msg"] == "slot 2 pid 4242: exited (exit status 3)"
    plain = logging.LogRecord("portshard", logging.INFO, __file__, 1, "hello", (), None)
    assert "slot" not in json.loads(JsonFormatter().format(plain))
    # The fields come from the record, not from parsing its text.
    text_only = logging.LogRecord(
        "portshard", logging.INFO, __file__, 1, "slot 1 pid 2: x", (), None
    )
    assert "slot" not in json.loads(JsonFormatter().format(text_only))
