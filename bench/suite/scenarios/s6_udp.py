"""Scenario 6: UDP, datagrams/s over 1 or N sockets, and flows moved by a reload."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.procs import PYTHON, BenchError, spawn, stop
from bench.suite import servers
from bench.suite.harness import Config, Measurement, Metric, Scenario, ScenarioResult, Settings
from bench.suite.machine import CpuSample, cpu_use
from bench.suite.reload_run import udp_flows
from bench.suite.scenarios.common import Env, cpus
from bench.suite.stats import jain, times, value

CLIENTS = 2  # load processes: one Python process cannot keep even one Python server busy
FLOWS, WINDOW = 64, 4
WORK_US = 20  # CPU per datagram in the server, so that the server, not only the client, works
PROBE_FLOWS = 200

ABOUT = """\
**Throughput**: a UDP worker (`bench/workers/udpd.py`, a blocking `recvfrom`/`sendto` loop
that spends {work} µs of CPU on each datagram, standing in for real handling: a bare echo in
Python costs less than the Python client that feeds it, and then only the client is measured)
on one socket (one process), on {n} SO_REUSEPORT sockets ({n} processes, each binding its
own), and under `portshard run -w {n} --listen udp://...`. The load: {k} Python asyncio client
processes (`bench/load/udpload.py`), {f} flows each (one source port per flow: reuseport spreads
UDP by flow hash), {w} datagrams in flight per flow. Datagrams/s = replies received.
**Flows across a reload**: {p} flows, each probed again and again during a rolling reload of
{n} workers; a flow moved if a different slot answered it at any point (for QUIC, even a
short visit to another worker breaks the connection). naive (new first): start the new copy,
then stop the old; naive (old first): stop, then start; portshard: `portshard reload --wait`.
"""

METRICS = [
    Metric("dgrams", "datagrams/s", "", "higher", 0, ratio=True),
    Metric("jain", "Jain", "", "higher", 3),
    Metric("cpu_client", "client CPU", "", "", 2),
    Metric("cpu_server", "server CPU", "", "", 2),
    Metric("moved", "flows moved/reload", "", "lower", 1),
    Metric("unanswered", "probes unanswered/reload", "", "lower", 1),
]


def throughput(settings: Settings, kind: str, workers: int, flags: list[str]) -> Measurement:
    args = ["--work-us", str(WORK_US)]
    with servers.udp(kind, workers, flags, args, settings.logs / "servers.log") as srv:
        a = CpuSample.take(srv.roots)
        procs = [
            spawn(
                [
                    PYTHON,
                    "-m",
                    "bench.load.udpload",
                    "--port",
                    str(srv.port),
                    "--flows",
                    str(FLOWS),
                    "--window",
                    str(WINDOW),
                    "--seconds",
                    str(settings.seconds),
                ],
                cwd=str(Path(__file__).resolve().parents[3]),
            )
            for _ in range(CLIENTS)
        ]
        outs = []
        try:
            for p in procs:
                out, _ = p.communicate(timeout=settings.seconds + 30)
                if p.returncode:
                    raise BenchError(f"udpload exited {p.returncode}")
                outs.append(json.loads(out.decode().strip().splitlines()[-1]))
        finally:
            for p in procs:
                stop(p)
        b = CpuSample.take(srv.roots)
    cpu = cpu_use(a, b)
    replies = sum(o["replies"] for o in outs)
    seconds = statistics.fmean(o["seconds"] for o in outs)
    slots: dict[str, int] = {}
    for o in outs:
        for who, count in o["by_server"].items():
            slot = who.split()[0]
            slots[slot] = slots.get(slot, 0) + count
    counts = [slots.get(str(i), 0) for i in range(len(srv.workers))]
    metrics = {
        "dgrams": replies / seconds if seconds else 0.0,
        "jain": jain(counts),
        "cpu_client": sum(o["cpu"] for o in outs),
        "cpu_server": sum(cpu.roots.values()),
        "steal": cpu.steal,
        "foreign": cpu.foreign,
    }
    detail = {"clients": outs, "cpu": cpu.as_dict(), "slots": counts, **srv.info}
    return Measurement(metrics, cpu, detail)


def flows(settings: Settings, kind: str, old_first: bool) -> Measurement:
    a = CpuSample.take()
    out = udp_flows(
        kind,
        workers=settings.workers,
        reloads=settings.reloads,
        flows=PROBE_FLOWS,
        log=settings.logs / "servers.log",
        old_first=old_first,
    )
    cpu = cpu_use(a, CpuSample.take())
    metrics = {
        "moved": statistics.median(out["moved"]),
        "unanswered": statistics.median(out["unanswered"]),
    }
    return Measurement(metrics, cpu, out)


def scenario(settings: Settings, env: Env) -> Scenario:
    n = settings.workers
    tp_s = settings.seconds + 1.5
    fl_s = 1.0 * n * settings.reloads + 2.0

    def tp(key: str, label: str, kind: str, startup: float = 0.0) -> Config:
        return Config(
            f"tp/{key}",
            label,
            lambda s: throughput(s, kind, n, []),
            group="throughput",
            baseline="tp/single",
            expect_s=tp_s + startup,
        )

    def fl(key: str, label: str, kind: str, old_first: bool, startup: float = 0.0) -> Config:
        return Config(
            f"fl/{key}",
            label,
            lambda s: flows(s, kind, old_first),
            group="flows across a reload",
            expect_s=fl_s + startup,
            noisy_retry=False,
        )

    configs = [
        tp("single", "1 socket, 1 process", "single"),
        tp("reuseport", f"{n} reuseport sockets, {n} processes", "reuseport"),
        tp("portshard", f"portshard run -w {n}", "portshard", 0.6),
        fl("naive", "naive (new first)", "naive", False),
    ]
    if not settings.quick:
        configs.append(fl("naive-old", "naive (old first)", "naive", True))
    configs.append(fl("portshard", "portshard reload --wait", "portshard", False, 1.0))
    return Scenario(
        "s6_udp",
        "6. UDP",
        ABOUT.format(n=n, k=CLIENTS, f=FLOWS, w=WINDOW, p=PROBE_FLOWS, work=WORK_US),
        configs,
        METRICS,
        settings.rounds,
        notes=notes,
        plot=plot,
        headline=headline,
    )


def notes(res: ScenarioResult) -> list[str]:
    out = []
    rp = res.ratio("tp/reuseport", "dgrams")
    client = res.spread("tp/reuseport", "cpu_client")
    server = res.spread("tp/reuseport", "cpu_server")
    if rp.n:
        out.append(
            f"{res.scenario.configs[1].label}: {times(rp)} the datagrams/s of one socket. "
            f"The Python clients used {client.median:.2f} CPU and the servers "
            f"{server.median:.2f}, of {cpus()}: the clients take much of the machine, so this "
            f"ratio is a floor for what N sockets give on a machine whose clients are elsewhere."
        )
    for key in ("fl/naive", "fl/naive-old", "fl/portshard"):
        sp = res.spread(key, "moved")
        if sp.n:
            label = next(c.label for c in res.scenario.configs if c.key == key)
            out.append(
                f"{label}: {sp.median:.0f} of {PROBE_FLOWS} flows moved per reload "
                f"(range {sp.lo:.0f}-{sp.hi:.0f})."
            )
    return out


def headline(res: ScenarioResult) -> list[tuple[str, str]]:
    rows = []
    r = res.ratio("tp/reuseport", "dgrams")
    if r.n:
        rows.append(("N reuseport sockets vs 1, datagrams/s (clients on the same CPUs)", times(r)))
    labels, figures = [], []
    for cfg in res.scenario.configs:
        sp = res.spread(cfg.key, "moved")
        if cfg.key.startswith("fl/") and sp.n:
            labels.append(cfg.label)
            figures.append(value(sp))
    if labels:
        rows.append(
            (
                f"UDP flows (of {PROBE_FLOWS}) moved per reload: {' / '.join(labels)}",
                " / ".join(figures),
            )
        )
    return rows


def plot(res: ScenarioResult, out: Path) -> list[Path]:
    from bench.suite.plots import bars  # matplotlib only when plotting

    return [
        bars(
            res,
            out / "s6_udp.png",
            [("dgrams", "datagrams/s"), ("moved", "flows moved per reload")],
        )
    ]
