"""A crash and a rerun with another portshard: does the adopter take the warden's workers?

    .venv/bin/python bench/experiments/downgrade.py --other /work/wt/old [--runs 3]
        [--direction down|up] [--ready accept|notify]

``down``: this tree's supervisor (and so its warden) under a load (8 in flight, connection per
request, fdworker), SIGKILLed, then ``portshard run`` of the tree at ``--other`` (an older
commit: ``git worktree add --detach DIR REV``; its ``src`` goes first on PYTHONPATH) with the
same arguments; ``up`` the other way round. Per run: whether the rerun adopted the workers
(the same pids, in its status) or exited (its last log lines), its time to ready, the failed
requests, then its ``reload --wait`` and stop, and what was left (processes by a tag every
process inherits). Every process is ended by its pid; bounded loops only.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from bench.experiments.fault_campaign import TAG_ENV, tagged  # noqa: E402
from bench.load.loadgen import Load  # noqa: E402
from portshard.control.client import request  # noqa: E402
from portshard.errors import PortshardError  # noqa: E402
from portshard.linux import cgroup  # noqa: E402

FDWORKER = [sys.executable, str(ROOT / "tests" / "workers" / "fdworker.py")]


def start(tree: Path, args: list[str], tag: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, TAG_ENV: tag, "PYTHONPATH": str(tree / "src"), "WORK_MS": "1"}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "portshard", "run", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def status(control: Path) -> dict[str, Any] | None:
    try:
        st: dict[str, Any] = request(str(control), "status", timeout=5)
    except (PortshardError, OSError):
        return None
    return st


def ready(p: subprocess.Popen[bytes], control: Path, timeout: float) -> dict[str, Any] | None:
    """Its status once ready; None if it exited or did not get there in ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and p.poll() is None:
        st = status(control)
        if st is not None and st.get("ready"):
            return st
        time.sleep(0.1)
    return None


def one(new: Path, old: Path, ready_kind: str, tmp: Path) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:12]
    control = tmp / "c.sock"
    log = tmp / "sup.log"
    args = ["--control", str(control), "--name", f"dg-{tag}", "-w", "2", "--ready", ready_kind]
    args += ["--orphan-timeout", "30", "--listen", "tcp://127.0.0.1:0", "--", *FDWORKER, tag]
    res: dict[str, Any] = {}
    first = start(new, args, tag, log)
    procs = [first]
    load = None
    try:
        st = ready(first, control, 30)
        if st is None:
            res["error"] = "the first supervisor did not get ready"
            return res
        port, pids = int(st["listen"][0]["port"]), [s["pid"] for s in st["slots"]]
        args[args.index("tcp://127.0.0.1:0")] = f"tcp://127.0.0.1:{port}"
        load = Load("127.0.0.1", port, concurrency=8, max_seconds=60).start()
        load.wait_for(200, 30)
        first.kill()
        first.wait(10)
        time.sleep(0.5)
        began = time.monotonic()
        second = start(old, args, tag, log)
        procs.append(second)
        st = ready(second, control, 30)
        res["ready_s"] = round(time.monotonic() - began, 2) if st is not None else None
        if st is None:
            res["exit"] = second.poll()
            res["said"] = log.read_text().splitlines()[-3:]
        else:
            res["adopted"] = sorted(s["pid"] for s in st["slots"]) == sorted(pids)
            request(str(control), "reload", timeout=60, wait=True)
            load.wait_for(load.count() + 100, 20)
        load.stop()
        res["requests"], res["failed"] = load.count(), load.by_kind()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(30)
        time.sleep(1.0)
        res["left"] = sorted(tagged(tag).items())
    finally:
        if load is not None:
            load.stop()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for pid in tagged(tag):  # a failed run's warden and workers, by pid
            os.kill(pid, signal.SIGKILL)
        base = cgroup.detect().base  # and the cgroup home its killed warden kept
        for home in Path(base).glob(f"dg-{tag}.*") if base else ():
            cgroup.Cgroup(str(home)).remove(wait=2.0)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--other", type=Path, required=True, help="the other portshard's tree")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--direction", choices=["down", "up"], default="down")
    ap.add_argument("--ready", choices=["accept", "notify"], default="accept")
    a = ap.parse_args()
    first, second = (ROOT, a.other) if a.direction == "down" else (a.other, ROOT)
    for i in range(a.runs):
        with tempfile.TemporaryDirectory(prefix="dg-") as tmp:
            print(i, one(first, second, a.ready, Path(tmp)), flush=True)


if __name__ == "__main__":
    main()
