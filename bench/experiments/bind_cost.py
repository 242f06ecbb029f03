"""What one bind() costs a program under each kind of interposition (µs, from inside it).

    .venv/bin/python -m bench.experiments.bind_cost [--calls 2000] [--rounds 3]

A small C program (bench/experiments/bind_cost.c) times N bind() calls on fresh sockets, either to a
port nobody manages (127.0.0.1:0: the path every unrelated bind() takes) or to the managed
address (0.0.0.0:P, handed the supervisor's socket each time). It runs with no
interposition, under the LD_PRELOAD shim, and under the seccomp trap answered by this
process exactly as the supervisor answers it (interpose.seccomp.Trap in a selector loop).
Variants are interleaved, round after round; the table shows the median of the rounds'
medians and the range of the rounds' medians.
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import portshard
from portshard.interpose import seccomp, shim

HERE = Path(__file__).resolve().parent
AT_FD_3 = "import os, sys; os.dup2(int(sys.argv[1]), 3); os.execv(sys.argv[2], sys.argv[2:])"


def build(out: Path) -> str:
    binary = out / "bind_cost"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(HERE / "bind_cost.c")], check=True)
    return str(binary)


def parse(line: str) -> dict[str, int]:
    assert line.startswith("bind_ns "), line
    return {k: int(v) for k, v in (item.split("=") for item in line.split()[1:])}


def run_plain(binary: str, args: list[str], sock: socket.socket, env: dict[str, str]) -> str:
    fd = sock.fileno()
    return subprocess.run(
        [sys.executable, "-c", AT_FD_3, str(fd), binary, *args],
        pass_fds=[fd],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def run_trapped(binary: str, args: list[str], sock: socket.socket) -> tuple[str, float, int]:
    """Run under the seccomp trap, answered here; (output, seconds we spent, calls answered)."""
    ours, theirs = socket.socketpair()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            ours.close()
            os.close(out_r)
            os.dup2(out_w, 1)
            seccomp.child_install(theirs.fileno(), as_root=os.geteuid() == 0)
            os.execv(binary, [binary, *args])
        finally:
            os._exit(127)
    theirs.close()
    os.close(out_w)
    listener = seccomp.receive_listener(ours)
    ours.close()
    trap = seccomp.Trap(listener, [sock], label="bench")
    pidfd = os.pidfd_open(pid)
    with selectors.DefaultSelector() as sel:
        sel.register(listener, selectors.EVENT_READ, "trap")
        sel.register(pidfd, selectors.EVENT_READ, "exit")
        done = False
        while not done:
            for key, _ in sel.select():
                if key.data == "exit":
                    done = True
                elif not trap.on_readable():
                    sel.unregister(listener)
    os.waitpid(pid, 0)
    os.close(pidfd)
    trap.close()
    with os.fdopen(out_r) as f:
        return f.read(), trap.busy, trap.handled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, portshard.listen("tcp://127.0.0.1:0") as sock:
        binary = build(Path(tmp))
        port = sock.getsockname()[1]
        unmanaged = ["127.0.0.1", "0", str(opts.calls)]
        managed = ["0.0.0.0", str(port), str(opts.calls)]
        shim_env = {"LD_PRELOAD": shim.shim_path()}
        shim_env.update(shim.inherit_env([os.fstat(sock.fileno()).st_ino]))
        medians: dict[str, list[float]] = {}
        answer: dict[str, list[float]] = {}
        for _ in range(opts.rounds):
            runs = {
                "plain, unmanaged port": lambda: run_plain(binary, unmanaged, sock, {}),
                "shim, unmanaged port": lambda: run_plain(binary, unmanaged, sock, shim_env),
                "shim, managed address": lambda: run_plain(binary, managed, sock, shim_env),
            }
            for name, run in runs.items():
                got = parse(run())
                assert got["failed"] == 0, (name, got)
                medians.setdefault(name, []).append(got["median"] / 1000)
            for name, args in (
                ("seccomp, unmanaged port", unmanaged),
                ("seccomp, managed address", managed),
            ):
                text, busy, handled = run_trapped(binary, args, sock)
                got = parse(text)
                assert got["failed"] == 0, (name, got)
                medians.setdefault(name, []).append(got["median"] / 1000)
                answer.setdefault(name, []).append(busy / max(handled, 1) * 1e6)
    base = statistics.median(medians["plain, unmanaged port"])
    print(f"bind() cost, {opts.calls} calls x {opts.rounds} rounds (median of round medians)")
    print(f"{'':28} {'median µs':>10} {'range':>15} {'added µs':>9} {'answering µs':>13}")
    for name, values in medians.items():
        med = statistics.median(values)
        spread = f"{min(values):.1f}-{max(values):.1f}"
        extra = f"{statistics.median(answer[name]):.1f}" if name in answer else ""
        print(f"{name:28} {med:10.1f} {spread:>15} {med - base:9.1f} {extra:>13}")


if __name__ == "__main__":
    main()
