"""UDP datagrams lost to reloads: a worker retired with a datagram read and not yet answered.

    .venv/bin/python bench/experiments/udp_reload.py [--shape loop|asyncio|socat] [--reloads 10]
        [--workers 2] [--flows 8] [--work-ms 3] [--drain freeze]

``portshard run -w N --listen udp://127.0.0.1:0`` of a UDP echo that takes ``--work-ms`` per
datagram (so one is often in hand), in one of three shapes: ``loop`` (a blocking
recvfrom/sleep/sendto loop on the socket it binds itself, ``--via preload``), ``asyncio`` (a
DatagramProtocol that answers from a task after ``asyncio.sleep``) and ``socat``
(``UDP4-RECVFROM,fork``: a child per datagram). ``--flows`` clients (a socket each: a flow)
send numbered datagrams, one outstanding each, wait up to 2 s for its answer, then pause
``--pause-ms`` (a saturated blocking worker never waits in recvfrom: not ready); meanwhile
``portshard reload --wait`` runs ``--reloads`` times. Printed: datagrams sent, answered, lost
(no answer in 2 s), and the reloads' wall times. Every process started is stopped.
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from bench.experiments.common import summary, uptime  # noqa: E402
from portshard.control.client import request  # noqa: E402
from portshard.errors import PortshardError  # noqa: E402

PORTSHARD = [sys.executable, "-m", "portshard"]
ANSWER_WAIT = 2.0  # s a client waits for an answer before it counts the datagram lost

LOOP = """
import socket, sys, time
work = float(sys.argv[2]) / 1000
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(2048)
    time.sleep(work)
    s.sendto(data, peer)
"""

ASYNCIO = """
import asyncio, socket, sys
work = float(sys.argv[2]) / 1000
class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport
    def datagram_received(self, data, peer):
        asyncio.get_running_loop().create_task(self.answer(data, peer))
    async def answer(self, data, peer):
        await asyncio.sleep(work)
        self.transport.sendto(data, peer)
async def main():
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", int(sys.argv[1])))
    await asyncio.Event().wait()
asyncio.run(main())
"""


def worker_command(shape: str, work_ms: float) -> list[str]:
    if shape == "loop":
        return [sys.executable, "-c", LOOP, "{port}", str(work_ms)]
    if shape == "asyncio":
        return [sys.executable, "-c", ASYNCIO, "{port}", str(work_ms)]
    if shape == "socat":  # a child per datagram; it runs the shell, which echoes
        return [
            "socat",
            "UDP4-RECVFROM:{port},bind=127.0.0.1,fork",
            f"SYSTEM:sleep {work_ms / 1000:.3f}; cat",
        ]
    raise SystemExit(f"--shape {shape!r}: loop, asyncio or socat")


class Clients(threading.Thread):
    """``flows`` sockets, each with one numbered datagram outstanding at a time."""

    def __init__(self, port: int, flows: int, pause: float) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.pause = pause
        self.socks = []
        for _ in range(flows):
            c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            c.bind(("127.0.0.1", 0))
            c.setblocking(False)
            self.socks.append(c)
        self.sent = self.answered = self.lost = 0
        self.halt = threading.Event()

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        due: dict[socket.socket, tuple[bytes, float]] = {}
        later: dict[socket.socket, float] = {}  # flows pausing, until then
        seq = 0

        def send(c: socket.socket) -> None:
            nonlocal seq
            seq += 1
            msg = str(seq).encode()
            c.sendto(msg, ("127.0.0.1", self.port))
            self.sent += 1
            due[c] = (msg, time.monotonic() + ANSWER_WAIT)

        for c in self.socks:
            sel.register(c, selectors.EVENT_READ)
            send(c)
        while due or later:
            now = time.monotonic()
            for c, until in list(later.items()):
                if now >= until:
                    del later[c]
                    if not self.halt.is_set():
                        send(c)
            for key, _ in sel.select(0.002 if later else 0.05):
                c = key.fileobj
                assert isinstance(c, socket.socket)
                try:
                    data = c.recv(2048)
                except OSError:
                    continue
                if c in due and data == due[c][0]:
                    self.answered += 1
                    del due[c]
                    later[c] = time.monotonic() + self.pause
            now = time.monotonic()
            for c, (_msg, deadline) in list(due.items()):
                if now >= deadline:
                    self.lost += 1
                    del due[c]
                    if not self.halt.is_set():
                        send(c)
        sel.close()
        for c in self.socks:
            c.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="loop")
    ap.add_argument("--reloads", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--flows", type=int, default=4)
    ap.add_argument("--work-ms", type=float, default=3.0)
    ap.add_argument("--pause-ms", type=float, default=5.0)
    ap.add_argument("--drain", default="freeze")
    ap.add_argument("--quiet", type=float, default=0.0, help="s of load before the reloads")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ps-udp-"))
    control = tmp / "c.sock"
    via = "fds" if args.shape == "none" else "preload"
    cmd = [
        *PORTSHARD, "run", "-w", str(args.workers), "--listen", "udp://127.0.0.1:0",
        "--control", str(control), "--via", via, "--drain", args.drain, "--grace", "10",
        "--", *worker_command(args.shape, args.work_ms),
    ]  # fmt: skip
    log = open(tmp / "log", "w")  # noqa: SIM115
    sup = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    before = uptime()
    try:
        deadline = time.monotonic() + 30
        st = None
        while time.monotonic() < deadline:
            try:
                st = request(str(control), "status", timeout=10)
            except (OSError, PortshardError):
                st = None
            if st and st.get("ready"):
                break
            time.sleep(0.05)
        if not st or not st.get("ready"):
            raise SystemExit(f"not ready; log: {(tmp / 'log').read_text()[-2000:]}")
        clients = Clients(st["listen"][0]["port"], args.flows, args.pause_ms / 1000)
        clients.start()
        time.sleep(0.5)
        walls = [0.0]
        time.sleep(args.quiet)  # a baseline: what the shape loses with no reload
        for _ in range(args.reloads):
            t0 = time.monotonic()
            subprocess.run([*PORTSHARD, "reload", "--control", str(control)], check=True)
            walls.append(time.monotonic() - t0)
            walls = walls[1:] if walls[0] == 0.0 else walls
            time.sleep(0.2)
        clients.halt.set()
        clients.join(ANSWER_WAIT + 5)
        print(
            f"shape {args.shape}, {args.workers} workers, {args.work_ms:g} ms a datagram, "
            f"{args.flows} flows pausing {args.pause_ms:g} ms, {args.reloads} reloads "
            f"(--drain {args.drain}): "
            f"sent {clients.sent}, answered {clients.answered}, lost {clients.lost}; "
            f"reload {summary(walls, 2)} s; load: {before}"
        )
    finally:
        os.killpg(sup.pid, signal.SIGTERM)
        try:
            sup.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(sup.pid, signal.SIGKILL)
            sup.wait()
        log.close()
        print(f"log: {tmp / 'log'}")


if __name__ == "__main__":
    main()
