"""The supervisor under test, driven only through its public interfaces: the `portshard` CLI
(run, status, reload, scale, stop), its control socket, signals, and the --metrics endpoint."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CliResult", "Target", "good_config"]

ROOT = Path(__file__).resolve().parent.parent.parent
WORKER = ROOT / "tests" / "workers" / "chaosworker.py"
PORTSHARD = [sys.executable, "-m", "portshard"]


def good_config(marker: str) -> str:
    """The TOML file the supervisor reads (and re-reads on every reload)."""
    command = json.dumps([sys.executable, str(WORKER)])
    return (
        f"command = {command}\n"
        "grace = 10\n"
        "ready-timeout = 20\n"
        "[env]\n"
        f'CHAOS_MARKER = "{marker}"\n'
        'SERVICE_MS = "5"\n'
    )


@dataclass(frozen=True)
class CliResult:
    rc: int
    out: str
    err: str
    seconds: float

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.err


class Target:
    """One `portshard run` with the chaos worker; ``close`` always ends it and its tree."""

    def __init__(self, workdir: Path, marker: str, workers: int) -> None:
        self.workdir = workdir
        self.marker = marker
        self.control = str(workdir / "c.sock")
        self.config = workdir / "soak.toml"
        self.log_path = workdir / "supervisor.log"
        self.config.write_text(good_config(marker))
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        env = {**os.environ, "CHAOS_MARKER": marker}
        env.pop("PORTSHARD_CONTROL", None)
        self.proc = subprocess.Popen(
            [
                *PORTSHARD,
                "run",
                "-w",
                str(workers),
                "--listen",
                "tcp://127.0.0.1:0",
                "--metrics",
                "127.0.0.1:0",
                "--control",
                self.control,
                "--name",
                marker,
                "--config",
                str(self.config),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
        self.pid = self.proc.pid
        self.port = 0
        self.metrics_port = 0

    def cli(self, *args: str, timeout: float = 90) -> CliResult:
        t0 = time.monotonic()
        try:
            res = subprocess.run(
                [*PORTSHARD, *args, "--control", self.control],
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
            return CliResult(-1, "", f"no answer in {timeout}s {err}", time.monotonic() - t0)
        return CliResult(res.returncode, res.stdout, res.stderr, time.monotonic() - t0)

    def status(self, timeout: float = 30) -> dict[str, Any] | None:
        """``status`` straight over the control socket (the documented JSON-lines protocol:
        much cheaper than starting the CLI, which the operations use)."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(self.control)
                s.sendall(b'{"v": 1, "cmd": "status"}\n')
                data = b""
                while not data.endswith(b"\n") and (chunk := s.recv(65536)):
                    data += chunk
            reply = json.loads(data)
        except (OSError, ValueError):
            return None
        if not isinstance(reply, dict) or not reply.get("ok"):
            return None
        result: dict[str, Any] = reply["result"]
        return result

    def wait_ready(self, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"supervisor exited {self.proc.returncode}:\n{self.log()}")
            st = self.status(10) if os.path.exists(self.control) else None
            if st and st.get("ready"):
                self.port = int(st["listen"][0]["port"])
                metrics = str(st.get("metrics") or "")
                self.metrics_port = int(metrics.rsplit(":", 1)[1].split("/")[0]) if metrics else 0
                return st
            time.sleep(0.1)
        raise RuntimeError(f"supervisor not ready in {timeout}s:\n{self.log()}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int | None:
        """`portshard stop`, then wait for the supervisor to exit; its exit code (None: it
        did not exit and was killed)."""
        if self.proc.poll() is None:
            self.cli("stop", timeout=30)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.close()
            return None

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self._log.close()
