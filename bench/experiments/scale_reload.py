"""Boot and reload time against the worker count (issue 17), under a light load.

    .venv/bin/python bench/experiments/scale_reload.py [--workers 1,4,16,64] [--surges 1,8]
        [--rounds 3] [--clients 4] [--pause-ms 5]

For each worker count (and, at the largest, each ``--surges`` value; smaller counts run with
surge 1): ``portshard run -w N --surge S`` of the bench's HTTP worker (workers/httpd.py,
``--mode reuseport``, on the sockets the supervisor passes) on a loopback port 0, then

- boot: from starting ``portshard run`` until ``status`` says ready (every worker ready),
  polled every 20 ms over the control socket;
- reload: the wall time of ``portshard reload --wait`` (the CLI, as a deploy runs it: ~0.2 s
  of it is the CLI starting), while ``--clients`` clients each send a request (a new
  connection per request) then pause ``--pause-ms``;
- failed: requests of that load that failed (refused, reset, empty, timed out) from just
  before the reload until just after it; the goal is 0.

Each figure is the median of ``--rounds`` rounds with the range (min-max). The machine is
shared: ``uptime``'s load average before and after is printed with the table and written to
bench/results/scale_reload.json. Every process started is stopped (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from bench.experiments.common import report, summary, uptime  # noqa: E402
from bench.load.loadgen import Load  # noqa: E402
from portshard.control.client import request  # noqa: E402
from portshard.errors import PortshardError  # noqa: E402

HTTPD = ROOT / "bench" / "workers" / "httpd.py"
PORTSHARD = [sys.executable, "-m", "portshard"]
RESULTS = ROOT / "bench" / "results" / "scale_reload.json"


def ready_status(control: Path) -> dict[str, Any] | None:
    try:
        st = request(str(control), "status", timeout=10)
    except (OSError, PortshardError):
        return None
    return st if st.get("ready") else None


def one_round(workers: int, surge: int, clients: int, pause: float) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="ps-scale-"))
    control = tmp / "c.sock"
    log = open(tmp / "run.log", "wb")  # noqa: SIM115 - closed below
    args = [*PORTSHARD, "run", "-w", str(workers), "--surge", str(surge)]
    args += ["--ready-timeout", "120", "--listen", "tcp://127.0.0.1:0", "--control", str(control)]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [*args, "--", sys.executable, str(HTTPD), "--mode", "reuseport"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=ROOT,
    )
    try:
        st = None
        while st is None:
            if proc.poll() is not None or time.monotonic() - t0 > 60 + 2 * workers:
                raise SystemExit(f"-w {workers} did not boot: {(tmp / 'run.log').read_text()}")
            st = ready_status(control) if control.exists() else None
            if st is None:
                time.sleep(0.02)
        boot = time.monotonic() - t0
        port = st["listen"][0]["port"]
        return {"boot": boot, **reload_under_load(control, port, clients, pause)}
    finally:
        stop(proc)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def reload_under_load(control: Path, port: int, clients: int, pause: float) -> dict[str, Any]:
    with Load("127.0.0.1", port, concurrency=clients, pause=pause, max_seconds=300) as load:
        load.wait_for(50)
        before = len(load.results)
        t = time.monotonic()
        res = subprocess.run(
            [*PORTSHARD, "reload", "--wait", "--control", str(control)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        took = time.monotonic() - t
        load.wait_for(len(load.results) + 20)
    if res.returncode:
        raise SystemExit(f"reload --wait failed: {res.stderr.strip()}")
    during = load.results[before:]
    return {
        "reload": took,
        "failed": sum(1 for r in during if not r.ok),
        "requests": len(during),
        "kinds": load.by_kind(),
    }


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| workers | surge | boot, s | reload --wait, s | failed per reload: max (total) "
        "| requests during it |",
        "|---:|---:|---|---|---|---|",
    ]
    for row in rows:
        rounds = row["rounds"]
        failed = [r["failed"] for r in rounds]
        out.append(
            f"| {row['workers']} | {row['surge']} | {summary([r['boot'] for r in rounds])} "
            f"| {summary([r['reload'] for r in rounds])} | {max(failed)} ({sum(failed)}) "
            f"| {summary([r['requests'] for r in rounds], 0)} |"
        )
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--workers", default="1,4,16,64")
    p.add_argument("--surges", default="1,8", help="surge values at the largest worker count")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--pause-ms", type=float, default=5.0)
    a = p.parse_args()
    counts = [int(x) for x in a.workers.split(",")]
    plan = [(n, 1) for n in counts[:-1]] + [(counts[-1], int(s)) for s in a.surges.split(",")]
    load_before = uptime()
    print(load_before, flush=True)
    rows = []
    for workers, surge in plan:
        rounds = []
        for i in range(a.rounds):
            r = one_round(workers, surge, a.clients, a.pause_ms / 1000)
            print(f"-w {workers} --surge {surge} round {i + 1}: {r}", flush=True)
            rounds.append(r)
        rows.append({"workers": workers, "surge": surge, "rounds": rounds})
    report(RESULTS, rows, load_before, table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
