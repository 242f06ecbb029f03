"""How long a `reload --wait` of a real server takes under load, against the server's own
start-up measured in the same run (issue 12: hypercorn's reload under load within 2 s).

    .venv/bin/python bench/experiments/recipe_reload.py [--rounds 3] [--reloads 3]
        [--servers hypercorn,uvicorn,granian] [--surges 1,2] [--clients 4]

For each server (the README recipes, 2 slots) and each ``--surge``, interleaved round by
round: ``portshard run -w 2 --surge S`` under a curl-like load (``--clients`` clients,
HTTP/1.1, one request per connection, the client closes first: hypercorn keeps such
connections in CLOSE_WAIT until its keep-alive timeout), ``--reloads`` reloads, and after
each one the same server started alone beside it (same load, same machine):

- ``reload --wait``: from the request to the reply (in-process: no CLI start-up), with failed
  requests counted;
- ``start-up alone``: that server by itself, from exec to its first answer;
- ``ready after``: the new workers' start-up as the supervisor saw it (its log: exec to
  ready by the --ready rule), the slowest of each batch of S;
- ``the rest``: reload time less those batches' ``ready after``: handing over (freeze-check,
  steering, the old workers' own shutdown until they exit).

Medians and ranges over every reload; the load average before and after is printed and
written with the table to bench/results/recipe_reload.json. Every process started is stopped.
"""

from __future__ import annotations

import argparse
import os
import re
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
from bench.procs import free_port, http_ok  # noqa: E402
from portshard.control.client import request  # noqa: E402
from portshard.errors import PortshardError  # noqa: E402

APPS = ROOT / "tests" / "workers" / "recipes"
BIN = Path(sys.executable).parent
PORTSHARD = [sys.executable, "-m", "portshard"]
RESULTS = ROOT / "bench" / "results" / "recipe_reload.json"
SERVERS = {  # the README recipes ({port}: the managed port)
    "hypercorn": [
        *[str(BIN / "hypercorn"), "--workers", "0", "--bind", "127.0.0.1:{port}", "asgi_app:app"]
    ],
    "uvicorn": [
        *[str(BIN / "uvicorn"), "--app-dir", str(APPS), "asgi_app:app"],
        *["--port", "{port}", "--no-access-log"],
    ],
    "granian": [
        *[str(BIN / "granian"), "--interface", "asgi", "--host", "127.0.0.1"],
        *["--port", "{port}", "asgi_app:app"],
    ],
}
ENV = {**os.environ, "PYTHONPATH": str(APPS)}
# to look closer: PS_EXTRA, more `portshard run` options; KEEP_LOG, a path for the last run's log
EXTRA = os.environ.get("PS_EXTRA", "").split()


def start_up(server: str) -> float:
    """Seconds from exec to the first answer, the server alone."""
    port = free_port()
    argv = [a.replace("{port}", str(port)) for a in SERVERS[server]]
    t = time.monotonic()
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while http_ok(port) is None:
            if proc.poll() is not None or time.monotonic() - t > 60:
                raise SystemExit(f"{server} did not start: {argv}")
            time.sleep(0.01)
        return time.monotonic() - t
    finally:
        proc.terminate()
        proc.wait(30)


