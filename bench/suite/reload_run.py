"""Reloads under load: what each way of replacing workers costs the clients.

``naive``: N copies of the worker, each binding its own SO_REUSEPORT socket; a reload
restarts them one at a time (the new copy joins the group and is listening before the old
one gets SIGTERM, finishes what it holds and exits). Closing the old socket resets whatever
the kernel had queued on it, unless ``net.ipv4.tcp_migrate_req=1`` moves it to another socket.
``portshard``: `portshard run` and `portshard reload --wait` (the sockets stay; the old worker
is frozen, checked and killed).

TCP (`tcp_reload`): the asyncio load generator (bench.load.loadgen, a new connection per request)
runs through R rolling reloads; every failed request is counted by kind.
UDP (`udp_flows`): a fixed set of flows asks which slot answers it before and after each
reload; a flow moved if another slot answers it.

`tcp_migrate_req` is per network namespace, so the bench never sets it on the host: it runs
this module as a program inside a new one (``unshare --net``, loopback brought up, the sysctl
written there), and prints the result as JSON::

    unshare --net -- python -m bench.suite.reload_run --kind naive --migrate 1 --workers 2
        --reloads 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from bench.load.loadgen import Load
from bench.load.udpload import FlowSet
from bench.procs import ROOT, BenchError
from bench.suite.servers import HOST, HTTPD, UDPD, Group, Supervisor

MIGRATE = "/proc/sys/net/ipv4/tcp_migrate_req"


class Deployment(Protocol):
    port: int

    def reload(self) -> None: ...

    def close(self) -> None: ...


class Naive:
    def __init__(self, cmd: list[str], workers: int, log: Path) -> None:
        self.group = Group(cmd, workers, log, cmd[-1])
        self.port = self.group.port
        self.workers = workers

    def reload(self) -> None:
        for slot in range(self.workers):
            self.group.restart(slot)

    def close(self) -> None:
        self.group.close()


class Portshard:
    def __init__(self, cmd: list[str], workers: int, log: Path, listen: str = "tcp") -> None:
        self.sup = Supervisor(workers, [], cmd, log, listen)
        try:
            st = self.sup.wait_ready()
        except BaseException:
            self.sup.close()
            raise
        self.port = int(st["listen"][0]["port"])

    def reload(self) -> None:
        self.sup.ctl("reload", "--wait")

    def close(self) -> None:
        self.sup.close()


def deploy(kind: str, proto: str, workers: int, log: Path, work_ms: float) -> Deployment:
    if proto == "udp":
        if kind == "naive":
            return Naive([*UDPD, "--reuseport"], workers, log)
        return Portshard(UDPD, workers, log, "udp")
    http = [*HTTPD, "--mode", "reuseport", "--work-ms", str(work_ms)]
    if kind == "naive":
        return Naive(http, workers, log)
    return Portshard(http, workers, log)


def tcp_reload(
    kind: str, *, workers: int, reloads: int, concurrency: int, work_ms: float, log: Path
) -> dict[str, Any]:
    d = deploy(kind, "tcp", workers, log, work_ms)
    try:
        load = Load(HOST, d.port, concurrency=concurrency, max_seconds=30.0 + 10 * reloads)
        took: list[float] = []
        with load:
            _wait_results(load, 300)
            for _ in range(reloads):
                t0 = time.monotonic()
                d.reload()
                took.append(time.monotonic() - t0)
                _wait_results(load, len(load.results) + 300)
    finally:
        d.close()
    lat = sorted(r.latency for r in load.results if r.ok)
    return {
        "requests": len(load.results),
        "failed": len(load.failed),
        "by_kind": {k: v for k, v in load.by_kind().items() if k != "ok"},
        "reload_s": took,
        "max_ms": lat[-1] * 1000 if lat else None,
    }


def _wait_results(load: Load, n: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while len(load.results) < n:
        if time.monotonic() > deadline:
            raise BenchError(f"the load reached only {len(load.results)} requests of {n}")
        time.sleep(0.01)


def udp_flows(
    kind: str, *, workers: int, reloads: int, flows: int, log: Path, old_first: bool = False
) -> dict[str, Any]:
    """Flows answered by more than one slot during each reload (probed continuously: a flow
    that visits another worker for 100 ms is as broken, for QUIC, as one that moved for good)."""
    d = deploy(kind, "udp", workers, log, 0.0)
    if old_first and isinstance(d, Naive):
        d.group.old_first = True
    fs = FlowSet(HOST, d.port, flows)
    moved: list[int] = []
    unanswered: list[int] = []
    try:
        for _ in range(reloads):
            seen: list[set[str]] = [set() for _ in range(flows)]
            missing = [0]
            stop = threading.Event()

            for i, slot in enumerate(fs.probe()):
                if slot is not None:
                    seen[i].add(slot)
            tracker = threading.Thread(target=_track, args=(fs, seen, missing, stop), daemon=True)
            tracker.start()
            d.reload()
            time.sleep(0.1)
            stop.set()
            tracker.join(30)
            moved.append(sum(1 for slots in seen if len(slots) > 1))
            unanswered.append(missing[0])
    finally:
        fs.close()
        d.close()
    return {"flows": flows, "moved": moved, "unanswered": unanswered}


def _track(fs: FlowSet, seen: list[set[str]], missing: list[int], stop: threading.Event) -> None:
    """Probe every flow again and again until ``stop`` (one last round after it)."""
    while True:
        last = stop.is_set()
        for i, slot in enumerate(fs.probe(tries=1, timeout=0.2)):
            if slot is None:
                missing[0] += 1
            else:
                seen[i].add(slot)
        if last:
            return


def in_netns(args: list[str], migrate: bool, timeout: float) -> dict[str, Any]:
    """Run this module with ``args`` in a new network namespace; its JSON result."""
    res = subprocess.run(
        [
            "unshare",
            "--net",
            "--",
            sys.executable,
            "-m",
            "bench.suite.reload_run",
            *args,
            "--netns-setup",
            "--migrate",
            "1" if migrate else "0",
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    if res.returncode:
        raise BenchError(f"reload run in a network namespace failed: {res.stderr.strip()[-400:]}")
    result: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return result


def netns_usable() -> str | None:
    """None if this process may create a network namespace (root, unshare), else why not."""
    try:
        res = subprocess.run(
            ["unshare", "--net", "--", "true"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare --net: {exc}"
    return None if res.returncode == 0 else f"unshare --net: {res.stderr.strip()}"


def _setup_netns(migrate: bool) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=10)
    Path(MIGRATE).write_text("1\n" if migrate else "0\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="One reload-under-load run (see the docstring).")
    p.add_argument("--kind", choices=["naive", "portshard"], required=True)
    p.add_argument("--proto", choices=["tcp", "udp"], default="tcp")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--reloads", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--work-ms", type=float, default=1.0)
    p.add_argument("--flows", type=int, default=200)
    p.add_argument("--old-first", action="store_true", help="naive: stop the old, then start")
    p.add_argument("--log", type=Path, default=Path("/dev/null"))
    p.add_argument("--netns-setup", action="store_true", help="bring lo up, set the sysctl")
    p.add_argument("--migrate", choices=["0", "1"], default=None)
    a = p.parse_args(argv)
    if a.netns_setup:
        _setup_netns(a.migrate == "1")
    if a.proto == "tcp":
        out = tcp_reload(
            a.kind,
            workers=a.workers,
            reloads=a.reloads,
            concurrency=a.concurrency,
            work_ms=a.work_ms,
            log=a.log,
        )
    else:
        out = udp_flows(
            a.kind,
            workers=a.workers,
            reloads=a.reloads,
            flows=a.flows,
            log=a.log,
            old_first=a.old_first,
        )
    out["tcp_migrate_req"] = int(Path(MIGRATE).read_text())
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
