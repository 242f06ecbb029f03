"""Failed connections per supervisor upgrade and per supervisor crash (issue 15).

    .venv/bin/python bench/experiments/crash_upgrade.py [--rounds 3] [--workers 4]
        [--clients 16] [--gap 2]

Under a connection-per-request load (``--clients`` clients, no pause) on ``portshard run -w N``
of the bench's HTTP worker (workers/httpd.py on the supervisor's sockets), one event per
round, the events interleaved round by round:

- ``naive-restart``: what upgrading or restarting the supervisor meant before issue 15:
  ``portshard stop``, then the same ``portshard run`` again (sockets and queues closed and
  opened again);
- ``upgrade``: ``portshard upgrade`` (exec in place, every socket and worker kept);
- ``crash-old-rule``: SIGKILL of the supervisor with ``--orphan-timeout 0`` (the workers die
  with it, as before issue 15), the same ``portshard run`` again after ``--gap`` s;
- ``crash-adopted``: SIGKILL of the supervisor (the default: the workers keep serving, the
  warden keeps their sockets), the same ``portshard run`` again after ``--gap`` s, which
  adopts them.

failed: requests that failed (refused, reset, empty, timed out) from the event until the
supervisor is ready again plus 0.5 s. Each row: median and range over ``--rounds``; the load
average before and after is printed and written with the table to
bench/results/crash_upgrade.json. Every process started is stopped.
"""

from __future__ import annotations

import argparse
import collections
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
RESULTS = ROOT / "bench" / "results" / "crash_upgrade.json"
EVENTS = {
    "naive-restart": "naive restart (stop, run again)",
    "upgrade": "portshard upgrade",
    "crash-old-rule": "supervisor SIGKILL, run again 2 s later: workers die with it (old rule)",
    "crash-adopted": "supervisor SIGKILL, run again 2 s later: adopted (portshard)",
}


class Run:
    """A `portshard run` of the bench worker on a fixed control socket (restarts reuse it)."""

    def __init__(self, tmp: Path, workers: int, extra: list[str]) -> None:
        self.tmp = tmp
        self.control = tmp / "c.sock"
        self.args = [*PORTSHARD, "run", "-w", str(workers), "--name", tmp.name]
        self.args += [*extra, "--listen", "tcp://127.0.0.1:0", "--control", str(self.control)]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port = 0

    def start(self, listen: str | None = None) -> subprocess.Popen[bytes]:
        args = list(self.args)
        if listen is not None:  # the same port again (a naive restart binds it anew)
            args[args.index("tcp://127.0.0.1:0")] = listen
        log = open(self.tmp / f"run{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [*args, "--", sys.executable, str(HTTPD), "--mode", "reuseport"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=ROOT,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def wait_ready(self, proc: subprocess.Popen[bytes], timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"portshard run exited: {self.logs()}")
            try:
                st = request(str(self.control), "status", timeout=10)
                if st.get("ready") and st.get("pid") == proc.pid:
                    self.port = st["listen"][0]["port"]
                    return st
            except (OSError, PortshardError):
                pass
            time.sleep(0.02)
        raise SystemExit(f"not ready in {timeout}s: {self.logs()}")

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.tmp.glob("*.log")))

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
        subprocess.run(["pkill", "-9", "-f", str(self.control)], check=False)  # a warden left
        from portshard.linux import cgroup

        base = cgroup.detect().base  # the old rule's crash leaves its groups to a next start
        for home in Path(base).glob(f"{self.tmp.name}.*") if base else ():
            cgroup.Cgroup(str(home)).remove(wait=2.0)


def one_round(event: str, workers: int, clients: int, gap: float) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="ps-crash-"))
    run = Run(tmp, workers, ["--orphan-timeout", "0"] if event == "crash-old-rule" else [])
    try:
        first = run.start()
        run.wait_ready(first)
        with Load("127.0.0.1", run.port, concurrency=clients, max_seconds=120) as load:
            load.wait_for(300)
            before = len(load.results)
            t = time.monotonic()
            if event == "upgrade":
                res = subprocess.run(
                    [*PORTSHARD, "upgrade", "--control", str(run.control)],
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                if res.returncode:
                    raise SystemExit(f"upgrade failed: {res.stderr}")
                run.wait_ready(first)
            elif event == "naive-restart":
                subprocess.run(
                    [*PORTSHARD, "stop", "--control", str(run.control)],
                    check=True,
                    capture_output=True,
                )
                first.wait(60)
                run.wait_ready(run.start(f"tcp://127.0.0.1:{run.port}"))
            else:
                first.kill()
                first.wait(10)
                time.sleep(gap)
                run.wait_ready(run.start(f"tcp://127.0.0.1:{run.port}"))
            took = time.monotonic() - t
            time.sleep(0.5)
            during = load.results[before:]
        return {
            "event": event,
            "failed": sum(1 for r in during if not r.ok),
            "requests": len(during),
            "seconds": round(took, 3),
            "kinds": dict(collections.Counter(r.kind for r in during)),
        }
    finally:
        run.close()
        shutil.rmtree(tmp, ignore_errors=True)


def table(rows: dict[str, list[dict[str, Any]]]) -> str:
    out = [
        "| event | failed connections | requests meanwhile | until ready again, s |",
        "|---|---|---|---|",
    ]
    for event, rounds in rows.items():
        out.append(
            f"| {EVENTS[event]} | {summary([r['failed'] for r in rounds], 0)} "
            f"| {summary([r['requests'] for r in rounds], 0)} "
            f"| {summary([r['seconds'] for r in rounds], 2)} |"
        )
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--gap", type=float, default=2.0, help="s before the crashed one is rerun")
    p.add_argument("--events", default=",".join(EVENTS))
    a = p.parse_args()
    events = [e.strip() for e in a.events.split(",") if e.strip()]
    for e in events:
        if e not in EVENTS:
            p.error(f"--events: {e!r} is not one of {', '.join(EVENTS)}")
    load_before = uptime()
    print(load_before, flush=True)
    rows: dict[str, list[dict[str, Any]]] = {e: [] for e in events}
    for i in range(a.rounds):  # interleaved: each round runs every event once
        for event in events:
            r = one_round(event, a.workers, a.clients, a.gap)
            print(f"round {i + 1} {event}: {r}", flush=True)
            rows[event].append(r)
    report(RESULTS, rows, load_before, table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
