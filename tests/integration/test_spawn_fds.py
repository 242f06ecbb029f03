"""fd placement before exec cannot collide (issue 17): sources anywhere, targets 3..N+2.

A supervisor with 16 slots holds its slot sockets, pidfds and pipes at numbers that overlap
the target range and the place the old code moved things to ("above the range, then down"):
with 16 workers, dup3() of an fd onto its own number failed with EINVAL and no worker could
start. Each case runs in a child process (tests/workers/fdplace.py) that first moves real
sockets to hostile numbers: a permutation of the target range itself, with the error pipe and
the seccomp channel in the way, the old "high" zone, and the range reversed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

FDPLACE = [sys.executable, str(ROOT / "tests" / "workers" / "fdplace.py")]


def run(n: int, seed: int, layout: str, mode: str) -> list[dict[str, object]]:
    res = subprocess.run(
        [*FDPLACE, str(n), str(seed), layout, mode],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


@pytest.mark.parametrize("layout", ["crossing", "reversed", "high"])
@pytest.mark.parametrize(("n", "seed"), [(1, 1), (2, 7), (16, 3), (17, 11), (64, 5), (192, 9)])
def test_place_fds_lands_every_source_in_order(n: int, seed: int, layout: str) -> None:
    (report,) = run(n, seed, layout, "place")
    assert report["got"] == report["want"], "fd 3+i must be source i"
    assert all(report["inheritable"])  # type: ignore[arg-type]
    assert report["kept"] == report["want_kept"], "the error pipe and channel survive"
    assert all(report["kept_cloexec"])  # type: ignore[arg-type]
    assert report["extra"] == [], "nothing else stays open above the targets"


@pytest.mark.parametrize("layout", ["crossing", "high"])
@pytest.mark.parametrize("n", [3, 16, 64])
def test_fork_exec_passes_crossing_fds(n: int, layout: str) -> None:
    child, parent = run(n, n, layout, "exec")
    assert parent["status"] == 0
    assert child["got"] == parent["want"]
    assert child["extra"] == [], "nothing but the placed fds (and 0-2) reaches the program"
    assert child["listen_pid"] is True
