"""Steering at every concurrency (issue 11): a sweep, long-lived connections, and a heat map.

    sudo .venv/bin/python bench/experiments/steering_sweep.py                  # the full sweep
    sudo .venv/bin/python bench/experiments/steering_sweep.py --workers 4 --inflight 8,64 \\
        --kinds stall,none --rounds 3                                           # a subset

Cells: workers (2, 4) x connections in flight (4, 8, 16, 64, 256) x slow kind:

- ``stall``: one worker sleeps 50 ms on every 10th request;
- ``x3``: one worker is always 3x slower (it burns twice what each request took);
- ``hog``: one worker shares its CPU (pinned to CPU 1) with a busy-looping process;
- ``none``: every worker equal.

Configurations: the shared accept queue, plain reuseport, and ``portshard run`` with each
steering backend (``ebpf``; ``ebpf-queue`` and ``ebpf-none`` compare supervisor-written queue
depths or nothing instead of the kernel's in-flight counts, to measure those options;
``ebpf+frozen``: the programs with a supervisor that never samples, equal tables, no cost or
cap; ``cbpf``). ``BENCH_TRACE=S`` polls ``status`` every S seconds: the share of the run each
slot was weighted, capped or out, and the supervisor steady.
Each run is steering_bench.py's (its own network namespace, the C closed-loop client
load/steering_load.c, a new connection per request, raw per-request timings): the first
``--warmup`` seconds (2) are the cold start, reported apart (``cold_p99_ms``, from the
supervisor's start); the next ``--seconds`` are the steady state. Ratios are paired within a
round: requests/s and p99 against the shared queue, and for ``none`` requests/s against plain
reuseport and Jain's index. Configurations run interleaved, rotating each round.

``--keepalive``: 200 connections opened at once over 4 workers holding them
(workers/holder.py), each then asks which worker holds it: max/min held per worker with equal
workers, and the slow worker's share with one 3x slower, for each configuration.

Writes bench/results/steering_sweep.json and steering_sweep.png (a heat map of the ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import steering_bench as sb  # noqa: E402  (a sibling script, not a package module)

KINDS = {
    "stall": {"slow": "sleep", "every": 10},
    "x3": {"slow": "x3"},
    # ... the same, from 3 s after the load started (its worker was as fast as the rest until
    # then): how soon a supervisor that looks less often once steady finds it
    "x3mid": {"slow": "x3", "slow_after": 3.0},
    "stallmid": {"slow": "sleep", "every": 10, "slow_after": 3.0},
    "hog": {"slow": "hog"},
    "none": {"slow": ""},
    # no slow worker, each request costing every worker 100 or 400 µs of CPU: whether the gap
    # to plain reuseport is a fixed cost a connection (it shrinks as requests cost more)
    "none100": {"slow": "", "work_us": 100},
    "none400": {"slow": "", "work_us": 400},
}
CONFIGS = ["shared", "plain", "ebpf", "cbpf"]


def cell_name(workers: int, inflight: int, kind: str) -> str:
    return f"w{workers}-c{inflight}-{kind}"


def run_cell(workers: int, inflight: int, kind: str, config: str, args: Any) -> dict[str, Any]:
    scenario = {"workers": workers, **KINDS[kind]}
    name = cell_name(workers, inflight, kind)
    result = sb.run_one(name, config, args.seconds, args.warmup, args.load, scenario, inflight)
    result.update(workers=workers, inflight=inflight, kind=kind)
    return result


def run_keepalive(config: str, kind: str, load: str, warm: float) -> dict[str, Any]:
    """200 connections at once over 4 workers that hold them; who holds each (asked over the
    connection). ``warm`` s of connection-per-request load (16 in flight) come first, so that
    a slow worker has shown it is slow: with none, nothing tells it from the others when the
    connections open."""
    scenario = {"workers": 4, "slow": "x3" if kind == "x3" else ""}
    os.environ["BENCH_HOLD"] = "1"
    tmp = Path(tempfile.mkdtemp(prefix="ps-sweep-"))
    server = sb.Server(config, scenario, tmp)
    conns: list[socket.socket] = []
    try:
        if warm:
            out = tmp / "warm.bin"
            cmd = [load, "127.0.0.1", str(server.port), "16", str(warm), str(out)]
            subprocess.run(cmd, capture_output=True, check=True)
        for _ in range(200):
            conns.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        for conn in conns:
            conn.sendall(b"?")
        held = Counter(int(conn.recv(16).split()[0]) for conn in conns)
    finally:
        for conn in conns:
            conn.close()
        server.stop()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    counts = [held.get(slot, 0) for slot in range(4)]
    return {
        "config": config,
        "kind": kind,
        "warm": warm,
        "held": counts,
        "max_over_min": max(counts) / max(1, min(counts)),
        "slow_share_of_equal": counts[3] / (200 / 4),
    }


def isolated(inner: list[str]) -> dict[str, Any]:
    cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    src = ROOT / "src"
    for i, arg in enumerate(inner):  # A/B: the same config, portshard from --old / --src
        config, at, name = arg.partition("@")
        if at:
            inner = [*inner[:i], config, *inner[i + 1 :]]
            src = Path(os.environ[f"STEERING_SRC_{name.upper()}"])
            break
    cmd += [sys.executable, str(Path(__file__).resolve()), *inner]
    env = dict(os.environ, PYTHONPATH=f"{src}:{ROOT}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode:
        raise RuntimeError(f"{inner} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# ---- ratios, tables, the heat map ----------------------------------------------------------


def ratios(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """cell -> config -> {rps, p99, cold_p99 (vs shared), rps_plain (vs plain), jain}."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in results:
        if "inflight" not in r:
            continue
        cell = cell_name(r["workers"], r["inflight"], r["kind"])
        same = [x for x in results if x.get("round") == r["round"] and x["scenario"] == cell]
        base = {x["config"]: x for x in same}
        entry = out.setdefault(cell, {}).setdefault(r["config"], {})
        if "shared" in base and base["shared"]["rps"] > 0:
            s = base["shared"]
            entry.setdefault("rps", []).append(r["rps"] / s["rps"])
            entry.setdefault("p99", []).append(r["p99_ms"] / s["p99_ms"])
            entry.setdefault("cold_p99", []).append(r["cold_p99_ms"] / s["cold_p99_ms"])
        if "plain" in base and base["plain"]["rps"] > 0:
            entry.setdefault("rps_plain", []).append(r["rps"] / base["plain"]["rps"])
        entry.setdefault("jain", []).append(r["jain"])
    return out


