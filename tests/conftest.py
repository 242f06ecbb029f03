"""Shared fixtures: real child processes that are always cleaned up, waits with deadlines."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def wait_until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns something truthy; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def default_signals() -> None:
    """preexec_fn for a child a test will interrupt: SIGINT at its default action and no
    signal blocked, as a terminal starts a program. Ignored and blocked signals are inherited
    across exec, and twice in a full run (once with xdist, once without; not reproduced
    alone) a child took no notice of SIGINT at all; whatever state of the test process leaked
    into it, it is not what the test is about."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


class Procs:
    """Starts child processes in their own process group; kills every one of them at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(args, **kw)
        self.procs.append(proc)
        return proc

    def python(self, code: str, *args: str, **kw: Any) -> subprocess.Popen[bytes]:
        return self.start([PYTHON, "-c", code, *args], **kw)

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


@pytest.fixture
def procs() -> Iterator[Procs]:
    group = Procs()
    try:
        yield group
    finally:
        group.cleanup()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory path: pytest's tmp paths can overflow sun_path (108 bytes)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ps-", dir="/tmp") as d:
        yield Path(d)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runs a child as nobody)")

# `make test` runs the suite in two passes (Makefile, target pytest): every test not marked
# `serial` on 2 pytest-xdist workers (`-n 2 --dist loadgroup`), then the `serial` ones alone.
# Serial: what measures a spread or a balance across workers, or saturates the machine for
# long (the benchmarks, the chaos soak): next to another test they would measure that test, or
# slow it into a timeout. Grouped: the files whose module-scoped fixture is expensive (a
# supervisor, a compiled shim, a network test bed): one worker runs the whole file, so the
# fixture is built once, as in a plain run. A plain `pytest` runs everything in one process.
SERIAL_FILES = {
    "test_steering.py": "balance and spread of new connections across slots",
    "test_chaos.py": "35 s soak under load that counts failed requests",
    "test_bench_quick.py": "the quick benchmark suite: saturates both CPUs for ~1 min",
    # its fixture checks that the cgroup2 mount it made is gone afterwards, and the mount is
    # shared by every supervisor on the host: another worker's supervisor keeps it up
    "test_cgroup.py": "the shared cgroup2 mount goes with its last user",
}
GROUPED_FILES = {"test_dashboard.py", "test_netbed.py", "test_shim_fuzz.py"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        name = item.path.name
        if name in SERIAL_FILES:
            item.add_marker(pytest.mark.serial)
        elif name in GROUPED_FILES:
            item.add_marker(pytest.mark.xdist_group(name))
