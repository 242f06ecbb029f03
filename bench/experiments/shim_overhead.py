"""Does the LD_PRELOAD shim cost anything on the data path? (It should not: after bind() the
program holds an ordinary socket, the supervisor's.)

    .venv/bin/python -m bench.experiments.shim_overhead [--rounds 10] [--seconds 2]
        [--connections 32]

The same server (tests/workers/hello.js: node, HTTP keep-alive) runs twice at once: "own"
binds its own socket; "shim" runs with the shim, handed a listening socket this process
created (fd 3, as the supervisor does), when it binds its port. wrk loads one, then the other,
round after round (interleaved, so drift on a shared machine hits both), and the script
prints each one's requests/s (median, min-max) and the shim/own ratio per round.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import portshard
from portshard.interpose import shim

ROOT = Path(__file__).resolve().parents[2]
SERVER = ROOT / "tests" / "workers" / "hello.js"
AT_FD_3 = "import os, sys; os.dup2(int(sys.argv[1]), 3); os.execvp(sys.argv[2], sys.argv[2:])"


def wait_serving(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
                c.sendall(b"GET / HTTP/1.0\r\n\r\n")
                if c.recv(100):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"nothing answers on port {port}")
        time.sleep(0.05)


def wrk(port: int, seconds: float, connections: int) -> float:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if match is None or re.search(r"Non-2xx|Socket errors", out):
        raise SystemExit(f"wrk failed or saw errors:\n{out}")
    return float(match.group(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--connections", type=int, default=32)
    opts = parser.parse_args()
    for tool in ("node", "wrk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (make deps-test installs it)")
    procs: list[subprocess.Popen[bytes]] = []
    with portshard.listen("tcp://127.0.0.1:0") as sock:
        try:
            own_port = free_port()
            procs.append(subprocess.Popen(["node", str(SERVER), str(own_port)]))
            shim_port = sock.getsockname()[1]
            env = {**os.environ, "LD_PRELOAD": shim.shim_path()}
            env.update(shim.inherit_env([os.fstat(sock.fileno()).st_ino]))
            argv = [sys.executable, "-c", AT_FD_3, str(sock.fileno())]
            procs.append(
                subprocess.Popen(
                    [*argv, "node", str(SERVER), str(shim_port)],
                    pass_fds=[sock.fileno()],
                    env=env,
                )
            )
            wait_serving(own_port)
            wait_serving(shim_port)
            wrk(own_port, 1, opts.connections)  # warm up both (JIT)
            wrk(shim_port, 1, opts.connections)
            own: list[float] = []
            shimmed: list[float] = []
            for i in range(opts.rounds):
                pair = [(own, own_port), (shimmed, shim_port)]
                for results, port in pair if i % 2 == 0 else reversed(pair):
                    results.append(wrk(port, opts.seconds, opts.connections))
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
    ratios = [s / o for s, o in zip(shimmed, own, strict=True)]
    print(
        f"node hello.js, wrk -t1 -c{opts.connections}, {opts.rounds} interleaved rounds of "
        f"{opts.seconds:g}s"
    )
    for name, values in (("own socket", own), ("under shim", shimmed)):
        print(
            f"  {name:11} req/s median {statistics.median(values):9.0f}   "
            f"min-max {min(values):.0f}-{max(values):.0f}"
        )
    print(
        f"  ratio shim/own: per round median {statistics.median(ratios):.3f}   "
        f"min-max {min(ratios):.3f}-{max(ratios):.3f}; of the medians "
        f"{statistics.median(shimmed) / statistics.median(own):.3f}"
    )


if __name__ == "__main__":
    main()
