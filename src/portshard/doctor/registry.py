"""The probe registry, the report, and a bounded forked child for the probes."""

from __future__ import annotations

import errno
import os
import platform
import signal
import socket
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass

from ..linux.exec import fork_call

Value = str | int | bool | None
_Found = tuple[bool, Value, str]  # what a probe returns: ok, value, detail


@dataclass(frozen=True)
class Check:
    """What one probe found on this machine."""

    key: str
    ok: bool
    value: Value
    detail: str  # what was found (or why the probe failed)
    enables: str  # what it enables in portshard, or what is lost without it


class _Failed(Exception):
    """A probe's negative answer; the message is the detail shown to the user."""


@dataclass(frozen=True)
class _Probe:
    key: str
    run: Callable[[], _Found]
    enables: str
    without: str
    linux_only: bool


_PROBES: list[_Probe] = []
# The report's order: what a reader needs first (the probes live in net.py and procs.py).
ORDER = (
    "reuseport",
    "reuseport_lb",
    "reuseport_cbpf",
    "syn_hold",
    "reuseport_ebpf",
    "sock_ops_inflight",
    "tcp_migrate_req",
    "seccomp_user_notif_addfd",
    "pidfd_getfd",
    "worker_trees",
    "somaxconn",
    "ipv6",
    "euid",
)
_LINUX = sys.platform.startswith("linux")
_TIMEOUT = 5.0  # per probe that waits on a child or a connection


def _probe(
    key: str, enables: str, without: str, *, linux_only: bool = True
) -> Callable[[Callable[[], _Found]], Callable[[], _Found]]:
    """Register a probe; they run, and are shown, in the order they are defined here."""

    def register(run: Callable[[], _Found]) -> Callable[[], _Found]:
        _PROBES.append(_Probe(key, run, enables, without, linux_only))
        return run

    return register


def probe_all() -> list[Check]:
    """Run every probe; never raises for a missing feature."""
    rank = {key: i for i, key in enumerate(ORDER)}
    return [_run(p) for p in sorted(_PROBES, key=lambda p: rank.get(p.key, len(ORDER)))]


def _run(probe: _Probe) -> Check:
    ok: bool
    value: Value
    if probe.linux_only and not _LINUX:
        ok, value, detail = False, None, f"Linux only; this is {sys.platform}"
    else:
        try:
            ok, value, detail = probe.run()
        except Exception as exc:
            ok, value, detail = False, None, _reason(exc)
    return Check(probe.key, ok, value, detail, probe.enables if ok else probe.without)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, _Failed):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return f"timed out after {_TIMEOUT:g}s"
    if isinstance(exc, OSError) and exc.errno:
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


def _kernel() -> str:
    return os.uname().release if hasattr(os, "uname") else platform.release()


def to_json(checks: list[Check]) -> dict[str, object]:
    return {
        "platform": sys.platform,
        "kernel": _kernel(),
        "machine": platform.machine(),
        "checks": {
            c.key: {"ok": c.ok, "value": c.value, "detail": c.detail, "enables": c.enables}
            for c in checks
        },
    }


def _show(value: Value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def render(checks: list[Check]) -> str:
    """An aligned table, a line per check, then why each missing feature is missing."""
    rows = [("ok" if c.ok else "no", c.key, _show(c.value), c.enables) for c in checks]
    widths = [max([len(r[i]) for r in rows], default=0) for i in range(3)]
    ok = sum(c.ok for c in checks)
    lines = [f"portshard doctor: {sys.platform} {_kernel()} {platform.machine()}, "]
    lines[0] += f"{ok} of {len(checks)} available"
    lines += [
        "  ".join(f"{col:<{w}}" for col, w in zip(r[:3], widths, strict=True)) + "  " + r[3]
        for r in rows
    ]
    missing = [c for c in checks if not c.ok]
    if missing:
        lines += ["", "why not:"] + [f"  {c.key}: {c.detail}" for c in missing]
    return "\n".join(lines)


# --- a forked child, bounded and always reaped ----------------------------------------------


class _Child:
    """A forked child that runs ``body(chan)`` and sends the string it returns as its report.

    Parent and child talk over an AF_UNIX SOCK_SEQPACKET pair (one message per send, fds by
    SCM_RIGHTS). Every wait ends at the deadline; leaving the ``with`` block kills the child if
    it still runs, and always reaps it.
    """

    def __init__(self, body: Callable[[socket.socket], str]) -> None:
        self.deadline = time.monotonic() + _TIMEOUT
        self.exit_code: int | None = None
        self.chan, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.pid = fork_call(lambda: _child_main(body, self.chan, theirs))
        except BaseException:
            self.chan.close()
            raise
        finally:
            theirs.close()

    def __enter__(self) -> _Child:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            if self.exit_code is None:
                self._kill()
        finally:
            self.chan.close()

    def left(self) -> float:
        return max(self.deadline - time.monotonic(), 0.001)

    def recv(self, maxfds: int = 0) -> tuple[str, list[int]]:
        """The child's next message and the fds sent with it (ours to close)."""
        self.chan.settimeout(self.left())
        msg, fds, _flags, _addr = socket.recv_fds(self.chan, 512, maxfds)
        for fd in fds:
            os.set_inheritable(fd, False)
        if not msg and not fds:
            raise _Failed(f"the test child (pid {self.pid}) exited early: {self._reap_code()}")
        return msg.decode(errors="replace"), fds

    def wait(self) -> int:
        """Wait for the child to exit (it closes its end of the pair as it does); its code."""
        while True:
            self.chan.settimeout(self.left())
            try:
                if not self.chan.recv(512):
                    break
            except TimeoutError:
                self._kill()
                raise _Failed(f"the test child did not exit within {_TIMEOUT:g}s; killed") from None
        return self._reap_code()

    def _reap_code(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        self.exit_code = os.waitstatus_to_exitcode(status)
        return self.exit_code

    def _kill(self) -> None:
        with suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self._reap_code()


def _child_main(
    body: Callable[[socket.socket], str], ours: socket.socket, theirs: socket.socket
) -> int:
    """In the forked child (linux.exec.fork_call): run ``body``, send its report; exit code."""
    ours.close()
    code = 1
    try:
        report, code = body(theirs), 0
    except BaseException as exc:
        report = f"in the child: {_reason(exc)}"
    theirs.send(report.encode()[:500] or b"?")
    return code


# --- sockets ----------------------------------------------------------------------------------
