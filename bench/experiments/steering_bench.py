"""Steering benchmark: issue 5's acceptance scenarios, side by side, from raw per-request timings.

    sudo .venv/bin/python bench/experiments/steering_bench.py [--rounds 3] [--seconds 6]
        [--only slow2,crash]

Needs root: every run happens in a network namespace of its own (``unshare -n``, loopback up),
so runs do not share TIME_WAIT sockets or sysctls, and ``--migrate`` can set tcp_migrate_req
there without touching the host.

Servers (the same Python worker, bench/workers/steering_worker.py, in every set-up):

- ``shared``: one listening socket, every worker blocked in accept() on it (one accept queue);
- ``plain``: one SO_REUSEPORT socket per worker, the kernel's plain hashing (no supervisor);
- ``off`` / ``cbpf`` / ``ebpf``: ``portshard run --steering ...``; ``cbpf+migrate`` adds
  ``--migrate`` (tcp_migrate_req=1 in the run's namespace).

Load: bench/load/steering_load.c (built here with gcc), closed loop, a new connection per request,
64 in flight, every request recorded (start, latency from connect() to EOF, which worker). The
first ``--warmup`` seconds are left out of the figures; requests still waiting when the run ends
count with the time they had waited. Configurations are interleaved (each round runs every
set-up of a scenario, in a rotating order) and repeated; the table shows medians and ranges,
and ratios are taken within a round.

Scenarios:

- ``slow2``, ``slow4``: one worker sleeps 50 ms on every 20th request (2 and 4 workers);
  ``hog2``: it burns the CPU for those 50 ms instead. Target: steering >= 80% of the shared
  queue's requests/s, p99 within 2x of the shared queue's.
- ``fair2``, ``fair4``: no slow worker. Target: >= 97% of plain reuseport's requests/s, Jain's
  fairness index over the workers >= 0.98.
- ``crash``: 2 workers that take 500 ms to boot; slot 1's worker is SIGKILLed mid-run. Target:
  the largest added latency (max latency around the crash minus the median before it) < 50 ms.
- Every portshard run reports the supervisor's own CPU use (from /proc/PID/stat).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import cpu_account  # noqa: E402  (a sibling script)

WORKER = ROOT / "bench" / "workers" / "steering_worker.py"
LOAD_SRC = ROOT / "bench" / "load" / "steering_load.c"
CONCURRENCY = 64
RECORD = struct.Struct("=QIhBx")

SCENARIOS: dict[str, dict[str, Any]] = {
    "slow2": {"workers": 2, "slow": "sleep", "configs": ["shared", "plain", "ebpf", "cbpf"]},
    "slow4": {"workers": 4, "slow": "sleep", "configs": ["shared", "plain", "ebpf", "cbpf"]},
    "hog2": {"workers": 2, "slow": "spin", "configs": ["shared", "plain", "ebpf", "cbpf"]},
    "fair2": {"workers": 2, "slow": "", "configs": ["plain", "off", "ebpf", "cbpf"]},
    "fair4": {"workers": 4, "slow": "", "configs": ["plain", "off", "ebpf", "cbpf"]},
    "crash": {
        "workers": 2,
        "slow": "",
        "boot": 0.5,
        "crash": True,
        "configs": ["off", "cbpf", "cbpf+migrate", "ebpf"],
    },
}


# ---- one run, inside its own network namespace ------------------------------------------------


def _listen(port: int, reuseport: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    return sock


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """One set-up under test; ``port``, ``pids`` (by slot), ``supervisor`` (pid or None)."""

    def __init__(self, config: str, scenario: dict[str, Any], tmp: Path) -> None:
        self.config = config
        self.procs: list[subprocess.Popen[bytes]] = []
        self.socks: list[socket.socket] = []
        self.supervisor: int | None = None
        self.control = tmp / "ps.sock"
        n = scenario["workers"]
        env = dict(os.environ)
        env.update(
            BENCH_SLOW=scenario["slow"],
            BENCH_SLOW_SLOT=str(n - 1),
            BENCH_SLOW_EVERY=str(scenario.get("every", 20)),
            BENCH_BOOT=str(scenario.get("boot", 0)),
            BENCH_SLOW_AFTER=str(scenario.get("slow_after", 0)),
            BENCH_WORK_US=str(scenario.get("work_us", 0)),
        )
        worker = [sys.executable, str(WORKER)]
        if config in ("shared", "plain"):
            port = 0
            for _ in range(n if config == "plain" else 1):
                self.socks.append(_listen(port, reuseport=config == "plain"))
                port = self.socks[0].getsockname()[1]
            self.port = port
            for i in range(n):
                sock = self.socks[i if config == "plain" else 0]
                wenv = dict(env, BENCH_FD=str(sock.fileno()), BENCH_SLOT=str(i))
                self.procs.append(subprocess.Popen(worker, env=wenv, pass_fds=[sock.fileno()]))
            self.pids = [p.pid for p in self.procs]
            time.sleep(0.3 + float(scenario.get("boot", 0)))
            return
        steering, _, balance = config.split("+")[0].partition("-")
        if balance:  # ebpf-queue, ebpf-none: what the eBPF program compares (steering_sweep)
            env["PORTSHARD_BALANCE"] = balance
        args = [sys.executable, "-m", "portshard", "run", "-w", str(n)]
        args += ["--listen", "tcp://127.0.0.1:0", "--steering", steering]
        args += ["--control", str(self.control), "--log-level", "warning"]
        if "migrate" in config:
            args.append("--migrate")
        nice = "nice" in config  # the supervisor alone at nice -10 (its looks on time)
        if "frozen" in config:  # the programs, no sampling: equal tables, no cost or cap
            env["PORTSHARD_POLICY"] = "frozen"
        if "nocg" in config:  # workers without cgroups of their own (the subreaper)
            env["PORTSHARD_CGROUP"] = "off"
        args += ["--via", "fds"]
        self.log = open(tmp / "supervisor.log", "wb")  # noqa: SIM115 - closed in stop()
        sup = subprocess.Popen([*args, "--", *worker], env=env, stdout=self.log, stderr=self.log)
        self.procs.append(sup)
        self.supervisor = sup.pid
        deadline = time.monotonic() + 30
        while True:
            st = self.status()
            if st and st.get("ready"):
                break
            if time.monotonic() > deadline or sup.poll() is not None:
                sup.kill()  # SIGKILL: its workers die with it (parent-death signal)
                sup.wait()
                text = self.log_text()
                self.log.close()
                raise RuntimeError(f"portshard did not start:\n{text}")
            time.sleep(0.05)
        self.port = st["listen"][0]["port"]
        self.pids = [s["pid"] for s in st["slots"]]
        if nice:  # its main thread only (the workers, started already, keep theirs)
            os.setpriority(os.PRIO_PROCESS, sup.pid, -10)

    def status(self) -> dict[str, Any] | None:
        # In this process: a `portshard status` process per poll took seconds on a busy machine.
        from portshard.control.client import request
        from portshard.errors import ControlError

        try:
            return request(str(self.control), "status", timeout=10)
        except (ControlError, OSError):
            return None

    def log_text(self) -> str:
        if self.supervisor is None:
            return ""
        self.log.flush()
        return (self.control.parent / "supervisor.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.supervisor is not None:
            os.kill(self.supervisor, signal.SIGQUIT)  # kill every worker now
        for proc in self.procs:
            if self.supervisor is None:
                proc.kill()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for sock in self.socks:
            sock.close()
        if self.supervisor is not None:
            self.log.close()


def _workers_cpu(pids: list[int]) -> float:
    """CPU seconds of these processes so far (one that has exited counts 0: a crash run)."""
    total = 0.0
    for pid in pids:
        try:
            total += _cpu_seconds(pid)
        except (OSError, IndexError, ValueError):
            continue
    return total


def _schedstat(pids: list[int]) -> list[tuple[int, int]]:
    """(ns on a CPU, ns waiting for one) of each process so far; (0, 0) if it is gone."""
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/schedstat") as f:
                run, wait = f.read().split()[:2]
            out.append((int(run), int(wait)))
        except (OSError, ValueError):
            out.append((0, 0))
    return out


def _caps(st: dict[str, Any]) -> list[int]:
    """Each slot's in-flight cap in a status (0: none; speed.py, a worker caught stalling)."""
    return [int(s.get("steering", {}).get("cap", 0)) for s in st["slots"]]


