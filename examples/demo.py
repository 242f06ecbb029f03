"""portshard demo: several processes serve one port, and the kernel spreads the connections.

Starts 4 copies of examples/hello_pid.py on one loopback port, waits until each says it is
ready, sends 400 HTTP requests (a new connection each), shows how they were spread over the
processes, then stops them. Takes a few seconds; nothing is left running, even on Ctrl-C.

    make demo                                  # or:
    python3 examples/demo.py [--workers 4] [--requests 400]
"""

from __future__ import annotations

import argparse
import ctypes
import http.client
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path

import portshard

HELLO = Path(__file__).resolve().with_name("hello_pid.py")
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0


def say(text: str = "") -> None:
    print(text, flush=True)


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the demo dies, even by SIGKILL (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def start(count: int, port: int, notify_path: str) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "NOTIFY_SOCKET": notify_path}
    for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        env.pop(key, None)  # if the demo itself was socket-activated, don't pass that on
    return [
        subprocess.Popen(
            [sys.executable, str(HELLO), "--listen", f"tcp://127.0.0.1:{port}"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        for _ in range(count)
    ]


def wait_ready(notify: socket.socket, children: list[subprocess.Popen[bytes]]) -> list[int]:
    """Wait for READY=1 from each child (the kernel tells us the sender's pid), with a deadline."""
    want = {child.pid for child in children}
    ready: list[int] = []
    deadline = time.monotonic() + READY_TIMEOUT
    while set(ready) != want:
        for child in children:
            if child.poll() is not None:
                err = child.stderr.read().decode(errors="replace") if child.stderr else ""
                raise RuntimeError(f"pid {child.pid} exited ({child.returncode}) early:\n{err}")
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"only {len(ready)} of {len(want)} ready after {READY_TIMEOUT}s")
        notify.settimeout(min(left, 0.2))
        try:
            data, ancillary, _, _ = notify.recvmsg(256, socket.CMSG_SPACE(12))
        except TimeoutError:
            continue
        for level, kind, cdata in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", cdata[:12])[0]
                if b"READY=1" in data.split(b"\n") and pid in want and pid not in ready:
                    ready.append(pid)
    return ready


def get(port: int) -> int:
    """One HTTP request on a new connection; the pid that answered."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/")
        body = conn.getresponse().read().decode()
    finally:
        conn.close()
    prefix = "Hello from PID "
    if not body.startswith(prefix):
        raise ValueError(f"unexpected answer {body!r}")
    return int(body[len(prefix) :])


def table(counts: Counter[int], pids: list[int], failed: int) -> None:
    total = sum(counts.values())
    say(f"    {'pid':>8}  {'requests':>8}  {'share':>6}")
    say(f"    {'-' * 8}  {'-' * 8}  {'-' * 6}")
    for pid in pids:
        n = counts[pid]
        share = 100.0 * n / total if total else 0.0
        bar = "#" * round(share / 2)
        say(f"    {pid:>8}  {n:>8}  {share:>5.1f}%  {bar}")
    say(f"    {'-' * 8}  {'-' * 8}  {'-' * 6}")
    say(f"    {'total':>8}  {total:>8}  {100.0 if total else 0.0:>5.1f}%")
    say(f"    {'failed':>8}  {failed:>8}")


def stop(children: list[subprocess.Popen[bytes]]) -> str:
    """SIGTERM every child, wait with a deadline, SIGKILL what is left. Says how it went."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    killed = 0
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            killed += 1
        if child.stderr:
            child.stderr.close()
    clean = sum(1 for child in children if child.returncode == 0)
    how = f"{clean} of {len(children)} exited cleanly on SIGTERM"
    return how + (f", {killed} needed SIGKILL" if killed else "")


def run(workers: int, requests: int) -> int:
    children: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="portshard-demo-") as tmp:
        notify_path = str(Path(tmp) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(notify_path)
            notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            try:
                # Hold the port while the workers join: the first listen picks a free port, and
                # nobody else can take it before they are all in. Closed before any request, so
                # every connection goes to a worker.
                with portshard.listen("tcp://127.0.0.1:0") as hold:
                    port = hold.getsockname()[1]
                    say(f"portshard demo: {workers} processes, one port (127.0.0.1:{port})")
                    say()
                    began = time.monotonic()
                    children = start(workers, port, notify_path)
                    say(f"  1. started {workers} copies of examples/{HELLO.name}. Each one called")
                    say(f'     portshard.listen("tcp://127.0.0.1:{port}"), which opened its own')
                    say(
                        f"     listening socket with SO_REUSEPORT: {workers} sockets on one port, "
                        "one group"
                    )
                    ready = wait_ready(notify, children)
                pids = ", ".join(map(str, ready))
                say(
                    f"  2. all {workers} sent READY=1 on NOTIFY_SOCKET within "
                    f"{time.monotonic() - began:.2f} s (pids {pids})"
                )
                counts: Counter[int] = Counter()
                failed = 0
                began = time.monotonic()
                for _ in range(requests):
                    try:
                        counts[get(port)] += 1
                    except (OSError, ValueError, http.client.HTTPException):
                        failed += 1
                took = time.monotonic() - began
                say(
                    f"  3. sent {requests} HTTP requests to http://127.0.0.1:{port}/, "
                    f"a new connection each, in {took:.2f} s ({requests / took:.0f}/s):"
                )
                say()
                table(counts, [child.pid for child in children], failed)
                say()
                explain(workers, counts)
            finally:
                if children:
                    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C can't skip this
                    say(f"  4. stopped the {len(children)} processes: {stop(children)}")
    return 0 if failed == 0 and len(counts) == workers else 1


def explain(workers: int, counts: Counter[int]) -> None:
    text = (
        "What the kernel did: for each new connection, Linux hashed its addresses and ports "
        "(the 4-tuple) to pick one socket of the group, and queued the connection there. No "
        "proxy in the data path, no shared accept lock: each process only ever saw its own "
        f"share. The shares are near 1/{workers} each but not exact, because a hash of each "
        "client port decides, not a round robin."
    )
    if len(counts) < workers:
        text += f" Only {len(counts)} of {workers} processes got a connection: see the table."
    say(textwrap.fill(text, width=92, initial_indent="  ", subsequent_indent="  "))
    say()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--workers", type=int, default=4, help="processes on the port")
    parser.add_argument("--requests", type=int, default=400, help="HTTP requests to send")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.requests < 1:
        parser.error("--workers and --requests must be at least 1")
    # SIGTERM to the demo stops it the way Ctrl-C does: through the finally that stops workers.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return run(args.workers, args.requests)
    except KeyboardInterrupt:
        say("portshard demo: interrupted; every process it started has been stopped")
        return 130
    except (portshard.PortshardError, RuntimeError) as exc:
        print(f"portshard demo: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