def med(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def table(results: list[dict[str, Any]], configs: list[str]) -> str:
    rat = ratios(results)
    shown = [c for c in configs if c != "shared"]
    head = "| cell | " + " | ".join(f"{c}: req/s, p99, cold p99" for c in shown) + " |"
    lines = [head, "|" + "---|" * (len(shown) + 1)]
    for cell in sorted(rat, key=_cell_key):
        row = [cell]
        for config in shown:
            e = rat[cell].get(config, {})
            if cell.split("-")[2].startswith("none"):
                row.append(
                    f"{med(e.get('rps_plain', [])):.2f}x plain, jain {med(e.get('jain', [])):.3f}"
                )
            else:
                row.append(
                    f"{med(e.get('rps', [])):.2f}x, {med(e.get('p99', [])):.2f}x, "
                    f"{med(e.get('cold_p99', [])):.2f}x"
                )
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _cell_key(cell: str) -> tuple[str, int, int]:
    w, c, kind = cell.split("-")
    return (kind, int(w[1:]), int(c[1:]))


def heat_map(results: list[dict[str, Any]], configs: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rat = ratios(results)
    shown = [c for c in configs if c != "shared"]
    rows = sorted({(r["kind"], r["workers"]) for r in results if "inflight" in r})
    cols = sorted({r["inflight"] for r in results if "inflight" in r})
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 0.5 * len(rows) + 1.8))
    axes = axes if len(shown) > 1 else [axes]
    for ax, config in zip(axes, shown, strict=True):
        grid = [[float("nan")] * len(cols) for _ in rows]
        for i, (kind, workers) in enumerate(rows):
            for j, inflight in enumerate(cols):
                e = rat.get(cell_name(workers, inflight, kind), {}).get(config, {})
                key = "rps_plain" if kind.startswith("none") else "rps"
                value, p99 = med(e.get(key, [])), med(e.get("p99", []))
                grid[i][j] = value
                if value == value:
                    text = (
                        f"{value:.2f}"
                        if kind.startswith("none")
                        else f"{value:.2f}\np99 {p99:.1f}x"
                    )
                    ax.text(j, i, text, ha="center", va="center", fontsize=7)
        ax.imshow(grid, cmap="RdYlGn", vmin=0.5, vmax=1.1, aspect="auto")
        ax.set_xticks(range(len(cols)), [str(c) for c in cols])
        ax.set_yticks(range(len(rows)), [f"{k}, {w} workers" for k, w in rows])
        ax.set_xlabel("connections in flight")
        ax.set_title(f"{config}: req/s vs shared queue\n(none: vs plain reuseport)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the orchestrator --------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rounds", type=int, default=1, help="rounds; configurations rotate within each"
    )
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="measured seconds a run (after --warmup)"
    )
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of load before measuring"
    )
    parser.add_argument("--workers", default="2,4", help="worker counts, comma-separated")
    parser.add_argument(
        "--inflight", default="4,8,16,64,256", help="connections in flight, comma-separated"
    )
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help=f"slow kinds of: {', '.join(KINDS)}"
    )
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help="shared (one accept queue), plain (reuseport), ebpf, cbpf, off, ebpf+frozen, X@NAME",
    )
    parser.add_argument("--keepalive", action="store_true", help="also the long-lived spread")
    parser.add_argument("--keepalive-only", action="store_true", help="only the long-lived spread")
    parser.add_argument(
        "--old",
        help="a src/ directory of another portshard: configs ending in @old run it (A/B)",
    )
    parser.add_argument(
        "--src",
        action="append",
        metavar="NAME=DIR",
        help="another portshard's src/ directory: configs ending in @NAME run it (A/B)",
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "steering_sweep.json"))
    parser.add_argument("--cell", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--held", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument(
        "--warm",
        default="0,1.5",
        help="--keepalive: seconds of connection-per-request load before the connections open",
    )
    parser.add_argument("--load", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        w, c, kind, config = args.cell
        print(json.dumps(run_cell(int(w), int(c), kind, config, args)))
        return
    if args.held:
        config, kind, warm = args.held
        print(json.dumps(run_keepalive(config, kind, args.load, float(warm))))
        return
    if os.geteuid() != 0:
        sys.exit("steering_sweep: needs root (each run gets its own network namespace)")
    configs = args.configs.split(",")
    if args.old:
        os.environ["STEERING_SRC_OLD"] = str(Path(args.old).resolve())
    for named in args.src or []:
        name, _, path = named.partition("=")
        os.environ[f"STEERING_SRC_{name.upper()}"] = str(Path(path).resolve())
    results: list[dict[str, Any]] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ps-sweep-") as tmp:
        load = sb.build_load(Path(tmp))
        cells = [
            (int(w), int(c), kind)
            for kind in args.kinds.split(",")
            for w in args.workers.split(",")
            for c in args.inflight.split(",")
        ]
        for rnd in range(0 if args.keepalive_only else args.rounds):
            for w, c, kind in cells:
                k = rnd % len(configs)
                for config in configs[k:] + configs[:k]:
                    inner = ["--cell", str(w), str(c), kind, config, "--load", load]
                    inner += ["--seconds", str(args.seconds), "--warmup", str(args.warmup)]
                    r = isolated(inner)
                    r.update(config=config, round=rnd, load_average=load_average())
                    results.append(r)
                    print(
                        f"round {rnd} {cell_name(w, c, kind):14} {config:10} {r['rps']:8.0f} "
                        f"req/s p99 {r['p99_ms']:7.2f} ms cold p99 {r['cold_p99_ms']:7.2f} ms "
                        f"jain {r['jain']:.3f} cpu/req {r.get('cpu_us_per_request', 0):.0f} us "
                        f"load {r['load_average']}"
                        + (
                            f" cpu/wait ms {r['worker_cpu_wait_ms']}"
                            if "worker_cpu_wait_ms" in r
                            else ""
                        )
                        + (
                            f" first slow {r['first_slow_s']} from load "
                            f"{r.get('first_slow_load_s')} weighted {r['weighted_slots']}"
                            if "weighted_slots" in r
                            else ""
                        )
                        + (f" capped {r['capped_slots']}" if "capped_slots" in r else "")
                        + (f" out {r['excluded_slots']}" if "excluded_slots" in r else "")
                        + (f" steady {r['steady_share']:.2f}" if "steady_share" in r else "")
                        + f" tail {r.get('tail_by_worker')}",
                        flush=True,
                    )
                out.write_text(json.dumps({"results": results}, indent=1))
    spread = []
    if args.keepalive or args.keepalive_only:
        with tempfile.TemporaryDirectory(prefix="ps-sweep-") as tmp:
            load = sb.build_load(Path(tmp))
            for rnd in range(args.rounds):
                for warm in args.warm.split(","):
                    for kind in ("none", "x3"):
                        for config in [c for c in configs if c != "ebpf-none"]:
                            r = isolated(["--held", config, kind, warm, "--load", load])
                            r.update(config=config, round=rnd, load_average=load_average())
                            spread.append(r)
                            print(
                                f"keepalive warm {warm}s {kind:4} {config:10} held {r['held']}",
                                flush=True,
                            )
    meta = {"kernel": os.uname().release, "cpus": os.cpu_count(), "seconds": args.seconds}
    if results:
        print(table(results, configs))
        heat_map(results, configs, out.with_suffix(".png"))
    out.write_text(
        json.dumps(
            {"meta": meta, "results": results, "ratios": ratios(results), "keepalive": spread},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
