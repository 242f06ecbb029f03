"""`make demo` (examples/demo.py): runs in seconds, reports 4 pids, leaves nothing running."""

from __future__ import annotations

import re
import signal
import subprocess

from tests.conftest import PYTHON, ROOT, Procs, default_signals, wait_until

from ._util import process_gone, read_line

DEMO = str(ROOT / "examples" / "demo.py")
ROW = re.compile(r"^\s+(\d+)\s+(\d+)\s+(\d+\.\d)%", re.MULTILINE)


def test_demo_spreads_400_requests_over_4_pids(procs: Procs) -> None:
    demo = procs.start([PYTHON, DEMO], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = demo.communicate(timeout=60)
    text = out.decode()
    assert demo.returncode == 0, text + err.decode()
    rows = [(int(pid), int(n)) for pid, n, _ in ROW.findall(text)]
    assert len(rows) == 4, text
    assert len({pid for pid, _ in rows}) == 4
    assert sum(n for _, n in rows) == 400
    assert all(n > 0 for _, n in rows), text
    assert re.search(r"^\s+total\s+400\s+100\.0%", text, re.MULTILINE), text
    assert re.search(r"^\s+failed\s+0$", text, re.MULTILINE), text
    assert "SO_REUSEPORT" in text and "What the kernel did" in text
    assert "4 of 4 exited cleanly" in text
    for pid, _ in rows:
        assert process_gone(pid), f"demo left pid {pid} running"


def test_demo_stops_every_worker_on_ctrl_c(procs: Procs) -> None:
    demo = procs.start(
        [PYTHON, DEMO, "--requests", "1000000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
        preexec_fn=default_signals,
    )
    while "READY=1" not in (line := read_line(demo, timeout=30)):
        pass
    pids = [int(pid) for pid in re.findall(r"\d+", line.split("pids", 1)[1])]
    assert len(pids) == 4
    demo.send_signal(signal.SIGINT)  # to the demo only: it must stop its workers itself
    out, _ = demo.communicate(timeout=30)
    assert demo.returncode == 130
    assert b"interrupted" in out
    wait_until(lambda: all(map(process_gone, pids)), timeout=10, what=f"pids {pids} to exit")
