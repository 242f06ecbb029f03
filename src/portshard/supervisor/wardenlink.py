"""The supervisor's side of its warden (``warden.py``): start it, keep it current, restart it.

The warden gets every fd a successor needs (slot sockets, the read ends of the workers'
output pipes) once, by key, and the manifest (``handoff.py``) whenever it changed; the loop
calls :meth:`sync` at most every ``SYNC_EVERY`` s and only if something changed. A warden
that dies is started again at once and given everything again (only one that keeps failing
waits: ``RESTART_EVERY``). A warden that cannot keep up (its channel is full) is replaced the
same way. At a clean stop it is told ``bye``; an upgrade's exec keeps its channel
(inheritable) and the warden never knows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..linux.cgroup import Cgroup
from ..linux.exec import ExecSpec, fork_exec
from ..linux.syscalls import pidfd_open
from . import warden as wire

__all__ = ["WardenLink"]

log = logging.getLogger("portshard.supervisor")

RESTART_EVERY = 1.0  # s from a failing warden's start to the next (see _next_start)
QUICK_DEATHS = 3  # wardens killed in a row within RESTART_EVERY of their start, then it applies


Snapshot = Callable[[], tuple[dict[str, Any], dict[str, int]]]


class WardenLink:
    def __init__(
        self, sel: selectors.BaseSelector, control: str, log_format: str, snapshot: Snapshot
    ) -> None:
        self.sel = sel
        self.control = control
        self.log_format = log_format
        self.snapshot = snapshot  # the manifest and its fds now (handoff.export)
        self.channel: socket.socket | None = None
        self.pid = 0
        self.pidfd = -1
        self.sent: dict[str, tuple[int, int]] = {}  # key -> (fd, inode) the warden has
        self.manifest = ""
        self.restart_at = 0.0  # no start before (a warden that keeps failing: _next_start)
        self.started = 0.0  # when the current (or last) warden was started
        self.quick = 0  # wardens in a row that died within RESTART_EVERY of their start
        self.restarts = 0
        self.group: Cgroup | None = None  # its cgroup (in our home: keeps sweeps away)

    @property
    def alive(self) -> bool:
        return self.channel is not None

    def due(self, now: float) -> bool:
        """Lost, and another may start now."""
        return self.channel is None and now >= self.restart_at

    def start(self, now: float) -> bool:
        """Start a warden and give it everything at once; False (logged) if it cannot be.

        At once, not at the loop turn's end: a warden with no manifest whose supervisor dies
        knows no worker, no socket and no --orphan-timeout (it took 0 and exited), and the
        workers started meanwhile outlive everyone (no parent-death signal: a warden ran)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [
            sys.executable,
            "-m",
            "portshard.supervisor.warden",
            self.control,
            str(os.getpid()),
            self.log_format,
        ]
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("LISTEN_") and k not in ("NOTIFY_SOCKET", "PORTSHARD_RESUME")
        }
        try:
            pid = fork_exec(
                ExecSpec(
                    argv,
                    env,
                    fds=[theirs.fileno()],
                    new_group=True,  # a terminal's Ctrl-C is not for it
                    reset_signals=True,
                    death_signal=None,  # the point: it outlives us
                ),
                setup=self.group.join_self if self.group is not None else None,
            )
            pidfd = pidfd_open(pid)
        except OSError as exc:
            ours.close()
            log.warning(
                "cannot start the warden (%s): the workers die with the supervisor",
                exc.strerror or exc,
            )
            self.restart_at = now + RESTART_EVERY
            return False
        finally:
            theirs.close()
        ours.setblocking(False)
        self.channel, self.pid, self.pidfd = ours, pid, pidfd
        self.sent, self.manifest = {}, ""
        self.started = now
        self.sel.register(pidfd, selectors.EVENT_READ, lambda _m: self._exited())
        self._send(now, *self.snapshot())
        return self.alive

    def revive(self, now: float, keys: Sequence[str] = ()) -> bool:
        """Before a spawn decides whether its worker outlives us: a warden lost since the
        last turn is started again now (unless wardens keep failing: ``_next_start``), so
        that the worker gets no parent-death signal. Before, a worker spawned between the
        loss and the next sync (a reload's next slot, a respawn) kept its death signal for
        good, and died with a supervisor killed any time later, failing what it held (3
        keep-alive requests in a fault campaign; a UDP slot answered nothing until the
        rerun respawned it).

        ``keys``: the fds of the worker's slot; a slot the warden has not been given (a scale
        up's) is given now, before its worker runs, so that an adopter knows the slot it
        serves in (before, it stopped that slot and killed its worker)."""
        if self.channel is not None and any(k not in self.sent for k in keys):
            self._send(now, *self.snapshot())  # a full channel: that warden is replaced
        if self.channel is None and now >= self.restart_at:
            self.start(now)
        return self.alive

    def attach(self, channel: int, pid: int) -> None:
        """The warden of the supervisor we replace by exec (an upgrade): the same one."""
        self.channel = socket.socket(fileno=channel)
        self.channel.setblocking(False)
        self.pid = pid
        try:
            self.pidfd = pidfd_open(pid)
        except OSError:
            self._lost("it is gone")
            return
        self.sel.register(self.pidfd, selectors.EVENT_READ, lambda _m: self._exited())

    def _exited(self) -> None:
        status = None
        with contextlib.suppress(ChildProcessError):
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            status = status if pid == self.pid else None
        self._lost("it exited", status)

    def _lost(self, why: str, status: int | None = None) -> None:
        log.warning("the warden (pid %d) is lost (%s); starting another", self.pid, why)
        if self.pidfd >= 0 and status is None:  # one that cannot keep up (its channel
            # full) still runs: it would take our closing the channel for our death, and
            # stop the workers
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        pid = self.pid
        self.close()
        self.restarts += 1
        if status is None:
            status = _reap(pid)
        self.restart_at = self._next_start(time.monotonic(), status)

    def _next_start(self, now: float, status: int | None) -> float:
        """When the next warden may start: at once, unless wardens keep failing.

        At once: before, a warden killed within a second of its own start was started again
        only a second after that start, and the workers spawned meanwhile got the
        parent-death signal (1 request lost in 10 warden runs of the fault campaign, whose
        boot warden is often under a second old when the fault comes). Once a second: a
        warden that exited by itself that soon (it cannot bind its address, its interpreter
        cannot import us), or one more than ``QUICK_DEATHS`` killed that soon in a row (an OOM
        killer that picks it at every start), so that it costs no loop of interpreters."""
        quick = now - self.started < RESTART_EVERY
        self.quick = self.quick + 1 if quick else 0
        by_itself = status is not None and os.WIFEXITED(status)
        if quick and (by_itself or self.quick > QUICK_DEATHS):
            return self.started + RESTART_EVERY
        return 0.0

    def sync(self, now: float, manifest: dict[str, Any], fds: dict[str, int]) -> None:
        """Give the warden what changed (restarting it if it is gone: start() gives it all)."""
        if self.channel is None:
            self.revive(now)
            return
        self._send(now, manifest, fds)
        if self.channel is None:  # found dead or full: the next one now, not next turn
            self.revive(now)

    def _send(self, now: float, manifest: dict[str, Any], fds: dict[str, int]) -> None:
        if self.channel is None:
            return
        current = {}
        for key, fd in fds.items():
            with contextlib.suppress(OSError):
                current[key] = (fd, os.fstat(fd).st_ino)
        text = json.dumps(manifest, sort_keys=True)
        try:
            gone = [k for k in self.sent if k not in current]
            if gone:
                wire.send(self.channel, {"op": "drop", "keys": gone})
            new = [(k, v[0]) for k, v in current.items() if self.sent.get(k) != v]
            wire.send_fds(self.channel, new)
            if text != self.manifest:
                wire.send(self.channel, {"op": "manifest", "manifest": manifest})
        except (BlockingIOError, ConnectionError, OSError) as exc:
            # No later restart than start() set (a second after the last one): a warden
            # that died was often seen here first (a broken pipe), and the workers spawned
            # until another started got the parent-death signal (a keep-alive load lost 7
            # requests in a fault campaign).
            self._lost(f"its channel: {exc}")
            return
        self.sent, self.manifest = current, text

    def inherit(self) -> tuple[int, int] | None:
        """For an upgrade's exec: the channel fd (now inheritable) and the warden's pid."""
        if self.channel is None:
            return None
        os.set_inheritable(self.channel.fileno(), True)
        return self.channel.fileno(), self.pid

    def bye(self) -> None:
        """A clean stop: the warden exits and touches nothing."""
        if self.channel is not None:
            with contextlib.suppress(OSError):
                self.channel.setblocking(True)
                self.channel.settimeout(1.0)
                wire.send(self.channel, {"op": "bye"})
        pid = self.pid
        self.close()
        _reap(pid)

    def close(self) -> None:
        if self.pidfd >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1
        if self.channel is not None:
            self.channel.close()
            self.channel = None


def _reap(pid: int) -> int | None:
    """Wait (at most a second) for a warden that is exiting (it was told bye, or killed);
    its wait status, None if it is not our child or still runs."""
    for _ in range(100):
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if got == pid:
            return status
        time.sleep(0.01)
    return None
