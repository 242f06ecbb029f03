"""proc.RunQueueWaits: /proc/PID/schedstat kept open and read again (the steering's looks)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from portshard.linux import proc


def test_reads_what_schedstat_says_and_forgets_a_process_that_is_gone() -> None:
    waits = proc.RunQueueWaits()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        first = waits.read(child.pid)
        assert first is not None and first.waited >= 0
        again = waits.read(child.pid)  # the same fd, read at offset 0 again
        assert again is not None and again.waited >= first.waited and again.ran >= first.ran
        deadline = time.monotonic() + 10  # it starts Python first, then sleeps
        while (now := waits.read(child.pid)) is not None and now.runnable:
            assert time.monotonic() < deadline, "the child never went to sleep"
            time.sleep(0.01)
        mine = waits.read(os.getpid())
        with open(f"/proc/{os.getpid()}/schedstat") as f:
            direct = int(f.read().split()[1])
        assert mine is not None and mine.waited <= direct
        assert mine.runnable, "this process is running"
    finally:
        child.kill()
        child.wait()
    assert waits.read(child.pid) is None  # gone (its fd names that process, not the pid)
    waits.keep({os.getpid()})
    waits.close()
    assert waits.read(999_999_999) is None
