"""The `portshard run` demo: 4 workers on one port, a rolling reload under load, 0 failed.

    python3 examples/run_demo.py            (what `make demo` runs)

It starts `portshard run -w 4` with examples/hello_pid.py, sends a bounded load over
loopback (connection per request), replaces every worker with a rolling reload in the middle
of it, and prints how the requests were spread and how many failed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load.loadgen import Load  # noqa: E402 - the repository root is put on the path first

PORTSHARD = [sys.executable, "-m", "portshard"]


def ctl(control: str, *args: str) -> str:
    res = subprocess.run(
        [*PORTSHARD, *args, "--control", control], capture_output=True, text=True, timeout=120
    )
    if res.returncode:
        raise SystemExit(f"demo: portshard {' '.join(args)} failed: {res.stderr.strip()}")
    return res.stdout


def wait_ready(
    control: str, proc: subprocess.Popen[bytes], timeout: float = 20
) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("demo: the supervisor exited early; see the log above")
        if os.path.exists(control):
            res = subprocess.run(
                [*PORTSHARD, "status", "--json", "--control", control],
                capture_output=True,
                text=True,
            )
            if res.returncode == 0:
                status: dict[str, object] = json.loads(res.stdout)
                if status["ready"]:
                    return status
        time.sleep(0.1)
    raise SystemExit("demo: the workers did not become ready in time")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="portshard-demo-") as tmp:
        control = os.path.join(tmp, "demo.sock")
        log = open(os.path.join(tmp, "supervisor.log"), "wb")  # noqa: SIM115 - closed below
        cmd = [
            *PORTSHARD,
            "run",
            "-w",
            "4",
            "--listen",
            "tcp://127.0.0.1:0",
            "--control",
            control,
            "--",
            sys.executable,
            str(ROOT / "examples" / "hello_pid.py"),
        ]
        print("$ portshard run -w 4 --listen tcp://127.0.0.1:0 -- python3 examples/hello_pid.py")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            status = wait_ready(control, proc)
            port = status["listen"][0]["port"]  # type: ignore[index]
            print(f"4 workers ready on 127.0.0.1:{port}, each with its own socket in the group\n")
            print(ctl(control, "status"))
            before = {s["pid"] for s in status["slots"]}  # type: ignore[attr-defined]
            print("sending a bounded load: 16 clients on loopback, a new connection per request;")
            print("$ portshard reload --wait   (in the middle of it)\n")
            with Load("127.0.0.1", int(port), concurrency=16, max_seconds=30) as load:
                load.wait_for(300)
                t0 = time.monotonic()
                ctl(control, "reload", "--wait")
                took = time.monotonic() - t0
                load.wait_for(load.count() + 1500)
            after = {s["pid"] for s in json.loads(ctl(control, "status", "--json"))["slots"]}
            print(ctl(control, "status"))
            spread = Counter(
                r.body.split()[-1] for r in load.results if r.ok and r.body.startswith("Hello")
            )
            total = load.count()
            print(f"{'worker pid':>12}  {'generation':>10}  {'requests':>8}  share")
            for pid, n in sorted(spread.items(), key=lambda kv: (int(kv[0]) in after, kv[0])):
                gen = "new" if int(pid) in after else "old" if int(pid) in before else "?"
                bar = "#" * round(40 * n / total)
                print(f"{pid:>12}  {gen:>10}  {n:>8}  {100 * n / total:5.1f}% {bar}")
            lat = sorted(r.latency for r in load.results if r.ok)
            print(
                f"\n{total} requests, {len(load.failed)} failed"
                + (f" {load.by_kind()}" if load.failed else "")
                + f"; rolling reload of 4 workers took {took:.2f}s under load; "
                f"latency p50 {lat[len(lat) // 2] * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms"
            )
            print("The kernel spread connections over the 4 sockets; every worker was replaced,")
            print("and no connection failed: the sockets (and their queues) belong to portshard.")
            return 1 if load.failed else 0
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
            log.close()


if __name__ == "__main__":
    sys.exit(main())
