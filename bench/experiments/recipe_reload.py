"""How long a `reload --wait` of a real server takes under load, against the server's own
start-up measured in the same run (issue 12: hypercorn's reload under load within 2 s).

    .venv/bin/python bench/experiments/recipe_reload.py [--rounds 3] [--reloads 3]
        [--servers hypercorn,uvicorn,granian] [--surges 1,2] [--clients 4]
        [--src NAME=DIR ...]

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
  steering, the old workers' own shutdown until they exit);
- ``found idle``: of the rest, the freeze-checks (drain to signal, the sum over a reload's
  batches, the slowest of each), and ``last exit``: the last batch's old workers' own shutdown
  (signal to exit), which the reload waits for (the earlier batches' overlaps the next start).

``--src NAME=DIR`` adds another portshard tree (its src/ directory) as a configuration of its
own, run interleaved with this one (``this``) round by round: an A/B of the supervisor.

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

from bench.experiments.common import report, summary, uptime, wait_ready  # noqa: E402
from bench.load.loadgen import Load  # noqa: E402
from bench.procs import free_port, http_ok  # noqa: E402
from portshard.control.client import request  # noqa: E402

APPS = ROOT / "tests" / "workers" / "recipes"
BIN = Path(sys.executable).parent
PORTSHARD = [sys.executable, "-m", "portshard"]
RESULTS = ROOT / "bench" / "results" / "recipe_reload.json"
SERVERS = {  # the README recipes ({port}: the managed port)
    "hypercorn": [
        *[str(BIN / "hypercorn"), "--workers", "0", "--bind", "127.0.0.1:{port}", "asgi_app:app"]
    ],
    # hypercorn keeps an answered connection its client closed until --keep-alive (5 s) runs
    # out, and its shutdown closes and collects every one: fewer with a shorter keep-alive
    "hypercorn-keepalive-1": [
        *[str(BIN / "hypercorn"), "--workers", "0", "--bind", "127.0.0.1:{port}"],
        *["--keep-alive", "1", "asgi_app:app"],
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


def reloads(server: str, surge: int, count: int, clients: int, src: Path) -> dict[str, Any]:
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
        env={**ENV, "PYTHONPATH": f"{src}:{APPS}"},
        start_new_session=True,
    )
    try:
        wait_ready(
            sup,
            control,
            60,
            lambda: f"portshard run did not start: {(tmp / 'run.log').read_text()}",
        )
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
        idle = [float(x) for x in re.findall(r"found idle ([\d.]+)s after its drain", text)]
        gone = [float(x) for x in re.findall(r"exited ([\d.]+)s after its stop signal", text)]
        idle_b = [max(idle[i : i + surge]) for i in range(0, len(idle), surge)]
        gone_b = [max(gone[i : i + surge]) for i in range(0, len(gone), surge)]
        return {
            "seconds": [round(x, 3) for x in took],
            "alone": [round(x, 3) for x in alone],
            "ready": [round(x, 3) for x in booted],
            "rest": [round(t - b, 3) for t, b in zip(took, booted, strict=False)],
            # the stop's retired lines come after: `count` reloads only (none: a tree that
            # does not log them)
            "idle": [round(sum(idle_b[i * per : i * per + per]), 3) for i in range(count)]
            if len(idle_b) >= count * per
            else [],
            "last_exit": [round(gone_b[i * per + per - 1], 3) for i in range(count)]
            if len(gone_b) >= count * per
            else [],
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


def table(rows: dict[str, dict[str, Any]]) -> str:
    out = [
        "| server | --surge | tree | reload --wait, s | start-up alone, s "
        "| ready after (per reload), s | the rest, s | of it: found idle, s | last exit, s "
        "| failed / requests | waited --grace |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in rows.items():
        server, surge, src = key.split("/")
        idle = summary(r["idle"], 2) if r["idle"] else "-"  # a tree that does not log them
        last = summary(r["last_exit"], 2) if r["last_exit"] else "-"
        out.append(
            f"| {server} | {surge} | {src} | {summary(r['seconds'], 2)} "
            f"| {summary(r['alone'], 2)} | {summary(r['ready'], 2)} | {summary(r['rest'], 2)} "
            f"| {idle} | {last} | {r['failed']} / {r['requests']} | {r['grace']} |"
        )
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reloads", type=int, default=3, help="reloads per round and configuration")
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--surges", default="1,2")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument(
        "--src",
        action="append",
        metavar="NAME=DIR",
        help="also another portshard's src/ directory, interleaved (A/B)",
    )
    a = p.parse_args()
    srcs = [("this", ROOT / "src")]
    srcs += [(n, Path(d)) for n, _, d in (x.partition("=") for x in a.src or [])]
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
        f"{s}/{g}/{n}": {k: [] for k in ("seconds", "alone", "ready", "rest", "idle", "last_exit")}
        | {"failed": 0, "requests": 0, "grace": 0}
        for s in servers
        for g in surges
        for n, _ in srcs
    }
    for i in range(a.rounds):  # interleaved: each round runs every configuration once
        turn = srcs[i % len(srcs) :] + srcs[: i % len(srcs)]  # which tree goes first rotates
        for server in servers:
            for surge in surges:
                for name, src in turn:
                    r = reloads(server, surge, a.reloads, a.clients, src)
                    print(f"round {i + 1} {server} surge {surge} {name}: {r}", flush=True)
                    row = rows[f"{server}/{surge}/{name}"]
                    for key in ("seconds", "alone", "ready", "rest", "idle", "last_exit"):
                        row[key] += r[key]
                    row["failed"] += r["failed"]
                    row["requests"] += r["requests"]
                    row["grace"] += r["waited_grace"]
    report(RESULTS, rows, load_before, table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
