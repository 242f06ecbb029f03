"""The supervisor's descriptor limit (linux/fdlimit.py): raised to the hard limit for itself
and its warden, the operator's soft limit for the workers (also after an upgrade), and worker
counts that cannot fit refused up front with the fix, at start and at a scale."""

from __future__ import annotations

import resource
import subprocess
from pathlib import Path

from tests.conftest import wait_until
from tests.supervisor_fixture import (
    FDWORKER,
    NOFILE,
    PORTSHARD,
    Start,
    no_process_left,
    warden_pids,
)

LISTEN = ("--listen", "tcp://127.0.0.1:0")


def soft(pid: int) -> int:
    return resource.prlimit(pid, NOFILE)[0]


def test_workers_that_cannot_fit_under_the_hard_limit_are_refused_with_the_fix(
    short_tmp: Path,
) -> None:
    # Before: EMFILE from socketpair() in the warden's start, a traceback (ulimit -n 40, -w 16).
    control = short_tmp / "low.sock"
    res = subprocess.run(
        [*PORTSHARD, "run", "--control", str(control), "-w", "16", *LISTEN, "--", *FDWORKER],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: resource.setrlimit(NOFILE, (40, 40)),
    )
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    line = res.stderr.strip()
    assert line.startswith("portshard: error: 16 workers need about "), line
    assert "limit is 40" in line and "ulimit -n " in line and "LimitNOFILE=" in line, line
    assert no_process_left(str(control))


def test_the_supervisor_raises_its_own_limit_and_the_workers_keep_the_operators(
    start: Start,
) -> None:
    sup = start("-w", "16", *LISTEN, "--", *FDWORKER, nofile=(40, 400))
    assert sup.proc is not None
    assert soft(sup.proc.pid) == 400  # 16 workers need ~171
    (warden,) = warden_pids(sup.control)
    assert soft(warden) == 400  # it holds a copy of every fd
    assert {soft(pid) for pid in sup.pids()} == {40}
    # 200 do not fit under 400: refused before anything starts, the fix named.
    res = sup.ctl("scale", "200", check=False)
    assert res.returncode != 0
    assert "scale 200: 200 workers need about" in res.stderr and "limit is 400" in res.stderr
    assert len(sup.status()["slots"]) == 16
    # An upgrade's new image runs the next workers with the operator's limit too.
    sup.ctl("upgrade")
    old = set(sup.pids())
    sup.ctl("reload")
    wait_until(lambda: not old & set(sup.pids()), 30, "every worker replaced")
    assert {soft(pid) for pid in sup.pids()} == {40}
    assert soft(sup.proc.pid) == 400
