"""The supervisor's CPU against idle held connections (issue 17), and the eBPF programs' cost.

    sudo .venv/bin/python bench/experiments/held_cpu.py [--counts 0,1000,10000,50000]
        [--configs ebpf,cbpf,off] [--rounds 3] [--seconds 10]

Each point runs in its own network namespace: ``portshard run -w 4`` with workers that hold
every connection (workers/holder.py), N idle connections from the C client load/hold_client.c
(source addresses spread over 127.0.0.0/24; as many client processes as the fd limit asks),
then the supervisor's CPU (utime + stime from /proc) over ``--seconds``, as % of one core.
The fd limit is raised to its hard limit here (this machine: 20,000 per process, hence 4
workers and several clients for 50k).

``--prog-cost``: the eBPF programs' run time per connection at full load (BPF_ENABLE_STATS
while steering_load.c drives 64 connections in flight, a new connection per request, at 2
workers; ns per run from each program's run_time_ns / run_cnt).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import steering_bench as sb  # noqa: E402  (a sibling script, not a package module)

CLIENT_SRC = ROOT / "bench" / "load" / "hold_client.c"
HOLDER = ROOT / "bench" / "workers" / "holder.py"
PER_CLIENT = 15000


def raise_nofile() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def point(config: str, count: int, seconds: float, client: str) -> dict[str, Any]:
    raise_nofile()
    sb.WORKER = HOLDER
    tmp = Path(tempfile.mkdtemp(prefix="ps-held-"))
    server = sb.Server(config, {"workers": 4, "slow": ""}, tmp)
    clients: list[subprocess.Popen[str]] = []
    try:
        left = count
        while left > 0:
            n = min(PER_CLIENT, left)
            left -= n
            clients.append(
                subprocess.Popen(
                    [client, "127.0.0.1", str(server.port), str(n)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        for proc in clients:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith("held"):
                raise RuntimeError(f"hold_client failed: {line!r}")
        time.sleep(3)  # the workers accept the last ones; one per-connection walk may run
        before, t0 = sb._cpu_seconds(server.supervisor or 0), time.monotonic()
        time.sleep(seconds)
        after, t1 = sb._cpu_seconds(server.supervisor or 0), time.monotonic()
        st = server.status() or {}
        shown = [s.get("connections") for s in st.get("slots", [])]
    finally:
        for proc in clients:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait()
        server.stop()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    return {
        "config": config,
        "held": count,
        "supervisor_cpu_pct": 100 * (after - before) / (t1 - t0),
        "connections_shown": shown,
    }


# ---- the programs' cost ------------------------------------------------------------------------

BPF_PROG_GET_NEXT_ID, BPF_PROG_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD = 11, 13, 15
BPF_ENABLE_STATS = 32
_INFO_NAME, _INFO_RUN_TIME, _INFO_RUN_CNT, _INFO_SIZE = 64, 192, 200, 256


def _bpf(cmd: int, attr: bytes) -> tuple[int, bytes]:
    """bpf(2) on a copy of ``attr``; (result or -errno, the attr as the kernel left it)."""
    from portshard.steering import ebpf

    nr, fn = ebpf._syscall()
    buf = ctypes.create_string_buffer(attr, len(attr))
    ret = int(fn(nr, cmd, ctypes.addressof(buf), len(attr)))
    return (ret if ret >= 0 else -ctypes.get_errno()), buf.raw


def owned_prog_ids(pid: int) -> set[int]:
    """The ids of the BPF programs a process holds (a program fd or a link's), from fdinfo:
    BPF_ENABLE_STATS counts every program of the host, other sessions' portshards too."""
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("prog_id:"):
                        ids.add(int(line.split()[1]))
        except OSError:
            continue
    return ids


def prog_stats(names: tuple[bytes, ...], ids: set[int]) -> dict[str, tuple[int, int]]:
    """name -> (run_time_ns, run_cnt), summed over the loaded programs of these names and ids."""
    out: dict[str, tuple[int, int]] = {}
    prog_id = 0
    while True:
        ret, raw = _bpf(BPF_PROG_GET_NEXT_ID, struct.pack("=II", prog_id, 0))
        if ret < 0:
            return out  # ENOENT: no more
        prog_id = struct.unpack_from("=II", raw)[1]
        if prog_id not in ids:
            continue
        fd, _ = _bpf(BPF_PROG_GET_FD_BY_ID, struct.pack("=I", prog_id))
        if fd < 0:
            continue
        try:
            info = ctypes.create_string_buffer(_INFO_SIZE)
            _bpf(
                BPF_OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", fd, _INFO_SIZE, ctypes.addressof(info))
            )
            name = info.raw[_INFO_NAME : _INFO_NAME + 16].rstrip(b"\0")
            if name in names:
                run_time, run_cnt = struct.unpack_from("=QQ", info.raw, _INFO_RUN_TIME)
                t, c = out.get(name.decode(), (0, 0))
                out[name.decode()] = (t + run_time, c + run_cnt)
        finally:
            os.close(fd)


def _counted(seconds: float, load: str, *, beside: bool) -> tuple[int, dict[str, Any]]:
    """Our programs' (runs, ns) over a load of 64 in flight: to our supervisor's 2 workers, or
    (``beside``) to a plain reuseport server next to it. Returns (connections, per program)."""
    stats_fd, _ = _bpf(BPF_ENABLE_STATS, struct.pack("=I", 0))  # BPF_STATS_RUN_TIME
    if stats_fd < 0:
        raise RuntimeError(f"BPF_ENABLE_STATS: {os.strerror(-stats_fd)}")
    tmp = Path(tempfile.mkdtemp(prefix="ps-cost-"))
    try:
        server = sb.Server("ebpf", {"workers": 2, "slow": ""}, tmp)
        plain = sb.Server("plain", {"workers": 2, "slow": ""}, tmp) if beside else None
        try:
            names = (b"portshard_steer", b"portshard_held")
            assert server.supervisor is not None
            ids = owned_prog_ids(server.supervisor)
            before = prog_stats(names, ids)
            out = tmp / "records.bin"
            port = (plain or server).port
            subprocess.run([load, "127.0.0.1", str(port), "64", str(seconds), str(out)], check=True)
            after = prog_stats(names, ids)
            requests = out.stat().st_size // sb.RECORD.size
        finally:
            if plain is not None:
                plain.stop()
            server.stop()
    finally:
        os.close(stats_fd)  # stats stop with the last fd
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    counted = {}
    for name in (n.decode() for n in names):
        t = after.get(name, (0, 0))[0] - before.get(name, (0, 0))[0]
        c = after.get(name, (0, 0))[1] - before.get(name, (0, 0))[1]
        counted[name] = (c, t)
    return requests, counted


def prog_cost(seconds: float, load: str) -> dict[str, Any]:
    """ns per run and per connection of each program, 64 in flight over 2 workers."""
    requests, counted = _counted(seconds, load, beside=False)
    cost: dict[str, Any] = {"connections": requests}
    for name, (c, t) in counted.items():
        cost[name] = {
            "runs": c,
            "ns_per_run": t / c if c else None,
            "ns_per_connection": t / requests if requests else None,
            "runs_per_connection": c / requests if requests else None,
        }
    return cost


def tax(seconds: float, load: str) -> dict[str, Any]:
    """What an idle eBPF-steered supervisor costs connections that are not its own: its
    programs' runs and time per connection of a plain reuseport server beside it (2 workers,
    no portshard), 64 in flight."""
    requests, counted = _counted(seconds, load, beside=True)
    cost: dict[str, Any] = {"connections": requests}
    for name, (c, t) in counted.items():
        cost[name] = {"runs_per_connection": c / requests, "ns_per_connection": t / requests}
    return cost


def isolated(inner: list[str], src: Path = ROOT / "src") -> dict[str, Any]:
    cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    cmd += [sys.executable, str(Path(__file__).resolve()), *inner]
    env = dict(os.environ, PYTHONPATH=f"{src}:{ROOT}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"{inner} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="0,1000,10000,50000")
    parser.add_argument("--configs", default="ebpf,cbpf,off")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--prog-cost", action="store_true")
    parser.add_argument("--cost-only", action="store_true", help="--prog-cost, no held points")
    parser.add_argument(
        "--src",
        action="append",
        metavar="NAME=DIR",
        help="--prog-cost: also another portshard's src/ directory, interleaved (A/B)",
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "held_cpu.json"))
    parser.add_argument("--point", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--cost", help=argparse.SUPPRESS)
    parser.add_argument(
        "--tax",
        action="store_true",
        help="--cost-only: what an idle supervisor's programs cost another server's connections",
    )
    parser.add_argument("--tax-point", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        config, count, client = args.point
        print(json.dumps(point(config, int(count), args.seconds, client)))
        return
    if args.cost:
        print(json.dumps(prog_cost(args.seconds, args.cost)))
        return
    if args.tax_point:
        print(json.dumps(tax(args.seconds, args.tax_point)))
        return
    if os.geteuid() != 0:
        sys.exit("held_cpu: needs root (network namespaces, eBPF)")
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ps-held-") as tmp:
        client = str(Path(tmp) / "hold_client")
        subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", client, str(CLIENT_SRC)])
        cost: list[dict[str, Any]] = []
        if args.prog_cost or args.cost_only:
            load = sb.build_load(Path(tmp))
            srcs = [("this", ROOT / "src")]
            srcs += [(n, Path(d)) for n, _, d in (x.partition("=") for x in args.src or [])]
            for rnd in range(args.rounds):
                for name, src in srcs[rnd % len(srcs) :] + srcs[: rnd % len(srcs)]:
                    what = "--tax-point" if args.tax else "--cost"
                    c = isolated([what, load, "--seconds", "4"], src)
                    with open("/proc/loadavg") as f:
                        c.update(src=name, round=rnd, load_average=" ".join(f.read().split()[:3]))
                    cost.append(c)
                    print("program cost:", json.dumps(c), flush=True)
        configs = args.configs.split(",")
        for rnd in range(0 if args.cost_only else args.rounds):
            for count in args.counts.split(","):
                k = rnd % len(configs)
                for config in configs[k:] + configs[:k]:
                    r = isolated(["--point", config, count, client, "--seconds", str(args.seconds)])
                    with open("/proc/loadavg") as f:
                        r.update(round=rnd, load_average=" ".join(f.read().split()[:3]))
                    results.append(r)
                    print(
                        f"round {rnd} {config:5} held {int(count):6}: supervisor "
                        f"{r['supervisor_cpu_pct']:.2f}% of a core, shown {r['connections_shown']}"
                        f" (load {r['load_average']})",
                        flush=True,
                    )
    summary = {}
    for config in args.configs.split(","):
        for count in args.counts.split(","):
            values = [
                r["supervisor_cpu_pct"]
                for r in results
                if r["config"] == config and r["held"] == int(count)
            ]
            if values:
                summary[f"{config} {count}"] = {
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                }
                print(
                    f"{config:5} {int(count):6} held: {statistics.median(values):.2f}% "
                    f"[{min(values):.2f}-{max(values):.2f}]"
                )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"results": results, "summary": summary, "prog_cost": cost}, indent=1)
    )


if __name__ == "__main__":
    main()
