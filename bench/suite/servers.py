"""Start and stop every server configuration the scenarios compare.

Each launcher is a context manager that yields a `Running` (port, worker pids, process roots)
once the server answers, and always stops everything it started. Servers listen on loopback:
the Python servers and `portshard run` on port 0; nginx and HAProxy cannot report a port they
picked, so they get one that `free_port` found free a moment earlier (retried if it was taken).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import (
    PYTHON,
    WORKERS,
    BenchError,
    children,
    free_port,
    read_line,
    spawn,
    stop,
    wait_http,
)
from portshard.control.client import request
from portshard.errors import ControlError

HOST = "127.0.0.1"
HTTPD = [PYTHON, str(WORKERS / "httpd.py")]
UDPD = [PYTHON, str(WORKERS / "udpd.py")]
PORTSHARD = [PYTHON, "-m", "portshard"]
BACKLOG = 1024  # every configuration listens with the same backlog
START_TIMEOUT = 30.0


@dataclass
class Running:
    port: int
    workers: list[int]  # worker pids, in slot order (slot 0 first)
    roots: tuple[int, ...]  # process trees whose CPU time is the server's
    control: str | None = None  # portshard's control socket
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    supervisor: int | None = None  # portshard run's pid (its own CPU is reported apart)
    info: dict[str, Any] = field(default_factory=dict)  # e.g. portshard's mode and steering


def _tmpdir() -> str:
    # Short: portshard's control socket path must fit in sun_path (108 bytes).
    return tempfile.mkdtemp(prefix="psb-", dir="/tmp")


# -- the Python worker, without portshard ----------------------------------------------------


@contextlib.contextmanager
def forked(mode: str, workers: int, args: list[str], log: Path) -> Iterator[Running]:
    """httpd.py in a mode where one parent binds one socket and forks the workers."""
    proc = spawn([*HTTPD, "--mode", mode, "--workers", str(workers), *args], log=log)
    try:
        _, port, *pids = read_line(proc, START_TIMEOUT, f"httpd --mode {mode}").split()
        wait_http(int(port), START_TIMEOUT, f"httpd --mode {mode}", proc)
        yield Running(int(port), [int(p) for p in pids], (proc.pid,), procs=[proc])
    finally:
        stop(proc)


@contextlib.contextmanager
def single(args: list[str], log: Path) -> Iterator[Running]:
    proc = spawn([*HTTPD, "--mode", "single", *args], log=log)
    try:
        _, port, pid = read_line(proc, START_TIMEOUT, "httpd --mode single").split()
        wait_http(int(port), START_TIMEOUT, "httpd --mode single", proc)
        yield Running(int(port), [int(pid)], (proc.pid,), procs=[proc])
    finally:
        stop(proc)


class Group:
    """N copies of a worker, each binding its own SO_REUSEPORT socket (no supervisor): the
    naive deployment. `restart(slot)` is a naive rolling restart of one worker: start the
    new copy (its socket joins the group), wait until it listens, stop the old one (its socket
    leaves the group, and the kernel resets what was queued on it). With ``old_first``, the
    old one is stopped first (a plain restart of one instance)."""

    old_first = False

    def __init__(self, cmd: list[str], workers: int, log: Path, what: str) -> None:
        self.cmd, self.log, self.what = cmd, log, what
        self.port = 0
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            for slot in range(workers):
                self.procs.append(self._start(slot))
        except BaseException:
            self.close()
            raise

    def _start(self, slot: int) -> subprocess.Popen[bytes]:
        proc = spawn([*self.cmd, "--port", str(self.port), "--slot", str(slot)], log=self.log)
        _, port, _pid = read_line(proc, START_TIMEOUT, self.what).split()
        self.port = int(port)
        return proc

    def restart(self, slot: int, grace: float = 10.0) -> None:
        if self.old_first:
            stop(self.procs[slot], signal.SIGTERM, grace)
            self.procs[slot] = self._start(slot)
            return
        new = self._start(slot)
        old, self.procs[slot] = self.procs[slot], new
        stop(old, signal.SIGTERM, grace)

    def running(self) -> Running:
        pids = [p.pid for p in self.procs]
        return Running(self.port, pids, tuple(pids), procs=self.procs)

    def close(self) -> None:
        for proc in self.procs:
            stop(proc)


@contextlib.contextmanager
def reuseport_group(workers: int, args: list[str], log: Path) -> Iterator[Running]:
    group = Group([*HTTPD, "--mode", "reuseport", *args], workers, log, "httpd --mode reuseport")
    try:
        proc = group.procs[0]
        wait_http(group.port, START_TIMEOUT, "httpd --mode reuseport", proc)
        yield group.running()
    finally:
        group.close()


# -- portshard run ---------------------------------------------------------------------------


class Supervisor:
    """`portshard run` with the given flags; talks to it with the portshard CLI."""

    def __init__(
        self, workers: int, flags: list[str], cmd: list[str], log: Path, listen: str = "tcp"
    ) -> None:
        self.control = os.path.join(_tmpdir(), "c.sock")
        self.log_from = log.stat().st_size if log.exists() else 0  # the log is shared
        port = 0
        if "reuseport" in flags:  # --via reuseport: every copy binds the port, so name one
            with socket.socket() as probe:
                probe.bind((HOST, 0))
                port = probe.getsockname()[1]
        self.proc = spawn(
            [
                *PORTSHARD,
                "run",
                "-w",
                str(workers),
                "--listen",
                f"{listen}://{HOST}:{port}",
                "--backlog",
                str(BACKLOG),
                "--control",
                self.control,
                *flags,
                "--",
                *cmd,
            ],
            log=log,
            stdout=subprocess.DEVNULL,
        )
        self.log = log

    def ctl(self, *args: str, timeout: float = 120) -> str:
        res = subprocess.run(
            [*PORTSHARD, *args, "--control", self.control],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if res.returncode:
            raise BenchError(f"portshard {' '.join(args)}: {res.stderr.strip()[-300:]}")
        return res.stdout

    def status(self) -> dict[str, Any]:
        """What `portshard status --json` prints, asked in-process (the CLI is an interpreter
        start per call: 0.2-0.6 s of the machine being measured, and wait_ready polls it)."""
        try:
            return request(self.control, "status", timeout=120)
        except ControlError as exc:
            raise BenchError(f"portshard status: {exc}") from None

    def wait_ready(self, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                with open(self.log, "rb") as f:
                    f.seek(self.log_from)
                    lines = f.read().decode(errors="replace").splitlines()
                said = [x for x in lines[-200:] if "error" in x.lower()] or lines[-3:]
                raise BenchError(f"portshard run exited ({self.proc.returncode}): {said[-1]}")
            if os.path.exists(self.control):
                with contextlib.suppress(BenchError, subprocess.TimeoutExpired):
                    st = self.status()
                    if st.get("ready"):
                        return st
            time.sleep(0.1)
        raise BenchError(f"portshard run not ready in {timeout:.0f}s")

    def running(self) -> Running:
        st = self.status()
        port = int(st["listen"][0]["port"])
        slots = sorted(st["slots"], key=lambda s: int(s["slot"]))
        pids = [int(s["pid"]) for s in slots]
        steering = st.get("steering") or {}
        info = {
            "via": sorted({str(s.get("mode")) for s in slots if s.get("mode")}),
            "steering": steering.get("backend") if isinstance(steering, dict) else None,
        }
        return Running(port, pids, (self.proc.pid,), self.control, [self.proc], self.proc.pid, info)

    def close(self) -> None:
        stop(self.proc, signal.SIGTERM, grace=20)
        # portshard removes its control socket as it stops: remove the directory whatever
        # is left in it (unlink-then-rmdir under one suppress left 248 empty dirs in a run).
        _rmtree(os.path.dirname(self.control))


@contextlib.contextmanager
def portshard(
    workers: int, flags: list[str], worker_args: list[str], log: Path
) -> Iterator[Running]:
    sup = Supervisor(workers, flags, [*HTTPD, "--mode", "reuseport", *worker_args], log)
    try:
        sup.wait_ready()
        running = sup.running()
        wait_http(running.port, START_TIMEOUT, "portshard run", sup.proc)
        yield running
    finally:
        sup.close()


def portshard_options() -> dict[str, list[str]]:
    """The choices of `portshard run`'s options that the bench compares (``--via``,
    ``--steering``), read from its --help: empty for an option that does not exist yet.

    Colleagues are adding both; the scenarios pick them up as soon as they land."""
    res = subprocess.run(
        [*PORTSHARD, "run", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    text = re.sub(r"\s+", " ", res.stdout)
    found: dict[str, list[str]] = {}
    for option in ("via", "steering"):
        m = re.search(rf"--{option} \[([\w|-]+)\]", text)
        if m:
            found[option] = m.group(1).split("|")
        elif re.search(rf"--{option}\b", text):
            m = re.search(rf"--{option} [A-Z]+ .*?\b((?:\w+\|)+\w+)\b", text)
            found[option] = m.group(1).split("|") if m else []
    return found


# -- nginx and HAProxy -------------------------------------------------------------------------

NGINX_CONF = """\
worker_processes {workers};
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{
    worker_connections 4096;
    accept_mutex {mutex};
}}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen {host}:{port} backlog={backlog}{reuseport};
        location / {{
            default_type text/plain;
            return 200 "$pid\\n";
        }}
    }}
}}
"""


@contextlib.contextmanager
def nginx(mode: str, workers: int, log: Path) -> Iterator[Running]:
    """nginx with ``mode`` = accept_mutex_on | accept_mutex_off | reuseport; its workers
    answer ``return 200 "$pid"`` (no file, no upstream)."""
    tmp = _tmpdir()
    proc: subprocess.Popen[bytes] | None = None
    try:
        for _attempt in range(5):
            port = free_port()
            conf = NGINX_CONF.format(
                workers=workers,
                tmp=tmp,
                mutex="on" if mode == "accept_mutex_on" else "off",
                host=HOST,
                port=port,
                backlog=BACKLOG,
                reuseport=" reuseport" if mode == "reuseport" else "",
            )
            Path(tmp, "nginx.conf").write_text(conf)
            proc = spawn(
                ["nginx", "-p", tmp, "-e", f"{tmp}/error.log", "-c", f"{tmp}/nginx.conf"],
                log=log,
                stdout=subprocess.DEVNULL,
            )
            try:
                wait_http(port, START_TIMEOUT, f"nginx ({mode})", proc)
                break
            except BenchError:
                stop(proc)
                proc = None
                err = Path(tmp, "error.log")
                if err.exists() and "Address already in use" in err.read_text():
                    continue  # the free port was taken meanwhile: pick another
                raise
        if proc is None:
            raise BenchError("nginx: no free port after 5 attempts")
        deadline = time.monotonic() + START_TIMEOUT
        while len(pids := children(proc.pid)) < workers:
            if time.monotonic() > deadline:
                raise BenchError(f"nginx started {len(pids)} of {workers} workers")
            time.sleep(0.02)
        yield Running(port, pids, (proc.pid,), procs=[proc])
    finally:
        if proc is not None:
            stop(proc, signal.SIGTERM)
        _rmtree(tmp)


HAPROXY_CONF = """\
global
    maxconn 4000
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend bench
    bind {host}:{port}
    default_backend workers
