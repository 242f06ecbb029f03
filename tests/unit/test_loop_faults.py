"""The loop's sampling survives a worker whose /proc it may not read (no processes needed:
the kernel readers are replaced at their seam, ``portshard.linux``)."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any

import pytest

from portshard.linux import proc, sockdiag
from portshard.supervisor.config import load
from portshard.supervisor.loop import Supervisor
from portshard.supervisor.worker import Slot, Worker

CLI: dict[str, Any] = {"command": ("srv",), "listen": ("tcp://127.0.0.1:0",), "workers": 2}


@pytest.fixture
def sup() -> Iterator[Supervisor]:
    s = Supervisor(load(CLI), CLI)
    try:
        yield s
    finally:
        s._teardown()  # closes its selector and sockets (it never ran)


def test_sampling_skips_a_worker_whose_proc_is_unreadable(
    sup: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A non-root supervisor cannot read a non-dumpable worker's /proc/PID/fd (EACCES); at
    # the fd limit nothing can be read (EMFILE). Either used to escape the loop and kill all.
    sup.fx.bound = [a.address for a in sup.cfg.listen]
    for i, pid in enumerate((4001, 4002)):
        slot = Slot(i, [], sup.cfg)
        slot.workers.append(Worker(slot, pid, -1, 1, "boot", 0.0))
        sup.fleet.slots.append(slot)

    def sockets_of(pid: int) -> set[int]:
        if pid == 4001:
            raise PermissionError(errno.EACCES, "Permission denied", f"/proc/{pid}/fd")
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(proc, "sockets_of", sockets_of)
    monkeypatch.setattr(sockdiag, "connections_by_pid", lambda pids, ports: {4001: 3})
    sup._sample()
    (sample,) = sup.fleet.history.samples
    assert [row["connections"] for row in sample.slots] == [3, 0]