def _capped_share(capped: list[tuple[float, list[int]]], warmup: float, n: int) -> dict:
    """BENCH_TRACE: the share of the steady-state polls in which each slot was capped."""
    steady = [caps for t, caps in capped if t >= warmup]
    return {"capped_slots": [sum(c[i] > 0 for c in steady) / max(1, len(steady)) for i in range(n)]}


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _jain(counts: list[int]) -> float:
    total = sum(counts)
    squares = sum(c * c for c in counts)
    return total * total / (len(counts) * squares) if squares else float("nan")


def run_one(
    scenario_name: str,
    config: str,
    seconds: float,
    warmup: float,
    load: str,
    scenario: dict[str, Any] | None = None,
    concurrency: int = CONCURRENCY,
) -> dict:
    scenario = scenario or SCENARIOS[scenario_name]
    tmp = Path(tempfile.mkdtemp(prefix="ps-bench-"))
    try:
        server = Server(config, scenario, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    out = tmp / "records.bin"
    total = warmup + seconds
    cpu: dict[str, float] = {}
    sched: dict[str, list[tuple[int, int]]] = {}
    snaps: dict[str, dict[str, Any]] = {}
    hogs: list[int] = []
    kill_at: list[float] = []
    trace: list[tuple[float, list[float]]] = []
    load_at = 0.0  # when the load client started connecting, from ``started``
    capped: list[tuple[float, list[int]]] = []  # BENCH_TRACE: each slot's in-flight cap
    excluded: list[tuple[float, list[int]]] = []  # BENCH_TRACE: each slot out (1) or in
    sample_ms: list[tuple[float, int]] = []  # BENCH_TRACE: the supervisor's sample interval
    tracing = threading.Event()
    looker = None
    timers: list[threading.Timer] = []
    try:
        started = time.monotonic()
        sup = server.supervisor

        def mark(name: str) -> None:
            if sup is not None:
                cpu[name] = _cpu_seconds(sup)
            cpu[f"workers_{name}"] = _workers_cpu(server.pids)
            sched[name] = _schedstat(server.pids)

        timers.append(threading.Timer(warmup, mark, ("start",)))
        for at, name in ((warmup, "start"), (total - 0.1, "end")):  # the client and hog live
            timers.append(
                threading.Timer(at, lambda n=name: snaps.update({n: cpu_account.snapshot()}))
            )
        if scenario.get("crash"):
            victim = server.pids[1]

            def crash() -> None:
                kill_at.append(time.monotonic() - started)
                os.kill(victim, signal.SIGKILL)

            timers.append(threading.Timer(warmup + seconds / 3, crash))
        for t in timers:
            t.start()
        poll = float(os.environ.get("BENCH_TRACE") or 0)  # s between looks at `slower`
        if poll and sup is not None:

            def look() -> None:
                while not tracing.wait(poll):
                    st = server.status()
                    if st:
                        slower = [s.get("steering", {}).get("slower", 1.0) for s in st["slots"]]
                        trace.append((time.monotonic() - started, slower))
                        capped.append((trace[-1][0], _caps(st)))
                        out = [
                            int(s.get("steering", {}).get("excluded", False)) for s in st["slots"]
                        ]
                        excluded.append((trace[-1][0], out))
                        sample_ms.append((trace[-1][0], st.get("steering", {}).get("sample_ms", 0)))

            looker = threading.Thread(target=look, daemon=True)
            looker.start()
        hog = None
        if scenario["slow"] == "hog":  # a CPU hog on the CPU the slow worker pinned itself to
            spin = "import os; os.sched_setaffinity(0, {1})\nwhile True: pass"
            hog = subprocess.Popen([sys.executable, "-c", spin])
            hogs.append(hog.pid)
        try:
            proc = subprocess.run(
                [load, "127.0.0.1", str(server.port), str(concurrency), str(total), str(out)],
                capture_output=True,
                text=True,
            )
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
        if proc.returncode:
            raise RuntimeError(f"load generator failed: {proc.stderr}")
        for line in proc.stdout.splitlines():  # its first connection, on our clock
            if line.startswith("t0 "):
                load_at = int(line.split()[1]) / 1e9 - started
        mark("end")
    finally:
        for timer in timers:  # a failed run: no mark or crash after the server is gone
            timer.cancel()
        tracing.set()
        if looker is not None:
            looker.join()
        server.stop()
    data = out.read_bytes()
    shutil.rmtree(tmp, ignore_errors=True)
    records = [RECORD.unpack_from(data, i) for i in range(0, len(data), RECORD.size)]
    w0, w1 = warmup * 1e9, total * 1e9
    ok_done = [r for r in records if r[3] == 0 and w0 <= r[0] + r[1] * 1000 < w1]
    window = [r for r in records if w0 <= r[0] < w1 and r[3] in (0, 3)]
    lat = [r[1] / 1000 for r in window]  # ms
    counts = [0] * scenario["workers"]
    for r in ok_done:
        if 0 <= r[2] < len(counts):
            counts[r[2]] += 1
    p99 = _percentile(lat, 0.99)
    result: dict[str, Any] = {
        "scenario": scenario_name,
        "config": config,
        "rps": len(ok_done) / seconds,
        "p50_ms": _percentile(lat, 0.50),
        "p99_ms": p99,
        "p999_ms": _percentile(lat, 0.999),
        "max_ms": max(lat, default=float("nan")),
        "errors": sum(1 for r in records if r[3] in (1, 2) and w0 <= r[0] < w1),
        "unfinished": sum(1 for r in records if r[3] == 3),
        "per_worker": counts,
        "jain": _jain(counts),
        "p99_by_worker_ms": [  # where the tail is (a request that failed has no worker)
            _percentile([r[1] / 1000 for r in window if r[2] == i and r[3] == 0], 0.99)
            for i in range(scenario["workers"])
        ],
        "tail_by_worker": [  # requests slower than the p99: none (-1, failed), then each worker
            sum(1 for r in window if r[2] == i and r[1] / 1000 > p99)
            for i in range(-1, scenario["workers"])
        ],
        "warmup_max_ms": max((r[1] / 1000 for r in records if r[0] < w0), default=0.0),
        "cold_p99_ms": _percentile(
            [r[1] / 1000 for r in records if r[0] < min(2e9, w1) and r[3] in (0, 3)], 0.99
        ),
        "cold_rps": sum(1 for r in records if r[3] == 0 and r[0] + r[1] * 1000 < 2e9) / 2,
    }
    if trace:  # BENCH_TRACE: the costs the supervisor gave each slot (slower than the fastest)
        slow = scenario["workers"] - 1
        # From the load's start, or from when the worker turned slow (mid-run kinds).
        after = float(scenario.get("slow_after", 0))
        first = [t - after for t, slower in trace if slower[slow] > 1.0 and t >= after]
        steady = [slower for t, slower in trace if t >= warmup]
        result.update(
            first_slow_s=first[0] if first else None,  # from the load's start
            # ... from its first connection (the client's own start-up not counted)
            first_slow_load_s=first[0] - (0.0 if after else load_at) if first else None,
            load_at_s=load_at,
            weighted_share=sum(max(x) > 1.0 for x in steady) / max(1, len(steady)),
            weighted_slots=[
                sum(x[i] > 1.0 for x in steady) / max(1, len(steady))
                for i in range(scenario["workers"])
            ],
        )
        if after:  # mid-run kinds: each slot's share of the polls weighted, before and after
            n = scenario["workers"]

            def share(polls: list[list[float]]) -> list[float]:
                return [sum(x[i] > 1.0 for x in polls) / max(1, len(polls)) for i in range(n)]

            result.update(
                weighted_before=share([x for t, x in trace if warmup <= t < after]),
                weighted_after=share([x for t, x in trace if t >= after]),
            )
    if capped:
        result.update(_capped_share(capped, warmup, scenario["workers"]))
    if sample_ms:  # the share of the steady-state polls the supervisor was steady (100 ms)
        steady_ms = [m for t, m in sample_ms if t >= warmup]
        result["steady_share"] = sum(m >= 100 for m in steady_ms) / max(1, len(steady_ms))
    if excluded:  # the share of the steady-state polls in which each slot was out
        steady_out = [o for t, o in excluded if t >= warmup]
        result["excluded_slots"] = [
            sum(o[i] for o in steady_out) / max(1, len(steady_out))
            for i in range(scenario["workers"])
        ]
    if "start" in sched and "end" in sched:  # per worker, steady state: CPU and run-queue wait
        pairs = zip(sched["start"], sched["end"], strict=True)
        result["worker_cpu_wait_ms"] = [
            [(e[0] - b[0]) / 1e6, (e[1] - b[1]) / 1e6] for b, e in pairs
        ]
    if "start" in snaps and "end" in snaps:  # where all the CPU went (cpu_account.py)
        roles = {"workers": list(server.pids), "supervisor": [sup] if sup else [], "hog": hogs}
        result["cpu_account"] = cpu_account.account(snaps["start"], snaps["end"], roles)
    sup_cpu = 0.0
    if "start" in cpu and "end" in cpu:
        sup_cpu = cpu["end"] - cpu["start"]
        result["supervisor_cpu_pct"] = 100 * sup_cpu / seconds
    if "workers_start" in cpu and ok_done and not kill_at:
        # The whole server's CPU per request (workers + supervisor): steadier than req/s on a
        # shared machine, where the load and other sessions take the CPU it would use.
        server_cpu = cpu["workers_end"] - cpu["workers_start"] + sup_cpu
        result["cpu_us_per_request"] = 1e6 * server_cpu / len(ok_done)
    if kill_at:
        k = kill_at[0] * 1e9
        before = [r[1] / 1000 for r in records if w0 <= r[0] < k - 0.2e9 and r[3] == 0]
        around = [r for r in records if k - 0.2e9 <= r[0] < k + 1.5e9]
        worst = max((r[1] / 1000 for r in around if r[3] in (0, 3)), default=float("nan"))
        result.update(
            crash_p50_before_ms=statistics.median(before) if before else float("nan"),
            crash_max_ms=worst,
            crash_added_ms=worst - (statistics.median(before) if before else 0.0),
            crash_failed=sum(1 for r in around if r[3] in (1, 2)),
        )
    return result


# ---- the orchestrator -------------------------------------------------------------------------


def build_load(tmp: Path) -> str:
    exe = tmp / "steering_load"
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(LOAD_SRC)], check=True
    )
    return str(exe)


