"""Where a rolling reload of many slots spends its time, slot by slot, against the worker count.

    .venv/bin/python bench/experiments/reload_split.py [--workers 4,8,16]
        [--servers python,node-cluster,gunicorn] [--rounds 1] [--reloads 2] [--clients 2]
        [--pause-ms 20] [--src NAME=DIR ...]

For each server, worker count and portshard tree (``--src``: an A/B, interleaved round by
round): ``portshard run -w N --log-format json`` on a loopback port, a light bounded load
(``--clients`` clients, a new connection per request, ``--pause-ms`` between requests),
``--reloads`` reloads (``reload --wait`` over the control socket, in-process), then the
supervisor's own log is cut into each slot's handover:

- ``spawn -> ready``: the new worker's start-up as the supervisor saw it (exec to the --ready
  rule: a pre-fork server is ready when its children wait on the socket);
- ``ready -> drain``: from the new worker judged ready to its old worker's drain beginning;
- ``drain -> idle``: the freeze-check (the old worker found idle and signalled);
- ``idle -> next``: from the old worker signalled idle to the next slot's spawn (the reload
  moves on without waiting for the old worker's exit; for the last slot: to ``done``);
- ``stop -> exit``: the old worker's own shutdown after its stop signal (overlaps the next
  slot but for the last one);
- ``reload``: the whole ``reload --wait``; ``sup CPU``: the supervisor's CPU seconds during it.

Servers: ``python`` (bench/workers/httpd.py on the sockets it is passed: cooperative),
``node-cluster`` (bench/workers/cluster_app.js: a node cluster primary with 2 children, under
the preload shim, ``--via auto``), ``gunicorn`` (``gunicorn -w 2``, sync workers, from
LISTEN_FDS). Medians (min-max) over every slot of every reload. The load average before and
after is printed; results go to bench/results/reload_split.json. Every process is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from bench.experiments.common import report, summary, uptime, wait_ready  # noqa: E402
from bench.load.loadgen import Load  # noqa: E402
from bench.procs import free_port  # noqa: E402
from portshard.control.client import request  # noqa: E402

BIN = Path(sys.executable).parent
APPS = ROOT / "tests" / "workers" / "recipes"
SERVERS = {
    "python": [sys.executable, str(ROOT / "bench" / "workers" / "httpd.py"), "--mode", "reuseport"],
    "node-cluster": ["node", str(ROOT / "bench" / "workers" / "cluster_app.js"), "{port}"],
    "gunicorn": [str(BIN / "gunicorn"), "--no-control-socket", "-w", "2", "wsgi_app:app"],
}
RESULTS = ROOT / "bench" / "results" / "reload_split.json"
PARTS = ("spawn_ready", "ready_drain", "drain_idle", "idle_next", "stop_exit")


def _ts(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(entry["ts"].replace("Z", "+00:00")).timestamp()


def split(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each reload's slots, in order: the parts of its handover (seconds)."""
    reloads: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = None
    for e in lines:
        msg, t = e.get("msg", ""), _ts(e)
        if msg.startswith("reload to generation") and "slots" in msg:
            cur = {"start": t, "ready": {}, "retired": {}}
        elif cur is None:
            continue
        elif " ready after " in msg or " ready (notify) after " in msg:
            took = float(msg.rsplit("after ", 1)[1].rstrip("s"))
            cur["ready"][e["slot"]] = (t - took, t)
        elif "found idle" in msg and "retired" in msg:
            idle = float(msg.split("found idle ")[1].split("s ")[0])
            gone = float(msg.split("exited ")[-1].split("s after its stop")[0])
            cur["retired"][e["slot"]] = (t - gone - idle, t - gone, t)
        elif msg.startswith("reload to generation") and msg.endswith("done"):
            cur["done"] = t
            reloads.append(cur)
            cur = None
    out = []
    for r in reloads:
        order = sorted(r["ready"], key=lambda s: r["ready"][s][0])
        slots = []
        for i, s in enumerate(order):
            spawn, ready = r["ready"][s]
            if s not in r["retired"]:
                continue
            drain, idle, gone = r["retired"][s]
            nxt = r["ready"][order[i + 1]][0] if i + 1 < len(order) else r["done"]
            slots.append(
                {
                    "spawn_ready": ready - spawn,
                    "ready_drain": drain - ready,
                    "drain_idle": idle - drain,
                    "idle_next": nxt - idle,
                    "stop_exit": gone - idle,
                }
            )
        out.append({"first_spawn": r["ready"][order[0]][0] - r["start"], "slots": slots})
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(server: str, workers: int, a: argparse.Namespace, src: Path) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="ps-split-"))
    control = tmp / "c.sock"
    port = free_port()
    argv = [x.replace("{port}", str(port)) for x in SERVERS[server]]
    log = open(tmp / "run.log", "wb")  # noqa: SIM115 - closed below
    sup = subprocess.Popen(
        [
            *[sys.executable, "-m", "portshard", "run", "-w", str(workers), "--name", tmp.name],
            *["--log-format", "json", "--ready-timeout", "120", "--control", str(control)],
            *["--listen", f"tcp://127.0.0.1:{port}", "--", *argv],
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": f"{src}:{APPS}"},
        cwd=APPS,
        start_new_session=True,
    )
    try:
        wait_ready(
            sup,
            control,
            60 + 3 * workers,
            lambda: f"{server} -w {workers} did not boot: {_tail(tmp)}",
        )
        took, cpu = [], []
        with Load(
            "127.0.0.1", port, concurrency=a.clients, pause=a.pause_ms / 1000, max_seconds=600
        ) as load:
            load.wait_for(20)
            for _ in range(a.reloads):
                time.sleep(0.5)
                c, t = cpu_seconds(sup.pid), time.monotonic()
                request(str(control), "reload", timeout=300, wait=True)
                took.append(time.monotonic() - t)
                cpu.append(cpu_seconds(sup.pid) - c)
            time.sleep(0.3)
        lines = []
        for raw in (tmp / "run.log").read_text(errors="replace").splitlines():
            try:
                e = json.loads(raw)
            except ValueError:
                continue
            if e.get("logger", "").startswith("portshard.supervisor"):
                lines.append(e)
        return {
            "reload": took,
            "cpu": cpu,
            "split": split(lines),
            "requests": len(load.results),
            "failed": len(load.failed),
            "grace": sum("still holds connections" in e["msg"] for e in lines),
            "holds": sum("held off its slot" in e["msg"] for e in lines),
        }
    finally:
        if sup.poll() is None:
            sup.send_signal(signal.SIGTERM)
            try:
                sup.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(sup.pid, signal.SIGKILL)
                sup.wait(10)
        log.close()
        if os.environ.get("KEEP_LOG"):
            shutil.copy(tmp / "run.log", os.environ["KEEP_LOG"])
        shutil.rmtree(tmp, ignore_errors=True)


def _tail(tmp: Path) -> str:
    return "\n".join((tmp / "run.log").read_text(errors="replace").splitlines()[-15:])


def table(rows: dict[str, dict[str, Any]]) -> str:
    out = [
        "| server | -w | tree | reload --wait, s | per slot: spawn->ready | ready->drain "
        "| drain->idle | idle->next spawn | stop->exit | sums: ready / idle / between, s "
        "| sup CPU, s | failed / requests | grace, holds |",
        "|---|---:|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in rows.items():
        server, n, src = key.split("/")
        slots = [s for rel in r["split"] for s in rel["slots"]]
        if not slots:
            out.append(f"| {server} | {n} | {src} | {summary(r['reload'], 2)} | no split |")
            continue
        per = [summary([s[p] for s in slots], 3) for p in PARTS]
        sums = [
            summary([sum(s[p] for s in rel["slots"]) for rel in r["split"]], 2)
            for p in ("spawn_ready", "drain_idle", "idle_next")
        ]
        out.append(
            f"| {server} | {n} | {src} | {summary(r['reload'], 2)} | {' | '.join(per)} "
            f"| {' / '.join(sums)} | {summary(r['cpu'], 2)} | {r['failed']} / {r['requests']} "
            f"| {r['grace']}, {r['holds']} |"
        )
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--workers", default="4,8,16")
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--reloads", type=int, default=2)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--pause-ms", type=float, default=20.0)
    p.add_argument("--src", action="append", metavar="NAME=DIR", help="another tree's src/")
    a = p.parse_args()
    srcs = [("this", ROOT / "src")]
    srcs += [(n, Path(d)) for n, _, d in (x.partition("=") for x in a.src or [])]
    servers = [s for s in a.servers.split(",") if s]
    for s in servers:
        if s not in SERVERS:
            p.error(f"--servers: {s!r} is not one of {', '.join(SERVERS)}")
    counts = [int(x) for x in a.workers.split(",")]
    load_before = uptime()
    print(load_before, flush=True)
    rows: dict[str, dict[str, Any]] = {}
    for i in range(a.rounds):
        turn = srcs[i % len(srcs) :] + srcs[: i % len(srcs)]
        for server in servers:
            for n in counts:
                for name, src in turn:
                    r = run(server, n, a, src)
                    print(
                        f"round {i + 1} {server} -w {n} {name}: reload {r['reload']} "
                        f"cpu {r['cpu']} failed {r['failed']}/{r['requests']} "
                        f"grace {r['grace']} holds {r['holds']} ({uptime()})",
                        flush=True,
                    )
                    row = rows.setdefault(
                        f"{server}/{n}/{name}",
                        {"reload": [], "cpu": [], "split": [], "failed": 0, "requests": 0}
                        | {"grace": 0, "holds": 0},
                    )
                    for k in ("reload", "cpu", "split"):
                        row[k] += r[k]
                    for k in ("failed", "requests", "grace", "holds"):
                        row[k] += r[k]
    report(RESULTS, rows, load_before, table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