backend workers
    balance roundrobin
{servers}
"""


@contextlib.contextmanager
def haproxy(workers: int, worker_args: list[str], log: Path) -> Iterator[Running]:
    """HAProxy (its defaults: one thread per CPU, keep-alive to the servers) in front of N
    Python workers, each on a port of its own, round robin."""
    tmp = _tmpdir()
    backends: list[subprocess.Popen[bytes]] = []
    proc: subprocess.Popen[bytes] | None = None
    try:
        ports, pids = [], []
        for slot in range(workers):
            b = spawn([*HTTPD, "--mode", "single", "--slot", str(slot), *worker_args], log=log)
            backends.append(b)
            _, bport, bpid = read_line(b, START_TIMEOUT, "httpd --mode single").split()
            ports.append(int(bport))
            pids.append(int(bpid))
        servers = "\n".join(f"    server w{i} {HOST}:{p}" for i, p in enumerate(ports))
        for _attempt in range(5):
            port = free_port()
            cfg = Path(tmp, "haproxy.cfg")
            cfg.write_text(HAPROXY_CONF.format(host=HOST, port=port, servers=servers))
            hlog = Path(tmp, "haproxy.log")
            proc = spawn(["haproxy", "-db", "-f", str(cfg)], log=hlog, stdout=subprocess.DEVNULL)
            try:
                wait_http(port, START_TIMEOUT, "haproxy", proc)
                break
            except BenchError:
                stop(proc)
                proc = None
                if "ddress already in use" in hlog.read_text(errors="replace"):
                    continue
                raise BenchError("haproxy: " + hlog.read_text(errors="replace")[-300:]) from None
        if proc is None:
            raise BenchError("haproxy: no free port after 5 attempts")
        roots = (proc.pid, *(b.pid for b in backends))
        yield Running(port, pids, roots, procs=[proc, *backends])
    finally:
        if proc is not None:
            stop(proc)
        for b in backends:
            stop(b)
        _rmtree(tmp)


def _rmtree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


# -- UDP -------------------------------------------------------------------------------------


@contextlib.contextmanager
def udp(kind: str, workers: int, flags: list[str], args: list[str], log: Path) -> Iterator[Running]:
    """``kind`` = single (one socket, one process) | reuseport (N processes, own sockets) |
    portshard (`portshard run` with a udp:// address and ``flags``); ``args`` for udpd.py."""
    if kind == "portshard":
        sup = Supervisor(workers, flags, [*UDPD, *args, "--port", "{port}"], log, "udp")
        try:
            sup.wait_ready()
            yield sup.running()
        finally:
            sup.close()
        return
    group = Group(
        [*UDPD, *args, *(["--reuseport"] if kind == "reuseport" else [])],
        1 if kind == "single" else workers,
        log,
        "udpd",
    )
    try:
        yield group.running()
    finally:
        group.close()