def reloads(server: str, surge: int, count: int, clients: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="ps-recipe-"))
    control = tmp / "c.sock"
    port = free_port()
    argv = [a.replace("{port}", str(port)) for a in SERVERS[server]]
    log = open(tmp / "run.log", "wb")  # noqa: SIM115 - closed below
    sup = subprocess.Popen(
        [
            *[*PORTSHARD, "run", "-w", "2", "--surge", str(surge), "--name", tmp.name, *EXTRA],
            *["--listen", f"tcp://127.0.0.1:{port}", "--control", str(control), "--", *argv],
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=ENV,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (control.exists() and _ready(control)):
            if sup.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"portshard run did not start: {(tmp / 'run.log').read_text()}")
            time.sleep(0.05)
        took, alone = [], []
        with Load(
            "127.0.0.1", port, concurrency=clients, max_seconds=120, close_first=True
        ) as load:
            load.wait_for(100)
            for _ in range(count):
                time.sleep(1.0)
                t = time.monotonic()
                request(str(control), "reload", timeout=120, wait=True)
                took.append(time.monotonic() - t)
                alone.append(start_up(server))
            time.sleep(0.5)
        text = (tmp / "run.log").read_text(errors="replace")
        if os.environ.get("KEEP_LOG"):
            Path(os.environ["KEEP_LOG"]).write_text(text)
        ready = [float(x) for x in re.findall(r"ready (?:\(notify\) )?after ([\d.]+)s", text)][2:]
        batches = [max(ready[i : i + surge]) for i in range(0, len(ready), surge)]
        per = 2 // surge  # batches per reload
        booted = [sum(batches[i * per : i * per + per]) for i in range(count)]
        return {
            "seconds": [round(x, 3) for x in took],
            "alone": [round(x, 3) for x in alone],
            "ready": [round(x, 3) for x in booted],
            "rest": [round(t - b, 3) for t, b in zip(took, booted, strict=False)],
            "requests": len(load.results),
            "failed": len(load.failed),
            "waited_grace": text.count("still holds connections"),
        }
    finally:
        if sup.poll() is None:
            sup.send_signal(signal.SIGTERM)
            try:
                sup.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(sup.pid, signal.SIGKILL)
                sup.wait(10)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _ready(control: Path) -> bool:
    try:
        return bool(request(str(control), "status", timeout=10).get("ready"))
    except (OSError, PortshardError):
        return False


def table(rows: dict[str, dict[str, Any]]) -> str:
    out = [
        "| server | --surge | reload --wait, s | start-up alone, s | ready after (per reload), s "
        "| the rest, s | failed / requests | waited --grace |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, r in rows.items():
        server, surge = key.split("/")
        out.append(
            f"| {server} | {surge} | {summary(r['seconds'], 2)} | {summary(r['alone'], 2)} "
            f"| {summary(r['ready'], 2)} | {summary(r['rest'], 2)} "
            f"| {r['failed']} / {r['requests']} | {r['grace']} |"
        )
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reloads", type=int, default=3, help="reloads per round and configuration")
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--surges", default="1,2")
    p.add_argument("--clients", type=int, default=4)
    a = p.parse_args()
    servers = [s.strip() for s in a.servers.split(",") if s.strip()]
    for s in servers:
        if s not in SERVERS:
            p.error(f"--servers: {s!r} is not one of {', '.join(SERVERS)}")
        if not shutil.which(SERVERS[s][0]):
            p.error(f"--servers: {SERVERS[s][0]} is not installed (make deps-bench)")
    try:
        surges = [int(x) for x in a.surges.split(",")]
    except ValueError:
        p.error(f"--surges: {a.surges!r} is not a comma-separated list of 1 and 2")
    if not set(surges) <= {1, 2}:
        p.error(f"--surges: {a.surges!r}: 2 slots reload 1 or 2 at a time")
    load_before = uptime()
    print(load_before, flush=True)
    rows: dict[str, dict[str, Any]] = {
        f"{s}/{g}": {"seconds": [], "alone": [], "ready": [], "rest": [], "failed": 0}
        | {"requests": 0, "grace": 0}
        for s in servers
        for g in surges
    }
    for i in range(a.rounds):  # interleaved: each round runs every configuration once
        for server in servers:
            for surge in surges:
                r = reloads(server, surge, a.reloads, a.clients)
                print(f"round {i + 1} {server} surge {surge}: {r}", flush=True)
                row = rows[f"{server}/{surge}"]
                for key in ("seconds", "alone", "ready", "rest"):
                    row[key] += r[key]
                row["failed"] += r["failed"]
                row["requests"] += r["requests"]
                row["grace"] += r["waited_grace"]
    report(RESULTS, rows, load_before, table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