def run_isolated(scenario: str, config: str, args: argparse.Namespace, load: str) -> dict:
    src = ROOT / "src"
    plain, at, name = config.partition("@")  # A/B: the same config, another portshard (--src)
    if at:
        src = Path(dict(x.partition("=")[::2] for x in args.src or [])[name])
    inner = [
        sys.executable, str(Path(__file__).resolve()), "--run", scenario, plain,
        "--seconds", str(args.seconds), "--warmup", str(args.warmup), "--load", load,
    ]  # fmt: skip
    cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *inner]
    env = dict(os.environ, PYTHONPATH=f"{src}:{ROOT}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode:
        raise RuntimeError(f"{scenario}/{config} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _med(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "-"
    m = statistics.median(values)
    fmt = "{:.0f}" if m >= 100 else "{:.2f}" if m < 10 else "{:.1f}"
    if len(values) == 1:
        return fmt.format(m)
    return f"{fmt.format(m)} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def summarize(results: list[dict]) -> tuple[str, dict[str, Any]]:
    lines: list[str] = []
    summary: dict[str, Any] = {}
    for name, scenario in SCENARIOS.items():
        mine = [r for r in results if r["scenario"] == name]
        if not mine:
            continue
        lines.append(
            f"\n{name}: {scenario['workers']} workers"
            + (f", slow worker: {scenario['slow']}" if scenario["slow"] else "")
            + (", SIGKILL with a 500 ms respawn" if scenario.get("crash") else "")
        )
        cols = ["config", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "jain", "sup CPU %"]
        if scenario.get("crash"):
            cols += ["crash added ms", "failed"]
        rows = [cols]
        for config in dict.fromkeys(r["config"] for r in mine):  # --configs: any
            rs = [r for r in mine if r["config"] == config]
            if not rs:
                continue
            row = [
                config,
                _med([r["rps"] for r in rs]),
                _med([r["p50_ms"] for r in rs]),
                _med([r["p99_ms"] for r in rs]),
                _med([r["p999_ms"] for r in rs]),
                _med([r["max_ms"] for r in rs]),
                _med([r["jain"] for r in rs]),
                _med([r.get("supervisor_cpu_pct", float("nan")) for r in rs]),
            ]
            if scenario.get("crash"):
                row += [
                    _med([r["crash_added_ms"] for r in rs]),
                    _med([r["crash_failed"] for r in rs]),
                ]
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
        lines += [
            "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows
        ]
        # Ratios within a round.
        base = "shared" if scenario["slow"] else "plain"
        ratios: dict[str, Any] = {}
        for config in dict.fromkeys(r["config"] for r in mine):  # --configs: any
            if config in (base, "shared", "plain") or scenario.get("crash"):
                continue
            per_round = []
            for rnd in sorted({r["round"] for r in mine}):
                a = [r for r in mine if r["round"] == rnd and r["config"] == config]
                b = [r for r in mine if r["round"] == rnd and r["config"] == base]
                if a and b:
                    per_round.append((a[0]["rps"] / b[0]["rps"], a[0]["p99_ms"] / b[0]["p99_ms"]))
            if per_round:
                ratios[config] = {
                    "rps_ratio": [x for x, _ in per_round],
                    "p99_ratio": [y for _, y in per_round],
                }
                lines.append(
                    f"  {config} vs {base}, per round: req/s x{_med([x for x, _ in per_round])}, "
                    f"p99 x{_med([y for _, y in per_round])}"
                )
        summary[name] = {"ratios": ratios}
    return "\n".join(lines), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--only", help="comma-separated scenarios: " + ",".join(SCENARIOS))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "steering.json"))
    parser.add_argument("--configs", help="comma-separated, instead of each scenario's own")
    parser.add_argument(
        "--src",
        action="append",
        metavar="NAME=DIR",
        help="another portshard's src/ directory: configs ending in @NAME run it (A/B)",
    )
    parser.add_argument("--run", nargs=2, metavar=("SCENARIO", "CONFIG"), help=argparse.SUPPRESS)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_one(*args.run, args.seconds, args.warmup, args.load)))
        return
    if os.geteuid() != 0:
        sys.exit("steering_bench: needs root (each run gets its own network namespace)")
    names = args.only.split(",") if args.only else list(SCENARIOS)
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ps-bench-") as tmp:
        load = build_load(Path(tmp))
        for rnd in range(args.rounds):
            for name in names:
                configs = args.configs.split(",") if args.configs else SCENARIOS[name]["configs"]
                k = rnd % len(configs)
                for config in configs[k:] + configs[:k]:  # rotate: no config always first
                    r = run_isolated(name, config, args, load)
                    r.update(round=rnd, config=config)  # with its @NAME
                    results.append(r)
                    print(
                        f"round {rnd} {name:6} {config:13} {r['rps']:8.0f} req/s  "
                        f"p99 {r['p99_ms']:7.2f} ms  max {r['max_ms']:7.1f} ms  "
                        f"jain {r['jain']:.3f}"
                        + (
                            f"  crash +{r['crash_added_ms']:.1f} ms"
                            if "crash_added_ms" in r
                            else ""
                        ),
                        flush=True,
                    )
    table, summary = summarize(results)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "concurrency": CONCURRENCY,
        "loadavg_end": os.getloadavg(),
    }
    out.write_text(json.dumps({"meta": meta, "runs": results, "summary": summary}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
