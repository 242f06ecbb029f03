"""proc.RunQueueWaits: /proc/PID/schedstat kept open and read again (the steering's looks)."""

from __future__ import annotations

import os
import subprocess
import sys

from portshard.linux import proc


def test_reads_what_run_queue_wait_reads_and_forgets_a_process_that_is_gone() -> None:
    waits = proc.RunQueueWaits()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        first = waits.read(child.pid)
        assert first is not None and first >= 0
        again = waits.read(child.pid)  # the same fd, read at offset 0 again
        assert again is not None and again >= first
        mine = waits.read(os.getpid())
        direct = proc.run_queue_wait(os.getpid())
        assert mine is not None and direct is not None and mine <= direct
    finally:
        child.kill()
        child.wait()
    assert waits.read(child.pid) is None  # gone (its fd names that process, not the pid)
    waits.keep({os.getpid()})
    waits.close()
    assert waits.read(999_999_999) is None
