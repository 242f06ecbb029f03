"""Run a real `portshard run` for a test and always clean it up."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from portshard.control.client import request
from portshard.errors import ControlError
from tests.conftest import ROOT, wait_until

PORTSHARD = [sys.executable, "-m", "portshard"]
FDWORKER = [sys.executable, str(ROOT / "tests" / "workers" / "fdworker.py")]


NOFILE = resource.RLIMIT_NOFILE


class Control:
    """Talks to a supervisor's control socket; knows its process if it has one."""

    def __init__(
        self,
        control: str | Path,
        proc: subprocess.Popen[bytes] | None = None,
        log: Path | None = None,
    ) -> None:
        self.control = str(control)
        self.proc = proc
        self.log = log

    def ctl(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [*PORTSHARD, *args, "--control", self.control],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and res.returncode != 0:
            raise AssertionError(f"portshard {' '.join(args)} failed: {res.stderr}\n{self.text()}")
        return res

    def status(self) -> dict[str, Any]:
        """What `portshard status --json` prints, asked in-process: the CLI is one more
        interpreter start (~0.2 s, 0.6 s on a busy machine) per call, and the tests poll this.
        test_run_cli.py checks that the CLI prints exactly this."""
        try:
            return request(self.control, "status", timeout=120)
        except ControlError as exc:
            raise AssertionError(f"status failed: {exc}\n{self.text()}") from None

    def reload(self) -> None:
        """`portshard reload --wait`, asked in-process, for the tests that reload in a loop
        (the CLI's own output is checked where it matters: test_supervisor_ops, test_faults)."""
        try:
            request(self.control, "reload", timeout=120, wait=True)
        except ControlError as exc:
            raise AssertionError(f"reload failed: {exc}\n{self.text()}") from None

    def wait_ready(self, timeout: float = 20) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"supervisor exited {self.proc.returncode}:\n{self.text()}")
            if not os.path.exists(self.control):
                return None
            try:
                st = request(self.control, "status", timeout=120)
            except ControlError:
                return None
            return st if st["ready"] else None

        result: dict[str, Any] = wait_until(ready, timeout, "supervisor ready")
        return result

    @property
    def port(self) -> int:
        return int(self.status()["listen"][0]["port"])

    def pids(self) -> list[int]:
        return [s["pid"] for s in self.status()["slots"]]

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log else ""


class Running(Control):
    """A `portshard run` started for a test; close() always stops it."""

    def __init__(
        self,
        args: list[str],
        control: Path,
        env: dict[str, str] | None = None,
        log: Path | None = None,
        nofile: tuple[int, int] | None = None,
        wrap: list[str] | None = None,
    ):
        log = log or control.with_suffix(".log")
        self._log = open(log, "wb")  # noqa: SIM115 - closed in close()
        proc = subprocess.Popen(
            [*(wrap or []), *PORTSHARD, "run", "--control", str(control), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
            preexec_fn=None if nofile is None else lambda: resource.setrlimit(NOFILE, nofile),
        )
        super().__init__(control, proc, log)

    def text(self) -> str:
        self._log.flush()
        return super().text()

    def wait_exit(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def close(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()


def warden_pids(control: Path) -> list[int]:
    """The wardens (supervisor/warden.py) of the supervisors on ``control``."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [
        int(line.split()[0])
        for line in out.splitlines()
        if "portshard.supervisor.warden" in line and str(control) in line
    ]


def no_process_left(marker: str) -> bool:
    out = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    return not any(marker in line and "ps -eo" not in line for line in out.splitlines())


def settle(seconds: float) -> None:
    """Let a load run for a while (the load itself is bounded)."""
    time.sleep(seconds)


Start = Callable[..., Running]


@pytest.fixture
def start(short_tmp: Path) -> Iterator[Start]:
    """Start `portshard run` with these arguments (waits until ready unless wait=False);
    every supervisor started is stopped at teardown."""
    running: list[Running] = []

    def _start(
        *args: str,
        env: dict[str, str] | None = None,
        wait: bool = True,
        nofile: tuple[int, int] | None = None,
        wrap: list[str] | None = None,
    ) -> Running:
        """``wrap``: a command that execs the rest (setpriv), so the pid is the supervisor's."""
        sup = Running(
            list(args), short_tmp / f"s{len(running)}.sock", env, nofile=nofile, wrap=wrap
        )
        running.append(sup)
        if wait:
            sup.wait_ready()
        return sup

    yield _start
    for sup in running:
        sup.close()
