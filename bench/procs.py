"""Child processes of the bench: each in its own process group, all killed on the way out.

Every server, load generator and supervisor the bench starts goes through `spawn`, so a crash,
Ctrl-C or a failed run never leaves a process behind (`kill_all` runs at exit).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
WORKERS = ROOT / "bench" / "workers"

_live: list[subprocess.Popen[bytes]] = []


class BenchError(Exception):
    """A configuration could not be measured (a server did not start, a tool failed)."""


def spawn(args: list[str], *, log: Path | None = None, **kw: Any) -> subprocess.Popen[bytes]:
    """Start ``args`` in a new session (its own process group); stdout is a pipe unless given,
    stderr goes to ``log`` (or is discarded)."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stdin", subprocess.DEVNULL)
    err = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    try:
        proc = subprocess.Popen(args, stderr=err, start_new_session=True, **kw)
    finally:
        if log and not isinstance(err, int):
            err.close()
    _live.append(proc)
    return proc


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
    """Send ``sig``, wait up to ``grace`` s, then SIGKILL the whole process group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything it left in its group
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    if proc.stdout is not None:
        proc.stdout.close()
    if proc in _live:
        _live.remove(proc)


def kill_all() -> None:
    for proc in list(_live):
        stop(proc, signal.SIGKILL, grace=1.0)


atexit.register(kill_all)


def read_line(proc: subprocess.Popen[bytes], timeout: float, what: str) -> str:
    """The next line ``proc`` prints on stdout, or BenchError after ``timeout`` s."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise BenchError(f"{what}: no line in {timeout:.0f}s (pid {proc.pid})")
            byte = os.read(proc.stdout.fileno(), 1)
            if not byte:
                raise BenchError(f"{what}: exited ({proc.wait(5)}) before it was ready")
            line += byte
    return line.decode().strip()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago: bind port 0, read the number, close.

    For programs that cannot bind port 0 and report it (nginx, HAProxy). Another process may
    take the port before the program binds it: the caller retries on a bind failure."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def http_ok(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> str | None:
    """The body of one ``GET /`` (HTTP/1.0), or None if it failed."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
    except OSError:
        return None
    if not data.startswith(b"HTTP/1.") or b" 200 " not in data.split(b"\r\n", 1)[0]:
        return None
    return data.split(b"\r\n\r\n", 1)[-1].decode(errors="replace").strip()


def wait_http(port: int, timeout: float, what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while http_ok(port) is None:
        if proc.poll() is not None:
            raise BenchError(f"{what}: exited ({proc.returncode}) before answering")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: no HTTP answer on port {port} in {timeout:.0f}s")
        time.sleep(0.02)


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        if int(raw[raw.rindex(b")") + 2 :].split()[1]) == pid:
            out.append(int(name))
    return sorted(out)
