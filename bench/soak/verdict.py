"""The soak's properties, judged from what was recorded: each a Check that passed or names what
broke it."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from .chaos import Fork, Kill, Op
from .client import Failure
from .watch import Sample, slope

__all__ = ["Check", "attribute", "lineage", "resource_trend", "served_after_retired", "trace"]

# A connection in a killed worker's hands fails when the kernel resets it (at once) or when the
# supervisor kills the rest of the worker's tree (its forked children) a moment later.
KILL_SLACK = 0.05  # s of clock skew between the kill and the client's view
TREE_KILL_WINDOW = 3.0  # s after the SIGKILL within which the rest of the tree is killed


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def attribute(failures: list[Failure], kills: list[Kill]) -> dict[str, list[Failure]]:
    """Split the failed requests: ``in_flight_at_kill`` (the connection was in the hands of a
    worker we SIGKILLed, or of its tree, when it was killed), ``in_flight_at_kill_unnamed``
    (no process named itself, but the request was in flight across a SIGKILL) and ``lost``
    (everything else: each one a violation)."""
    killed = {k.pid: k for k in kills}
    out: dict[str, list[Failure]] = {
        "in_flight_at_kill": [],
        "in_flight_at_kill_unnamed": [],
        "lost": [],
    }
    for f in failures:
        kill = killed.get(f.worker or -1) or killed.get(f.pid or -1)
        if kill is not None:
            if kill.t - KILL_SLACK <= f.end and f.start <= kill.t + TREE_KILL_WINDOW:
                out["in_flight_at_kill"].append(f)
                continue
        elif (
            f.pid is None
            and any(f.start - KILL_SLACK <= k.t <= f.end + KILL_SLACK for k in kills)
            and f.kind in ("reset", "short", "timeout")
        ):
            out["in_flight_at_kill_unnamed"].append(f)
            continue
        out["lost"].append(f)
    return out


def lineage(pid: int | None, forks: list[Fork]) -> list[int]:
    """``pid`` and the processes that forked it on demand, up to its worker (the tree's root)."""
    parent = {f.child: f.parent for f in forks if f.parent is not None}
    chain: list[int] = []
    while pid is not None and pid not in chain:
        chain.append(pid)
        pid = parent.get(pid)
    return chain


def trace(f: Failure, forks: list[Fork], kills: list[Kill]) -> str:
    """What the soak knows of a lost request's hands: the process, how it joined its worker's
    tree (forked on demand: by whom, how, when) and what the soak SIGKILLed of that tree."""
    if f.pid is None:
        return f"{f.kind} at {f.start:.3f}-{f.end:.3f}: nobody named itself {f.detail}"
    parts = [f"{f.kind} at {f.start:.3f}-{f.end:.3f} in pid {f.pid} (worker {f.worker})"]
    by_child = {fork.child: fork for fork in forks}
    for pid in lineage(f.pid, forks):
        fork = by_child.get(pid)
        if fork is not None:
            parts.append(f"pid {pid}: forked ({fork.mode}) by pid {fork.parent} at {fork.t:.3f}")
        elif pid == f.worker:
            parts.append(f"pid {pid}: the worker portshard started")
    tree = set(lineage(f.pid, forks)) | {f.worker}
    killed = [f"pid {k.pid} at {k.t:.3f}" for k in kills if k.pid in tree]
    parts.append(f"the soak SIGKILLed {', '.join(killed) if killed else 'nothing of this tree'}")
    return "; ".join(parts)


RETIRED_MARGIN = 2.0  # s: status may lag a retirement by a loop turn and a checkpoint


def served_after_retired(
    last_served: dict[int, float], seen: list[tuple[float, set[int]]]
) -> list[tuple[int, float]]:
    """Workers whose tree answered a request well after the worker had left status for good
    (present at one checkpoint, absent from every later one): a child it forked outlived it
    and still serves the port with old code. (worker, seconds after it left)."""
    out = []
    for worker, t in sorted(last_served.items()):
        present = [i for i, (_, pids) in enumerate(seen) if worker in pids]
        if not present or present[-1] + 1 >= len(seen):
            continue  # never seen, or still there at the last checkpoint
        left = seen[present[-1] + 1][0]
        if t > left + RETIRED_MARGIN:
            out.append((worker, t - left))
    return out


def _third_stats(values: list[tuple[float, int]]) -> dict[str, float]:
    n = len(values)
    first = [v for _, v in values[: max(1, n // 3)]]
    last = [v for _, v in values[n - max(1, n // 3) :]]
    return {
        "first": values[0][1],
        "last": values[-1][1],
        "max": max(v for _, v in values),
        "first_third_median": statistics.median(first),
        "last_third_median": statistics.median(last),
        "first_third_min": min(first),
        "last_third_min": min(last),
        "slope_per_min": slope([(t, float(v)) for t, v in values]) * 60,
    }


def resource_trend(background: list[Sample], checkpoints: list[Sample]) -> dict[str, Any]:
    """fd count and RSS: first/last/max, the first and last thirds, the slope; and the fd count
    at quiet checkpoints per worker count (the fair comparison: a flood or a scale changes the
    count legitimately)."""
    if not background:
        return {}
    trend: dict[str, Any] = {
        "samples": len(background),
        "fds": _third_stats([(s.t, s.fds) for s in background]),
        "rss_kb": _third_stats([(s.t, s.rss_kb) for s in background]),
        "checkpoint_fds": {},
    }
    by_count: dict[int, list[Sample]] = {}
    for s in checkpoints:
        by_count.setdefault(s.workers, []).append(s)
    if checkpoints:
        span = checkpoints[-1].t - checkpoints[0].t
        cut1, cut2 = checkpoints[0].t + span / 3, checkpoints[0].t + 2 * span / 3
        for count, group in sorted(by_count.items()):
            early = [s.fds for s in group if s.t <= cut1]
            late = [s.fds for s in group if s.t >= cut2]
            trend["checkpoint_fds"][str(count)] = {
                "samples": len(group),
                # Medians: a checkpoint may catch a respawn between a killed worker's fds
                # closing and the new one's opening (3 workers: 39, 36, 39, 36, 40...), and
                # min() of a third with more checkpoints found such a dip more often (the
                # soak failed "36 -> 39" with one checkpoint in the last third). A leak moves
                # the median.
                "first_third_median": statistics.median(early) if early else None,
                "last_third_median": statistics.median(late) if late else None,
                "max": max(s.fds for s in group),
            }
    return trend


def checks(
    *,
    alive_throughout: bool,
    gone_at: float | None,
    ops: list[Op],
    split: dict[str, list[Failure]],
    trend: dict[str, Any],
    leftovers: dict[str, list[Any]],
    exit_code: int | None,
    requests_ok: int,
    stale: list[tuple[int, float]],
    fd_tolerance: int,
    rss_tolerance_kb: int,
) -> list[Check]:
    """Every property of the soak, in the order the report lists them."""
    out = [
        Check(
            "supervisor alive throughout",
            alive_throughout,
            "alive" if alive_throughout else f"gone at t={gone_at}",
        ),
        Check("requests served", requests_ok > 0, f"{requests_ok} ok"),
    ]
    lost = split["lost"]
    out.append(
        Check(
            "no failed connection beyond a killed worker's",
            not lost,
            f"{len(lost)} lost: " + "; ".join(_failure_line(f) for f in lost[:5]) if lost else "0",
        )
    )
    out.append(
        Check(
            "no request served by a retired worker's tree",
            not stale,
            "; ".join(f"worker {w}'s tree {s:.1f}s after the worker left" for w, s in stale[:5])
            or "none",
        )
    )
    bad_ops = [op for op in ops if op.outcome == "violation"]
    out.append(
        Check(
            "every operation answered cleanly",
            not bad_ops,
            "; ".join(f"{op.kind}: {op.detail}" for op in bad_ops[:5]) or "all",
        )
    )
    out.extend(_resource_checks(trend, fd_tolerance, rss_tolerance_kb))
    out.append(Check("stopped cleanly", exit_code == 0, f"exit code {exit_code}"))
    for what, items in leftovers.items():
        out.append(Check(f"nothing left: {what}", not items, repr(items[:5]) if items else "none"))
    return out


def _resource_checks(trend: dict[str, Any], fd_tol: int, rss_tol_kb: int) -> list[Check]:
    if not trend:
        return [Check("fd and RSS sampled", False, "no sample of the supervisor")]
    grew = {
        count: g
        for count, g in trend["checkpoint_fds"].items()
        if g["first_third_median"] is not None
        and g["last_third_median"] is not None
        and g["last_third_median"] > g["first_third_median"] + fd_tol
    }
    fd_detail = ", ".join(
        f"{c} workers: {g['first_third_median']:g} -> {g['last_third_median']:g}"
        for c, g in trend["checkpoint_fds"].items()
        if g["first_third_median"] is not None and g["last_third_median"] is not None
    )
    rss = trend["rss_kb"]
    rss_growth = rss["last_third_median"] - rss["first_third_median"]
    return [
        Check(
            "fd count flat (quiet checkpoints, same worker count)",
            not grew,
            fd_detail or "no worker count seen in both the first and the last third",
        ),
        Check(
            "RSS flat",
            rss_growth <= rss_tol_kb,
            f"median {rss['first_third_median']:.0f} -> {rss['last_third_median']:.0f} KiB "
            f"(first -> last third), slope {rss['slope_per_min']:.1f} KiB/min",
        ),
    ]


def _failure_line(f: Failure) -> str:
    who = f"pid {f.pid} worker {f.worker}" if f.pid else "nobody named"
    return f"{f.kind} at {f.start:.3f}-{f.end:.3f} ({who}) {f.detail}"
