"""One soak: start a supervisor, load it, run the chaos until the time is up, stop it, look for
leftovers, judge. ``run_soak`` returns the report (a dict, also written as JSON + Markdown)."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import verdict
from .chaos import Chaos, Op, summary
from .client import Failure, Load
from .target import Target
from .watch import (
    Sample,
    Sampler,
    cgroup_of,
    kill_marked,
    leftover_cgroups,
    listeners_on,
    marked_processes,
)

__all__ = ["SoakConfig", "run_soak"]

log = logging.getLogger("soak")

RESULTS = Path(__file__).resolve().parent.parent / "results" / "soak"
AROUND = 2  # s of the supervisor's log before and after a lost request that a report shows


@dataclass(frozen=True)
class SoakConfig:
    seconds: float = 600.0
    seed: int | None = None  # None: a fresh one (printed)
    workers: int = 3  # at start; scale moves between min and max
    min_workers: int = 2
    max_workers: int = 5
    concurrency: int = 8  # clients of the load
    flood_max: int = 300
    pause: tuple[float, float] = (0.1, 0.6)  # s between two operations
    fd_tolerance: int = 2  # fds more at the end than at the start, same worker count
    rss_tolerance_kb: int = 16 * 1024
    workdir: Path | None = None  # None: a temporary directory
    keep: Path = RESULTS  # where a failed run's whole supervisor log is kept


def run_soak(cfg: SoakConfig) -> dict[str, Any]:
    seed = cfg.seed if cfg.seed is not None else secrets.randbelow(2**32)
    log.warning("soak: seed %d (rerun with --seed %d), %.0f s", seed, seed, cfg.seconds)
    before = _loadavg()
    marker = f"psoak{seed:x}{secrets.token_hex(3)}"
    with tempfile.TemporaryDirectory(prefix="psoak-") as tmp:
        workdir = cfg.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        target = Target(workdir, marker, cfg.workers)
        try:
            report = _soak(cfg, seed, marker, target)
        finally:
            target.close()
            kill_marked(marker)
        lines = target.log().splitlines()
        report["supervisor_log_tail"] = lines[-40:]
        # Every line naming a process that held a lost request, or its worker, or what forked
        # it, and every line of the seconds around it: its whole story (a failed run's 15-line
        # tail once ended before it, and the seed did not fail again).
        held = {str(p) for pids in report["lost_hands"] for p in pids if p}
        around = [_clock(report["t0_wall"] + f["start"]) for f in report["lost"][:5]]
        report["supervisor_log_lost"] = [
            x for x in lines if held & set(_pids_in(x)) or _near(x, around)
        ]
        if not report["passed"]:  # the whole log, where a fresh clone's `make test` keeps it
            cfg.keep.mkdir(parents=True, exist_ok=True)
            kept = cfg.keep / f"soak-{seed}.supervisor.log"
            kept.write_text("\n".join(lines) + "\n")
            report["supervisor_log_file"] = str(kept)
    report["uptime_before"] = before
    report["uptime_after"] = _loadavg()
    return report


def _soak(cfg: SoakConfig, seed: int, marker: str, target: Target) -> dict[str, Any]:
    rng = random.Random(seed)
    target.wait_ready()
    t0 = time.monotonic()
    chaos = Chaos(target, rng, cfg.min_workers, cfg.max_workers, cfg.flood_max)
    chaos.workers = cfg.workers
    sampler = Sampler(target.pid, t0).start()
    load = Load("127.0.0.1", target.port, cfg.concurrency, max_seconds=cfg.seconds + 120).start()
    cgroups: set[str] = set()
    checkpoints: list[Sample] = []
    own = cgroup_of(target.pid)
    problems: list[str] = []  # seen at checkpoints, reported as operations that went wrong
    seen: list[tuple[float, set[int]]] = []  # the workers status showed, at each checkpoint
    alive = True
    # The supervisor opens each worker's /proc schedstat and stat (steering's run-queue reads)
    # at its first look at it, up to SAMPLE_QUIET (1 s) after the worker is ready: a first
    # checkpoint at once counted up to 2 fds a worker fewer than every later one, and a run
    # failed "fd count flat" on that (3 workers: 36 -> 39). So the first one comes 1.5 s in.
    time.sleep(1.5)
    _checkpoint(target, sampler, checkpoints, cgroups, own, None, problems, seen)
    try:
        while time.monotonic() - t0 < cfg.seconds:
            op = chaos.step()
            log.info(
                "%7.1fs %-13s %-9s %5.2fs %s",
                op.t - t0,
                op.kind,
                op.outcome,
                op.seconds,
                op.detail[:160],
            )
            if not target.alive():
                alive = False
                break
            _checkpoint(target, sampler, checkpoints, cgroups, own, None, problems, seen)
            time.sleep(rng.uniform(*cfg.pause))
        # the last quiet checkpoints at each worker count the run began with
        if alive and target.alive():
            res = target.cli("scale", str(cfg.workers), "--timeout", "60")
            if res.rc == 0:
                chaos.workers = cfg.workers
            time.sleep(1.0)
            _checkpoint(target, sampler, checkpoints, cgroups, own, None, problems, seen)
    finally:
        load.stop()
        sampler.stop()
    alive = alive and target.alive() and sampler.gone_at is None
    chaos.ops.extend(Op("checkpoint", t0, 0.0, "violation", p) for p in problems)
    exit_code = target.stop()
    leftovers = _leftovers(target, marker, cgroups)
    for pid in kill_marked(marker):  # judged above; the machine is left clean either way
        log.warning("soak: killed pid %d, left behind by the supervisor", pid)
    return _report(
        cfg, seed, marker, t0, chaos, load, sampler, checkpoints, seen, alive, exit_code, leftovers
    )


def _checkpoint(
    target: Target,
    sampler: Sampler,
    checkpoints: list[Sample],
    cgroups: set[str],
    own: str | None,
    st: dict[str, Any] | None,
    problems: list[str],
    seen: list[tuple[float, set[int]]],
) -> None:
    """After an operation, with no flood open: the worker count, their cgroups, the fds."""
    # The control server answers "try again" to a client beyond its fd reserve, and a
    # flood's closes reach the supervisor a moment after the flood operation returns (at
    # load 8, a checkpoint right after one found status "did not answer"): retry as an
    # operator would, for up to 3 s; never answering is the failure.
    deadline = time.monotonic() + 3.0
    st = st or target.status()
    while st is None and time.monotonic() < deadline:
        time.sleep(0.2)
        st = target.status()
    if st is None:
        problems.append(f"t={time.monotonic() - sampler.t0:.1f}s: status did not answer")
        return
    pids = [s["pid"] for s in st.get("slots", []) if s.get("pid")]
    served_empty = [s["slot"] for s in st.get("slots", []) if s.get("state") == "ready"
                    and not s.get("pid")]  # fmt: skip
    if served_empty:
        when = time.monotonic() - sampler.t0
        problems.append(f"t={when:.1f}s: status shows slot(s) {served_empty} ready, no worker")
    for pid in pids:
        group = cgroup_of(pid)
        if group and group != own:
            cgroups.add(group)
            cgroups.add(group.rsplit("/", 1)[0])  # the supervisor's group of groups
    shown = {w["pid"] for s in st.get("slots", []) for w in s.get("workers", []) if w.get("pid")}
    seen.append((time.monotonic(), shown | set(pids)))
    sample = sampler.take(workers=len(st.get("slots", [])))
    if sample is not None:
        checkpoints.append(sample)


def _leftovers(target: Target, marker: str, cgroups: set[str]) -> dict[str, list[Any]]:
    """What is left once the supervisor has exited (waiting up to 10 s for it to go)."""
    deadline = time.monotonic() + 10
    while True:
        found: dict[str, list[Any]] = {
            "processes with the marker": marked_processes(marker),
            "listeners on the port": [target.port] * listeners_on(target.port),
            "cgroups": leftover_cgroups(cgroups),
            "control socket": [target.control] if Path(target.control).exists() else [],
        }
        if not any(found.values()) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def _report(
    cfg: SoakConfig,
    seed: int,
    marker: str,
    t0: float,
    chaos: Chaos,
    load: Load,
    sampler: Sampler,
    checkpoints: list[Sample],
    seen: list[tuple[float, set[int]]],
    alive: bool,
    exit_code: int | None,
    leftovers: dict[str, list[Any]],
) -> dict[str, Any]:
    def rel(f: Failure) -> Failure:
        return dataclasses.replace(f, start=f.start - t0, end=f.end - t0)

    kills = [dataclasses.replace(k, t=k.t - t0) for k in chaos.kills]
    forks = [dataclasses.replace(f, t=f.t - t0) for f in chaos.forked]
    failures = [rel(f) for f in load.failures]
    split = verdict.attribute(failures, kills)
    stale = verdict.served_after_retired(load.last_served, seen)
    trend = verdict.resource_trend(sampler.samples, checkpoints)
    checks = verdict.checks(
        alive_throughout=alive,
        gone_at=sampler.gone_at,
        ops=chaos.ops,
        split=split,
        trend=trend,
        leftovers=leftovers,
        exit_code=exit_code,
        requests_ok=load.ok,
        stale=stale,
        fd_tolerance=cfg.fd_tolerance,
        rss_tolerance_kb=cfg.rss_tolerance_kb,
    )
    elapsed = time.monotonic() - t0
    return {
        "seed": seed,
        "marker": marker,
        "seconds": round(elapsed, 1),
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "workdir"},
        "passed": all(c.ok for c in checks),
        "checks": [dataclasses.asdict(c) for c in checks],
        "operations": summary(chaos.ops),
        "operations_total": len(chaos.ops),
        "requests": _requests(load, failures, split, elapsed),
        "flood_probe_wait_s": _waits(chaos.probe_waits),
        "kills": [dataclasses.asdict(k) for k in kills],
        "forked": len(chaos.forked),
        "forks": [dataclasses.asdict(f) for f in forks],
        "t0_wall": time.time() - (time.monotonic() - t0),  # the log's clock at t=0
        "lost": [dataclasses.asdict(f) for f in split["lost"][:50]],
        "lost_traces": [verdict.trace(f, forks, kills) for f in split["lost"][:5]],
        "lost_hands": [
            [*verdict.lineage(f.pid, forks), f.worker] for f in split["lost"][:5] if f.pid
        ],
        "failures": {k: [dataclasses.asdict(f) for f in v[:50]] for k, v in split.items()},
        "resources": trend,
        "samples": [[round(x.t, 2), x.fds, x.rss_kb] for x in sampler.samples],  # t, fds, KiB
        "checkpoints": [[round(x.t, 2), x.fds, x.rss_kb, x.workers] for x in checkpoints],
        "leftovers": leftovers,
        "op_log": [
            {
                "t": round(op.t - t0, 2),
                "kind": op.kind,
                "outcome": op.outcome,
                "seconds": round(op.seconds, 3),
                "detail": op.detail[:300],
            }
            for op in chaos.ops
        ],
    }


def _requests(
    load: Load, failures: list[Failure], split: dict[str, list[Failure]], elapsed: float
) -> dict[str, Any]:
    return {
        "ok": load.ok,
        "failed": len(failures),
        "in_flight_at_kill": len(split["in_flight_at_kill"]),
        "in_flight_at_kill_unnamed": len(split["in_flight_at_kill_unnamed"]),
        "lost": len(split["lost"]),
        "per_s": round(load.ok / elapsed, 1) if elapsed else 0,
        "failed_by_kind": _count(f.kind for f in failures),
    }


def _waits(waits: list[tuple[str, float]]) -> dict[str, dict[str, float]]:
    """How long a real request waited behind each flood, per endpoint."""
    out: dict[str, dict[str, float]] = {}
    for kind in sorted({k for k, _ in waits}):
        got = sorted(w for k, w in waits if k == kind)
        out[kind] = {
            "floods": len(got),
            "median": round(got[len(got) // 2], 2),
            "max": round(got[-1], 2),
        }
    return out


def _pids_in(line: str) -> list[str]:
    """The numbers after "pid" in a log line (pid 123, pid(s) 1 2)."""
    words = line.replace(":", " ").replace(",", " ").split()
    return [w for i, w in enumerate(words) if i and words[i - 1].startswith("pid") and w.isdigit()]


def _clock(wall: float) -> int:
    """Seconds of the day, as the supervisor's log stamps its lines (HH:MM:SS, local)."""
    t = time.localtime(wall)
    return t.tm_hour * 3600 + t.tm_min * 60 + t.tm_sec


def _near(line: str, moments: list[int]) -> bool:
    """The line's stamp is within AROUND s of one of ``moments`` (seconds of the day)."""
    stamp = line[:8].split(":")
    if len(stamp) != 3 or not all(x.isdigit() for x in stamp):
        return False
    sec = int(stamp[0]) * 3600 + int(stamp[1]) * 60 + int(stamp[2])
    return any(min(abs(sec - m), 86400 - abs(sec - m)) <= AROUND for m in moments)


def _loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} CPUs)"


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out
