"""`portshard status`, /metrics and the dashboard with 64 workers (issue 17): the table turns
compact off a tall terminal (totals first, the worst slots first) and names the slot that is in
trouble: one whose worker was killed (a restart) and one whose worker is stopped (SIGSTOP:
connections wait in its queue, or steering excludes it).
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from tests.conftest import wait_until
from tests.integration.test_dashboard import CHROMIUM, chromium, get
from tests.integration.test_scale_many import TINY, stop
from tests.supervisor_fixture import PORTSHARD, Running, Start

REQUEST = b"GET / HTTP/1.0\r\n\r\n"


def status_text(sup: Running, *flags: str, lines: int = 24) -> str:
    res = subprocess.run(
        [*PORTSHARD, "status", "--control", sup.control, *flags],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "LINES": str(lines), "COLUMNS": "160"},
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def slot_rows(text: str) -> list[int]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("SLOT")) + 1
    rows = []
    for line in lines[start:]:
        if not line[:1].isdigit():
            break
        rows.append(int(line.split()[0]))
    return rows


def slot_of(sup: Running, slot: int) -> dict[str, Any]:
    return next(s for s in sup.status()["slots"] if s["slot"] == slot)


def queue_some(port: int, count: int) -> list[socket.socket]:
    """``count`` requests; the sockets whose reply has not come within 3 s (queued at the
    stopped worker's slot) are returned open (the caller closes them)."""
    sel = selectors.DefaultSelector()
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(REQUEST)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    deadline = time.monotonic() + 3
    while sel.get_map() and time.monotonic() < deadline:
        for key, _ in sel.select(0.2):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            sel.unregister(sock)
            sock.close()
    left = [k.fileobj for k in sel.get_map().values()]
    sel.close()
    return [s for s in left if isinstance(s, socket.socket)]


def test_status_compact_names_the_worst_slots_at_64_workers(start: Start, short_tmp: Path) -> None:
    tag = f"--tag={uuid.uuid4().hex[:12]}"
    sup = start(
        *("-w", "64", "--surge", "8", "--ready-timeout", "60", "--metrics", "0"),
        *("--listen", "tcp://127.0.0.1:0", "--", *TINY, tag),
        wait=False,
    )
    sup.wait_ready(timeout=90)
    killed, frozen = 37, 50
    os.kill(slot_of(sup, killed)["pid"], signal.SIGKILL)
    wait_until(
        lambda: (s := slot_of(sup, killed))["restarts"] == 1 and s["state"] == "ready",
        30,
        "the killed slot respawned",
    )
    frozen_pid = slot_of(sup, frozen)["pid"]
    os.kill(frozen_pid, signal.SIGSTOP)
    held: list[socket.socket] = []
    try:
        held = queue_some(sup.port, 600)  # ~9 of them hash to the stopped slot
        assert held, "some requests wait at the stopped worker's slot"
        text = status_text(sup)
        rows = slot_rows(text)
        assert len(rows) <= 24 - 10, text
        assert rows[:2] == [frozen, killed], text  # queued (or excluded) first, then restarts
        assert "slots:   64 (64 ready)" in text, text
        assert "totals:  64/64 workers ready" in text and "1 restarts" in text, text
        assert "more healthy slots; --all shows every slot" in text, text
        assert len(slot_rows(status_text(sup, "--all"))) == 64
        assert slot_rows(status_text(sup, lines=200)) == list(range(64))  # fits: full table
        check_metrics_and_dashboard(sup, short_tmp, frozen)
    finally:
        os.kill(frozen_pid, signal.SIGCONT)
        for s in held:
            s.close()
    stop(sup, tag)


def check_metrics_and_dashboard(sup: Running, short_tmp: Path, worst: int) -> None:
    st = sup.status()
    code, text = get(st["metrics"])
    assert code == 200
    assert 'portshard_slots{state="ready"} 64.0' in text
    assert "portshard_workers_ready 64.0" in text
    assert (
        sum(line.startswith("portshard_slot_restarts_total{") for line in text.splitlines()) == 64
    )
    if CHROMIUM is None:
        return
    dom = chromium("--dump-dom", st["dashboard"], profile=short_tmp / "chrome")
    assert dom.count("data-pid=") == 12, dom[:3000]  # the worst 12 rows, not 64
    assert f'<tr data-slot="{worst}"' in dom.split("<tbody>", 1)[1].split("</tr>", 1)[0] + "</tr>"
    assert "more healthy slots" in dom and 'data-total="ready"' in dom
