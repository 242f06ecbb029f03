"""A bounded fault campaign: kill -9 at the worst moments, as an operator's machine would.

    .venv/bin/python bench/experiments/fault_campaign.py [--runs 1] [--budget 600]
        [--scenario reload,...] [--proto tcp,tcp-ka,udp,gunicorn] [--mech cgroup,subreaper]
        [--seed 1] [--out DIR]

Each run: ``portshard run -w 4 --listen PROTO://127.0.0.1:0`` under a steady load (TCP:
bench/load/loadgen.py's Load, 8-32 in flight, connection per request (``tcp``: fdworker,
WORK_MS=1; ``gunicorn``: the recipe's sync worker) or keep-alive (``tcp-ka``: the bench's
epoll httpd, --drain signal); UDP: 100 flows, each pinned to a slot), then one fault at a
uniform 0-1.5 s into an operation:

  reload, scaleup (4 -> 6), scaledown (4 -> 2), upgrade, drain (--settle 3): the supervisor
  SIGKILLed that long after asking; boot: that long after `portshard run` started; warden: the
  warden SIGKILLed that long into a reload, the supervisor 1.5 s later; worker: a worker
  frozen, its connections counted, SIGKILLed that long into a reload (no supervisor kill);
  supworker: the supervisor and a worker together, that long into a reload; warden2: as
  warden, and its replacement SIGKILLed as soon as it shows (a warden under a second old).

Then the same command again (it adopts), a coherent status awaited (every slot one ready
worker, no worker process outside status), `reload --wait`, 100 more requests, a check,
SIGTERM, and the leftovers: processes (tagged by an environment variable every process
inherits), cgroups of the name, the control socket, the port still answering. A failed
request counts against the run unless a killed worker held it (its connections counted while
it was frozen). Every loop is bounded in count and time; processes, cgroups and the run's
/tmp directory are removed at the end of each run, whatever happened. Results (JSON per run,
the logs of runs with a finding) go to --out.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from bench.load.loadgen import Load  # noqa: E402
from portshard.control.client import request  # noqa: E402
from portshard.errors import PortshardError  # noqa: E402
from portshard.linux import sockdiag  # noqa: E402

PY = sys.executable
FDWORKER = [PY, str(ROOT / "tests" / "workers" / "fdworker.py")]
HTTPD = [PY, str(ROOT / "bench" / "workers" / "httpd.py"), "--mode", "reuseport", "--work-ms", "1"]
APPS = ROOT / "tests" / "workers" / "recipes"
GUNICORN = [str(Path(PY).parent / "gunicorn"), "-c", str(APPS / "gunicorn_conf.py")]
GUNICORN += ["--no-control-socket", "--chdir", str(APPS), "-w", "1", "wsgi_app:app"]
SCENARIOS = ["reload", "scaleup", "scaledown", "upgrade", "drain", "boot", "warden", "worker"]
SCENARIOS += ["supworker", "warden2"]
PROTOS = ["tcp", "tcp-off", "tcp-ka", "udp", "gunicorn"]
MECHS = ["cgroup", "subreaper"]
CGROUP_BASE = Path("/run/portshard/cgroup2/portshard")
TAG_ENV = "FC_TAG"
WORKERS = 4
GAP = [0.3]  # s between the kill and the rerun (--gap)


def now() -> float:
    return time.monotonic()


def wait_until(cond: Any, timeout: float, what: str, pause: float = 0.05) -> Any:
    deadline = now() + timeout
    while True:
        v = cond()
        if v:
            return v
        if now() > deadline:
            raise Finding(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(pause)


class Finding(Exception):
    """Something the campaign checks did not hold."""


# ---- processes by tag ------------------------------------------------------------------------


def tagged(tag: str) -> dict[int, str]:
    """pid -> role (supervisor, warden, worker) of every live process carrying our tag."""
    found: dict[int, str] = {}
    needle = f"{TAG_ENV}={tag}".encode()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ")
            with open(f"/proc/{name}/stat") as f:
                st = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if needle not in env.split(b"\0") or st[0] == "Z":
            continue
        if b"portshard.supervisor.warden" in cmd:
            found[int(name)] = "warden"
        elif b"-m portshard run" in cmd or b"portshard run" in cmd:
            found[int(name)] = "supervisor"
        else:
            found[int(name)] = "worker"
    return found


def ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[1])
    except OSError:
        return 0


def worker_roots(tag: str) -> set[int]:
    procs = tagged(tag)
    workers = {p for p, r in procs.items() if r == "worker"}
    return {p for p in workers if ppid(p) not in workers}


def tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo and len(out) < 64:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(x) for x in f.read().split()]
    return out


def held_connections(pids: list[int], port: int) -> int:
    """TCP connections on ``port`` (not the listener) that these processes hold: sock_diag,
    filtered by state in the kernel (reading /proc/net/tcp took 7 s once with ~100k
    TIME_WAIT rows, the worker frozen meanwhile: its queued requests timed out)."""
    return sum(sockdiag.connections_by_pid(pids, ports={port}).values())


def kill_worker(pid: int, port: int, proto: str) -> int:
    """Freeze the worker's tree, count the connections it holds, SIGKILL it: how many
    requests this kill may fail."""
    procs = tree(pid)
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGSTOP)
    held = held_connections(procs, port) if proto != "udp" else 0
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    return held


# ---- one run --------------------------------------------------------------------------------


class Run:
    def __init__(self, scenario: str, proto: str, mech: str, rng: random.Random, out: Path):
        self.scenario, self.proto, self.mech, self.rng = scenario, proto, mech, rng
        self.tag = uuid.uuid4().hex[:12]
        self.tmp = Path(tempfile.mkdtemp(prefix="fc-", dir="/tmp"))
        self.control = str(self.tmp / "c.sock")
        self.name = f"fc-{self.tag}"
        self.out = out
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.events: list[tuple[float, str]] = []
        self.t0 = now()
        self.delay = round(rng.uniform(0, 1.5), 3)
        self.concurrency = rng.randint(8, 32)
        self.allowed = 0  # failures a killed worker may cause
        self.findings: list[str] = []
        self.port = 0
        self.load: Load | None = None
        self.fds: list[int] = []

    def ev(self, what: str) -> None:
        self.events.append((round(now() - self.t0, 3), what))

    # -- the supervisor --
    def argv(self, port: int) -> list[str]:
        scheme = "udp" if self.proto == "udp" else "tcp"
        args = [PY, "-m", "portshard", "run", "--control", self.control, "--name", self.name]
        args += ["-w", str(WORKERS), "--listen", f"{scheme}://127.0.0.1:{port}"]
        if self.proto == "tcp-off":  # no steering: a reload holds SYNs off a slot
            args += ["--steering", "off", "--", *FDWORKER]
        elif self.proto == "tcp-ka":
            args += ["--drain", "signal", "--grace", "5", "--", *HTTPD]
        elif self.proto == "gunicorn":
            args += ["--ready", "notify", "--drain", "signal", "--", *GUNICORN]
        else:
            args += ["--", *FDWORKER]
        return args

    def env(self) -> dict[str, str]:
        env = {**os.environ, TAG_ENV: self.tag, "WORK_MS": "1"}
        if self.mech == "subreaper":
            env["PORTSHARD_CGROUP"] = "off"
        return env

    def start(self, port: int) -> subprocess.Popen[bytes]:
        log = self.tmp / f"sup{len(self.procs)}.log"
        self.logs.append(log)
        with open(log, "wb") as f:
            p = subprocess.Popen(
                self.argv(port),
                stdout=f,
                stderr=subprocess.STDOUT,
                env=self.env(),
                start_new_session=True,
                cwd=self.tmp,
            )
        self.procs.append(p)
        self.ev(f"start sup{len(self.procs) - 1} pid {p.pid}")
        return p

    def status(self, timeout: float = 20) -> dict[str, Any]:
        return request(self.control, "status", timeout=timeout)

    def wait_ready(self, p: subprocess.Popen[bytes], timeout: float = 60) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            if p.poll() is not None:
                raise Finding(f"supervisor pid {p.pid} exited {p.returncode} before ready")
            try:
                st = self.status()
            except PortshardError:
                return None
            return st if st.get("ready") else None

        st: dict[str, Any] = wait_until(ready, timeout, "the supervisor ready", 0.1)
        return st

    def kill_sup(self, p: subprocess.Popen[bytes]) -> None:
        p.kill()
        p.wait(10)
        self.ev(f"SIGKILL supervisor {p.pid}")

    def wardens(self) -> list[int]:
        return [p for p, r in tagged(self.tag).items() if r == "warden"]

    # -- checks --
    def coherent(self) -> str | None:
        """None if every slot has one ready worker and no worker runs outside status."""
        try:
            st = self.status()
        except PortshardError as exc:
            return f"status: {exc}"
        bad = [
            (s["slot"], [(w["pid"], w["state"]) for w in s["workers"]])
            for s in st["slots"]
            if len(s["workers"]) != 1 or s["workers"][0]["state"] != "ready"
        ]
        if bad:
            return f"slots not one ready worker: {bad}"
        shown = {w["pid"] for s in st["slots"] for w in s["workers"]}
        roots = worker_roots(self.tag)
        if roots != shown:
            return f"worker processes {sorted(roots)} != status {sorted(shown)}"
        return None

    def await_coherent(self, timeout: float = 40) -> None:
        last: list[str | None] = [None]

        def ok() -> bool:
            last[0] = self.coherent()
            return last[0] is None

        try:
            wait_until(ok, timeout, "a coherent status", 0.2)
        except Finding:
            raise Finding(f"incoherent after {timeout:g}s: {last[0]}") from None

    def served_pids(self, since: float) -> set[int]:
        assert self.load is not None
        pids = set()
        for r in list(self.load.results):
            if r.ok and r.start >= since and r.body:
                words = r.body.split()
                pid = words[0] if self.proto == "tcp-ka" else words[1]
                if pid.isdigit():
                    pids.add(int(pid))
        return pids

    # -- the scenario --
    def fault(self, first: subprocess.Popen[bytes]) -> None:
        s, d = self.scenario, self.delay
        if s in ("reload", "warden", "warden2", "worker", "supworker"):
            request(self.control, "reload", timeout=30, wait=False)
            self.ev("reload asked")
        elif s == "scaleup":
            request(self.control, "scale", timeout=30, workers=WORKERS + 2, wait=False)
            self.ev("scale up asked")
        elif s == "scaledown":
            request(self.control, "scale", timeout=30, workers=WORKERS - 2, wait=False)
            self.ev("scale down asked")
        elif s == "drain":
            request(self.control, "drain", timeout=30, wait=False, settle=3.0)
            self.ev("drain asked")
        elif s == "upgrade":

            def up() -> None:
                with contextlib.suppress(PortshardError, OSError):
                    request(self.control, "upgrade", timeout=30)

            threading.Thread(target=up, daemon=True).start()
            self.ev("upgrade asked")
        time.sleep(d)
        if s in ("warden", "warden2"):
            ws = self.wardens()
            for w in ws:
                os.kill(w, signal.SIGKILL)
            self.ev(f"SIGKILL warden {ws}")
            if s == "warden2":  # its replacement, as soon as it shows
                again = wait_until(
                    lambda: [p for p in self.wardens() if p not in ws], 5, "another warden", 0.01
                )
                for w in again:
                    os.kill(w, signal.SIGKILL)
                self.ev(f"SIGKILL warden {again}")
            time.sleep(1.5)
            self.kill_sup(first)
        elif s == "worker":
            self.kill_a_worker()
        elif s == "supworker":  # the worker first: once its supervisor is gone, the
            # warden thaws every worker (SIGCONT), which would race the freeze-and-count
            first.send_signal(signal.SIGSTOP)
            self.kill_a_worker()
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            self.ev(f"SIGKILL supervisor {first.pid}")
        else:
            self.kill_sup(first)

    def kill_a_worker(self) -> None:
        roots = sorted(worker_roots(self.tag))
        if not roots:
            self.ev("no worker to kill")
            return
        pid = self.rng.choice(roots)
        held = kill_worker(pid, self.port, self.proto)
        self.allowed += held
        self.ev(f"SIGKILL worker {pid} holding {held}")

    def boot(self) -> subprocess.Popen[bytes]:
        """The boot scenario's first supervisor, killed that long after it started. Its port:
        the kernel picks one (bind 0) for the run, given to both supervisors."""
        kind = socket.SOCK_DGRAM if self.proto == "udp" else socket.SOCK_STREAM
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        first = self.start(self.port)
        time.sleep(self.delay)
        self.kill_sup(first)
        return first

    def go(self) -> dict[str, Any]:
        try:
            self._go()
        except Finding as exc:
            self.findings.append(str(exc))
        except Exception as exc:  # the campaign's own trouble is a finding too, with its type
            self.findings.append(f"campaign: {exc!r}")
        finally:
            self.cleanup()
        return self.result()

    def _go(self) -> None:
        if self.scenario == "boot":
            self.boot()
            if self.proto == "udp":
                self.udp_after_boot()
                return
            self.load = Load("127.0.0.1", self.port, self.concurrency, max_seconds=90,
                             keepalive=self.proto == "tcp-ka").start()  # fmt: skip
            self.ev(f"load {self.concurrency}")
            self.second_half()
            return
        first = self.start(0)
        st = self.wait_ready(first)
        self.port = int(st["listen"][0]["port"])
        self.fds.append(len(os.listdir(f"/proc/{first.pid}/fd")))
        if self.proto == "udp":
            self.udp_run(first)
            return
        self.load = Load("127.0.0.1", self.port, self.concurrency, max_seconds=90,
                         keepalive=self.proto == "tcp-ka").start()  # fmt: skip
        self.ev(f"load {self.concurrency}")
        self.load.wait_for(200, 30)
        self.fault(first)
        self.second_half()

    def second_half(self) -> None:
        """The rerun, its checks, its reload, its stop; for TCP."""
        assert self.load is not None
        if self.scenario == "worker":  # the supervisor lives: no rerun
            second = self.procs[0]
        else:
            time.sleep(GAP[0])
            second = self.start(self.port)
        if self.scenario == "drain":
            self.drain_end(second)
            return
        began = now()
        self.wait_ready(second)
        self.ev("sup ready")
        if now() - began > 15:
            self.findings.append(f"the adopter took {now() - began:.1f}s to be ready")
        self.await_coherent()
        self.ev("coherent")
        request(self.control, "reload", timeout=120, wait=True)
        self.ev("reloaded")
        mark = now()
        self.load.wait_for(self.load.count() + 200, 30)
        self.await_coherent(10)
        served = self.served_pids(mark + 0.2)
        shown = {w["pid"] for s in self.status()["slots"] for w in s["workers"]}
        if self.proto == "gunicorn":  # gunicorn's worker is the master's child
            shown |= {c for p in shown for c in tree(p)}
        if not served <= shown:
            self.findings.append(f"served by pids not in status: {sorted(served - shown)}")
        self.fds.append(len(os.listdir(f"/proc/{second.pid}/fd")))
        self.load.stop()
        self.ev("load stopped")
        self.stop(second)

    def drain_end(self, second: subprocess.Popen[bytes]) -> None:
        """The adopter drains on and stops by itself."""
        assert self.load is not None
        try:
            code = second.wait(40)
        except subprocess.TimeoutExpired:
            raise Finding("the adopter of a drain did not stop within 40 s") from None
        self.ev(f"adopter exited {code}")
        self.load.stop()
        self.check_gone()

    def stop(self, p: subprocess.Popen[bytes]) -> None:
        p.send_signal(signal.SIGTERM)
        try:
            code = p.wait(40)
        except subprocess.TimeoutExpired:
            raise Finding("the supervisor did not stop within 40 s of SIGTERM") from None
        self.ev(f"stopped, exit {code}")
        if code != 0:
            self.findings.append(f"stop exit status {code}")
        self.check_gone()

    def check_gone(self) -> None:
        with contextlib.suppress(Finding):
            wait_until(lambda: not tagged(self.tag), 10, "every process gone")
        left = tagged(self.tag)
        if left:
            self.findings.append(f"left after the stop: {left}")
        homes = list(CGROUP_BASE.glob(f"{self.name}.*")) if CGROUP_BASE.exists() else []
        if homes:
            self.findings.append(f"cgroups left: {[h.name for h in homes]}")
        if os.path.exists(self.control):
            self.findings.append("control socket left")
        if self.proto != "udp":
            with socket.socket() as c:
                c.settimeout(2)
                with contextlib.suppress(OSError):
                    c.connect(("127.0.0.1", self.port))
                    self.findings.append("the port still takes connections after the stop")

    # -- UDP --
    def udp_slots(self, clients: list[socket.socket]) -> list[str]:
        """The slot that answers each flow now ("lost": no answer within 2 s). Late answers
        to an earlier round (a datagram a slot with no worker kept queued) are read away
        first."""
        for c in clients:
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:
                    c.recv(100)
            c.setblocking(True)
        for c in clients:
            c.sendto(b"hi", ("127.0.0.1", self.port))
        seen = []
        deadline = now() + 2.0
        for c in clients:
            c.settimeout(max(0.01, deadline - now()))
            try:
                data, _ = c.recvfrom(100)
                seen.append(data.decode().split()[0])
            except TimeoutError:
                seen.append("lost")
        return seen

    def udp_run(self, first: subprocess.Popen[bytes]) -> None:
        clients = []
        try:
            for _ in range(100):
                c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                c.bind(("127.0.0.1", 0))
                c.settimeout(5)
                clients.append(c)
            before = self.udp_slots(clients)
            self.fault(first)
            keep = WORKERS - 2 if self.scenario == "scaledown" else WORKERS
            checks = {"after the fault": self.udp_slots(clients)}
            if self.scenario == "worker":
                second = first
            else:
                time.sleep(GAP[0])
                second = self.start(self.port)
            if self.scenario == "drain":
                try:
                    second.wait(40)
                except subprocess.TimeoutExpired:
                    raise Finding("the adopter of a drain did not stop within 40 s") from None
                self.check_gone()
                self.udp_moved(before, checks, keep)
                return
            self.wait_ready(second)
            self.await_coherent()
            checks["adopted"] = self.udp_slots(clients)
            request(self.control, "reload", timeout=120, wait=True)
            checks["reloaded"] = self.udp_slots(clients)
            self.await_coherent(10)
            self.fds.append(len(os.listdir(f"/proc/{second.pid}/fd")))
            self.udp_moved(before, checks, keep)
            self.stop(second)
        finally:
            for c in clients:
                c.close()

    def udp_moved(self, before: list[str], checks: dict[str, list[str]], keep: int) -> None:
        """A flow of a slot that stays must stay (unless a scale up gave it to a new slot),
        and be answered, except, right after the fault, one of the killed worker's slot (its
        datagrams wait in the slot's socket until a new worker reads them)."""
        for when, seen in checks.items():
            pairs = collections.Counter(
                (a, b)
                for a, b in zip(before, seen, strict=True)
                if a != b and a.isdigit() and int(a) < keep
                and not (b.isdigit() and int(b) >= WORKERS)
            )  # fmt: skip
            moved = sum(n for (_, b), n in pairs.items() if b != "lost")
            lost = sum(n for (_, b), n in pairs.items() if b == "lost")
            self.ev(f"udp {when}: {moved} moved, {lost} lost {dict(pairs)}")
            if moved:
                self.findings.append(f"udp {when}: {moved} flows moved")
            killed_slot = self.scenario in ("worker", "supworker") and when == "after the fault"
            if lost and not (killed_slot and len({a for a, _ in pairs}) == 1):
                self.findings.append(f"udp {when}: {lost} flows unanswered")

    def udp_after_boot(self) -> None:
        time.sleep(0.3)
        second = self.start(self.port)
        self.wait_ready(second)
        self.await_coherent()
        request(self.control, "reload", timeout=120, wait=True)
        self.await_coherent(10)
        self.stop(second)

    # -- the end --
    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        if self.load is not None:
            self.load.stop()
        for _ in range(3):
            for pid in tagged(self.tag):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        if CGROUP_BASE.exists():
            for home in CGROUP_BASE.glob(f"{self.name}.*"):
                for g in sorted(home.rglob("*"), key=lambda x: -len(str(x))):
                    if g.is_dir():
                        with contextlib.suppress(OSError):
                            (g / "cgroup.kill").write_text("1")
                        with contextlib.suppress(OSError):
                            g.rmdir()
                with contextlib.suppress(OSError):
                    home.rmdir()

    def result(self) -> dict[str, Any]:
        failed: list[dict[str, Any]] = []
        total = 0
        if self.load is not None:
            total = self.load.count()
            failed = [{"kind": r.kind, "at": round(r.start - self.t0, 3)} for r in self.load.failed]
        if self.scenario == "drain":  # refused once the adopter stopped listening: expected
            end = max((t for t, e in self.events if e.startswith("adopter exited")), default=1e9)
            failed = [f for f in failed if not (f["kind"] == "refused" and f["at"] >= end - 3.5)]
        if self.scenario == "boot":  # refused before anything listened: expected (a
            # client's start is when its coroutine began, not its SYN: 0.1 s of slack)
            first_ok = min(
                (r.start - self.t0 for r in (self.load.results if self.load else []) if r.ok),
                default=1e9,
            )
            # and any request begun before then: it waited for a cold boot (a supervisor
            # killed before it logged a line: Python's start), not for the kill
            failed = [f for f in failed if not f["at"] < first_ok + 0.1]
        excess = max(0, len(failed) - self.allowed)
        logs = "".join(p.read_text(errors="replace") for p in self.logs if p.exists())
        bad_lines = [
            x
            for x in logs.splitlines()
            if "Traceback" in x or "internal error" in x or "CRITICAL" in x
        ]
        if bad_lines:
            self.findings.append(f"log: {bad_lines[:3]}")
        if excess:
            self.findings.append(f"{excess} failed requests beyond the killed worker's")
        res = {
            "scenario": self.scenario,
            "proto": self.proto,
            "mech": self.mech,
            "delay": self.delay,
            "concurrency": self.concurrency,
            "requests": total,
            "failed": len(failed),
            "allowed": self.allowed,
            "failed_kinds": sorted({f["kind"] for f in failed}),
            "failed_at": [f["at"] for f in failed][:20],
            "fds": self.fds,
            "findings": self.findings,
            "events": self.events,
            "seconds": round(now() - self.t0, 1),
        }
        if self.findings:
            self.out.mkdir(parents=True, exist_ok=True)
            stem = f"{self.scenario}-{self.proto}-{self.mech}-{self.tag}"
            (self.out / f"{stem}.log").write_text(logs)
            (self.out / f"{stem}.json").write_text(json.dumps(res, indent=1))
        shutil.rmtree(self.tmp, ignore_errors=True)
        return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--runs", type=int, default=1, help="runs per combination")
    p.add_argument("--budget", type=float, default=600, help="seconds for the whole campaign")
    p.add_argument("--scenario", default=",".join(SCENARIOS))
    p.add_argument("--proto", default="tcp,tcp-ka,udp")
    p.add_argument("--mech", default=",".join(MECHS))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("/work/notes/faults-results"))
    p.add_argument("--gap", type=float, default=0.3, help="s from the kill to the rerun")
    a = p.parse_args()
    GAP[0] = a.gap
    rng = random.Random(a.seed)
    combos = [
        (s, pr, m)
        for _ in range(a.runs)
        for s in a.scenario.split(",")
        for pr in a.proto.split(",")
        for m in a.mech.split(",")
    ]
    end = now() + a.budget
    results = []
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    for s, pr, m in combos:
        if now() > end:
            print("budget spent", flush=True)
            break
        r = Run(s, pr, m, rng, a.out).go()
        results.append(r)
        flag = "FINDING " + "; ".join(r["findings"]) if r["findings"] else "ok"
        print(
            f"{s:9} {pr:8} {m:9} d={r['delay']:.3f} c={r['concurrency']:2} "
            f"req={r['requests']:5} failed={r['failed']}/{r['allowed']} {r['seconds']}s {flag}",
            flush=True,
        )
    with open("/proc/loadavg") as f:
        load_after = f.read().split()[:3]
    a.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%H%M%S")
    (a.out / f"campaign-{stamp}.json").write_text(
        json.dumps({"load": [load_before, load_after], "runs": results}, indent=1)
    )
    print(f"load average before {load_before}, after {load_after}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
