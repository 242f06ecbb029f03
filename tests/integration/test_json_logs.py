"""--log-format json: the workers' own stdout/stderr lines come back as JSON records."""

from __future__ import annotations

import json
import signal
import sys
from typing import Any

from tests.conftest import wait_until
from tests.supervisor_fixture import Start

# Prints to both streams, a 20 000-byte line, then waits; on SIGTERM writes a last line with
# no newline and exits.
WORKER = r"""
import signal, sys, time
def bye(*_):
    sys.stdout.write("bye without newline"); sys.stdout.flush(); sys.exit(0)
signal.signal(signal.SIGTERM, bye)
print("hello from stdout", flush=True)
print("trouble on stderr", file=sys.stderr, flush=True)
print("x" * 20000, flush=True)
while True:
    time.sleep(1)
"""


def records(text: str) -> list[dict[str, Any]]:
    lines = [line for line in text.splitlines() if line]
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line[:200]!r}") from None
    return out


def test_worker_lines_are_json_with_slot_and_pid(start: Start) -> None:
    sup = start(
        "-w", "2", "--log-format", "json", "--ready", "delay:0.2",
        "--listen", "tcp://127.0.0.1:0", "--", sys.executable, "-c", WORKER,
    )  # fmt: skip
    pids = {s["slot"]: s["pid"] for s in sup.status()["slots"]}

    def from_workers() -> list[dict[str, Any]]:
        return [r for r in records(sup.text()) if "stream" in r]

    assert wait_until(lambda: len(from_workers()) >= 6, timeout=10), sup.text()[-2000:]
    assert sup.proc is not None
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.wait_exit() == 0
    recs = records(sup.text())
    ours = [r for r in recs if "stream" in r]
    for slot, pid in pids.items():
        mine = {(r["stream"], r["level"], r["msg"][:40]) for r in ours if r["pid"] == pid}
        assert all(r["slot"] == slot for r in ours if r["pid"] == pid)
        assert ("stdout", "info", "hello from stdout") in mine
        assert ("stderr", "warning", "trouble on stderr") in mine
        assert ("stdout", "info", "bye without newline") in mine, mine
        long = [r["msg"] for r in ours if r["pid"] == pid and r["msg"].startswith("xxx")]
        assert len(long) == 1 and long[0].endswith("[cut: line longer than 16 KiB]")
        assert len(long[0]) < 17 * 1024
    # the supervisor's own records are there too, and nothing else
    assert any(r.get("logger") == "portshard.supervisor" for r in recs)
