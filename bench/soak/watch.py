"""What the soak watches from outside: the supervisor's descriptors and memory, and what is
left on the machine afterwards. Only /proc, nothing of portshard's internals."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass, field

__all__ = [
    "Sample",
    "Sampler",
    "cgroup_of",
    "fd_count",
    "kill_marked",
    "leftover_cgroups",
    "listeners_on",
    "marked_processes",
    "rss_kb",
    "slope",
]


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the soak began
    fds: int
    rss_kb: int
    workers: int = -1  # the worker count at a checkpoint (-1: a background sample)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@dataclass
class Sampler:
    """Samples the supervisor's fd count and RSS every ``every`` s in a thread (it only reads
    /proc); notes when the supervisor is gone."""

    pid: int
    t0: float
    every: float = 0.5
    samples: list[Sample] = field(default_factory=list)
    gone_at: float | None = None

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def take(self, workers: int = -1) -> Sample | None:
        try:
            sample = Sample(
                time.monotonic() - self.t0, fd_count(self.pid), rss_kb(self.pid), workers
            )
        except (FileNotFoundError, ProcessLookupError):
            if self.gone_at is None:
                self.gone_at = time.monotonic() - self.t0
            return None
        return sample

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            sample = self.take()
            if sample is not None:
                self.samples.append(sample)


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (0 for fewer than two distinct x)."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def marked_processes(marker: str) -> list[tuple[int, str]]:
    """Every process (but this one) whose environment or command line holds ``marker``."""
    found = []
    me = os.getpid()
    needle = marker.encode()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        cmdline = _read(f"/proc/{name}/cmdline")
        if needle in cmdline or needle in _read(f"/proc/{name}/environ"):
            stat = _read(f"/proc/{name}/stat")
            if not stat or stat[stat.rindex(b")") + 2 :][:1] == b"Z":
                continue  # gone, or a zombie: it holds nothing
            found.append((int(name), _describe(int(name), stat, cmdline)))
    return found


def _describe(pid: int, stat: bytes, cmdline: bytes) -> str:
    """``ppid P, session S (its own), cgroup /x: command`` for a report."""
    fields = stat[stat.rindex(b")") + 2 :].split()
    ppid, sid = int(fields[1]), int(fields[3])
    own = " (its own)" if sid == pid else ""
    command = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()[:100]
    return f"ppid {ppid}, session {sid}{own}, cgroup {cgroup_of(pid)}: {command}"


def kill_marked(marker: str) -> list[int]:
    """SIGKILL what the soak left behind (by pid: every one carries this run's marker)."""
    killed = []
    for pid, _ in marked_processes(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


def listeners_on(port: int) -> int:
    """Sockets listening on ``port`` in this network namespace (/proc/net/tcp and tcp6)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in _read(table).decode().splitlines()[1:]:
            fields = line.split()
            if (
                len(fields) > 3
                and fields[3] == "0A"
                and int(fields[1].rsplit(":", 1)[1], 16) == port
            ):
                count += 1
    return count


def cgroup_of(pid: int) -> str | None:
    """The cgroup2 path of ``pid`` (the ``0::`` line), or None."""
    for line in _read(f"/proc/{pid}/cgroup").decode().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def _cgroup2_mounts() -> list[str]:
    mounts = []
    for line in _read("/proc/self/mountinfo").decode().splitlines():
        pre, _, post = line.partition(" - ")
        if post.split()[:1] == ["cgroup2"]:
            mounts.append(pre.split()[4])
    return mounts


def leftover_cgroups(paths: set[str]) -> list[str]:
    """Which of these cgroup2 paths (as /proc/PID/cgroup names them) still exist under any
    cgroup2 mount."""
    left = []
    for mount in _cgroup2_mounts():
        for path in paths:
            full = os.path.join(mount, path.lstrip("/"))
            if path.strip("/") and os.path.isdir(full):
                left.append(full)
    return sorted(set(left))
