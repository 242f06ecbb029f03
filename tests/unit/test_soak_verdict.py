"""The chaos soak's judge (bench/soak/verdict.py) on made-up records: each property can fail,
and a failure is blamed on a SIGKILL only when the connection was in the killed tree's hands."""

from __future__ import annotations

from bench.soak.chaos import Fork, Kill, Op
from bench.soak.client import Failure
from bench.soak.verdict import (
    attribute,
    checks,
    lineage,
    resource_trend,
    served_after_retired,
    trace,
)
from bench.soak.watch import Sample, slope

KILL = Kill(t=10.0, pid=100, slot=1)


def test_a_failure_in_the_killed_workers_tree_is_in_flight_at_the_kill() -> None:
    worker = Failure(9.9, 10.01, "short", pid=100, worker=100)
    child = Failure(10.5, 10.6, "reset", pid=101, worker=100)  # its child, killed after it
    split = attribute([worker, child], [KILL])
    assert split["in_flight_at_kill"] == [worker, child] and not split["lost"]


def test_other_failures_are_lost() -> None:
    other_worker = Failure(9.9, 10.01, "short", pid=200, worker=200)
    long_after = Failure(20.0, 20.1, "short", pid=100, worker=100)
    before = Failure(5.0, 5.1, "short", pid=100, worker=100)
    refused = Failure(9.9, 10.1, "refused", pid=None, worker=None)
    nobody_no_kill = Failure(30.0, 30.1, "reset", pid=None, worker=None)
    split = attribute([other_worker, long_after, before, refused, nobody_no_kill], [KILL])
    assert split["lost"] == [other_worker, long_after, before, refused, nobody_no_kill]


def test_an_unnamed_failure_across_a_kill_is_counted_apart() -> None:
    across = Failure(9.95, 10.02, "short", pid=None, worker=None)
    split = attribute([across], [KILL])
    assert split["in_flight_at_kill_unnamed"] == [across] and not split["lost"]


def _judge(**kw: object) -> dict[str, bool]:
    args: dict[str, object] = {
        "alive_throughout": True,
        "gone_at": None,
        "ops": [Op("reload", 0.0, 1.0, "ok")],
        "split": {"in_flight_at_kill": [], "in_flight_at_kill_unnamed": [], "lost": []},
        "trend": resource_trend(
            [Sample(t, 20, 30_000) for t in range(30)],
            [Sample(t, 20, 30_000, workers=3) for t in range(0, 30, 3)],
        ),
        "leftovers": {"processes": []},
        "exit_code": 0,
        "requests_ok": 10,
        "stale": [],
        "fd_tolerance": 2,
        "rss_tolerance_kb": 1024,
    }
    args.update(kw)
    return {c.name: c.ok for c in checks(**args)}  # type: ignore[arg-type]


def test_a_clean_run_passes_every_check() -> None:
    assert all(_judge().values())


def test_each_property_can_fail() -> None:
    lost = Failure(1.0, 1.1, "reset", 5, 5)
    leak = resource_trend(
        [Sample(t, 20 + t, 30_000 + 100 * t) for t in range(30)],
        [Sample(t, 20 + t, 30_000 + 100 * t, workers=3) for t in range(0, 30, 3)],
    )
    cases = {
        "supervisor alive throughout": {"alive_throughout": False},
        "no failed connection beyond a killed worker's": {
            "split": {"in_flight_at_kill": [], "in_flight_at_kill_unnamed": [], "lost": [lost]}
        },
        "every operation answered cleanly": {"ops": [Op("reload", 0, 1, "violation", "trace")]},
        "fd count flat (quiet checkpoints, same worker count)": {"trend": leak},
        "RSS flat": {"trend": leak},
        "stopped cleanly": {"exit_code": 1},
        "no request served by a retired worker's tree": {"stale": [(4, 3.0)]},
        "nothing left: processes": {"leftovers": {"processes": [(7, "x")]}},
    }
    for name, change in cases.items():
        got = _judge(**change)
        assert got[name] is False, (name, got)


def test_slope() -> None:
    assert slope([(0, 1), (1, 3), (2, 5)]) == 2.0
    assert slope([(1, 1)]) == 0.0


def test_a_tree_serving_after_its_worker_left_is_found() -> None:
    seen = [(0.0, {1, 2}), (5.0, {1, 2}), (10.0, {1, 3}), (20.0, {1, 3})]
    last = {1: 25.0, 2: 11.0, 3: 25.0, 9: 30.0}  # 2 left at 10 s: 1 s later is the margin
    assert served_after_retired(last, seen) == []
    last[2] = 15.0  # 5 s after it left status: an escaped child serves old code
    assert served_after_retired(last, seen) == [(2, 5.0)]


def test_a_respawns_dip_in_the_fd_count_is_not_a_leak() -> None:
    # Seen at load 5 (seed 3743386852): 3-worker checkpoints 39, 39, 40, 36, 39, 39, 36...
    # (a checkpoint between a killed worker's fds closing and its successor's opening) and
    # one in the last third, 39: min() against min() read "36 -> 39" as a leak.
    early = [39, 39, 40, 36, 39, 39, 39, 36, 40, 36]
    points = [Sample(t, fds, 30_000, workers=3) for t, fds in enumerate(early)]
    points.append(Sample(30, 39, 30_000, workers=3))
    trend = resource_trend([Sample(t, 39, 30_000) for t in range(31)], points)
    assert _judge(trend=trend)["fd count flat (quiet checkpoints, same worker count)"]
    grown = [*points[:-1], *(Sample(t, 45, 30_000, workers=3) for t in range(25, 31))]
    trend = resource_trend([Sample(t, 39, 30_000) for t in range(31)], grown)
    assert not _judge(trend=trend)["fd count flat (quiet checkpoints, same worker count)"]


def test_a_lost_request_is_traced_to_its_worker_through_the_forks() -> None:
    # A request lost in a setsid child's hands: the report names who forked it, how and when,
    # up to the worker portshard started, and whether the soak killed any of that tree.
    forks = [Fork(3.0, 20, "serve", 10, 10), Fork(5.0, 30, "setsid", 20, 10)]
    lost = Failure(9.0, 9.1, "short", 30, 10, "b'HTTP/1.0 200 OK'")
    assert lineage(30, forks) == [30, 20, 10]
    text = trace(lost, forks, [Kill(1.0, 99, 0)])
    assert "in pid 30 (worker 10)" in text
    assert "pid 30: forked (setsid) by pid 20 at 5.000" in text
    assert "pid 20: forked (serve) by pid 10 at 3.000" in text
    assert "pid 10: the worker portshard started" in text
    assert "SIGKILLed nothing of this tree" in text
    assert "SIGKILLed pid 20 at 2.000" in trace(lost, forks, [Kill(2.0, 20, -1)])
    assert "nobody named itself" in trace(Failure(1.0, 1.1, "reset", None, None), forks, [])
