"""Several hosts behind a load balancer, from network namespaces on one machine (issue 16).

Topology (every address lives only inside namespaces this module creates, and goes)::

    client ns  10.77.100.2 --- 10.77.100.1  balancer ns  10.77.1.1 --- 10.77.1.2  host h1
                                            VIPs on lo:  10.77.2.1 --- 10.77.2.2  host h2
                                            10.77.200.1  (HAProxy)    10.77.3.1 --- 10.77.3.2  h3
                                            10.77.200.2  (nftables DNAT)

Each host runs ``portshard run -w 2 --via fds`` of a tiny HTTP worker (`worker.py`, answers
``<host> <pid>``) on HOST:8080, and a stand-in health agent (`agent.py`) on HOST:9777 until
``--health`` exists. The balancer namespace routes (ip_forward in that namespace only) and
runs both balancers, each existing software:

- HAProxy in TCP mode on 10.77.200.1:8080, roundrobin, a TCP ``check`` of each host's port
  and an ``agent-check`` on its agent (so ``drain``/``maint``/a weight come from the host);
- nftables on 10.77.200.2:8080 as kube-proxy's nftables mode programs a Service: a ``numgen
  random mod N vmap`` to one chain per endpoint that DNATs to it. `Endpoints` plays the
  endpoints controller: it asks every host's agent and rewrites the map (one ``nft -f``
  transaction) when the set of ready hosts changes.

`Bed` is a context manager: every process is stopped (process groups) and every namespace
deleted on the way out, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.load.loadgen import Load
from bench.netbed.netns import (
    NetnsError,
    call_in,
    enter,
    exec_prefix,
    ip,
    namespaces,
    remove_stale,
    run_in,
)

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "bench" / "netbed" / "worker.py"
PORT = 8080
AGENT_PORT = 9777
VIP_HAPROXY = "10.77.200.1"
VIP_NFT = "10.77.200.2"
CLIENT_ADDR = "10.77.100.2"
AGENT_INTER = 0.3  # HAProxy's agent-inter, and the endpoints controller's period
CHECK_INTER = 0.5  # HAProxy's TCP check of the service port
SETTLE = 1.5  # how long after a host reports draining every balancer has seen it
NS_ROOT = "psbed"  # namespaces are named psbed<pid>-<role>


@dataclass
class Host:
    name: str  # h1, h2, ...
    ns: str
    addr: str
    control: Path
    drain_file: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None


class NsLoad(Load):
    """bench.load.loadgen.Load with its client thread inside a network namespace."""

    def __init__(self, ns: str, host: str, port: int, **kw: object) -> None:
        self.ns = ns
        super().__init__(host, port, **kw)  # type: ignore[arg-type]

    def _run(self) -> None:
        enter(self.ns)
        super()._run()

    def hosts_after(self, t: float) -> set[str]:
        """The hosts that served a request begun at or after ``t`` (time.monotonic())."""
        return {r.body.split()[0] for r in list(self.results) if r.ok and r.start >= t}


class Bed:
    """Three hosts, a balancer namespace with HAProxy and nftables, a client namespace."""

    def __init__(self, tmp: Path, hosts: int = 3, workers: int = 2) -> None:
        self.tmp = tmp
        self.workers = workers
        self.prefix = f"{NS_ROOT}{os.getpid()}-"
        self.lb = self.prefix + "lb"
        self.client = self.prefix + "cl"
        self.hosts = [
            Host(
                name=f"h{i}",
                ns=f"{self.prefix}h{i}",
                addr=f"10.77.{i}.2",
                control=tmp / f"h{i}.sock",
                drain_file=tmp / f"h{i}.drain",
                log=tmp / f"h{i}.log",
            )
            for i in range(1, hosts + 1)
        ]
        self._procs: list[subprocess.Popen[bytes]] = []
        self._stack = contextlib.ExitStack()
        self.endpoints: Endpoints | None = None

    # -- set-up and teardown --
    def __enter__(self) -> Bed:
        remove_stale(NS_ROOT)
        try:
            names = [self.lb, self.client, *(h.ns for h in self.hosts)]
            self._stack.enter_context(namespaces(names))
            self._stack.callback(self._stop_all)
            self._wire()
            for host in self.hosts:
                self.start_agent(host)
                self.start_host(host, wait=False)
            for host in self.hosts:
                self.wait_host(host)
            self._start_haproxy()
            self._start_nft()
            self.endpoints = Endpoints(self)
            self._stack.callback(self.endpoints.stop)
            self.endpoints.start()
            self.wait_serving(VIP_HAPROXY)
            self.wait_serving(VIP_NFT)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _wire(self) -> None:
        lb, cl = self.lb, self.client
        for i, host in enumerate(self.hosts, 1):
            dev = host.name
            ip("link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", host.ns, ns=lb)
            ip("addr", "add", f"10.77.{i}.1/24", "dev", dev, ns=lb)
            ip("link", "set", dev, "up", ns=lb)
            ip("addr", "add", f"{host.addr}/24", "dev", "eth0", ns=host.ns)
            ip("link", "set", "eth0", "up", ns=host.ns)
            ip("route", "add", "default", "via", f"10.77.{i}.1", ns=host.ns)
        ip("link", "add", "cl", "type", "veth", "peer", "name", "eth0", "netns", cl, ns=lb)
        ip("addr", "add", "10.77.100.1/24", "dev", "cl", ns=lb)
        ip("link", "set", "cl", "up", ns=lb)
        ip("addr", "add", f"{CLIENT_ADDR}/24", "dev", "eth0", ns=cl)
        ip("link", "set", "eth0", "up", ns=cl)
        ip("route", "add", "default", "via", "10.77.100.1", ns=cl)
        ip("addr", "add", f"{VIP_HAPROXY}/32", "dev", "lo", ns=lb)
        # the namespaces' own sysctls: routing in the balancer, ports for a client that opens
        # a connection per request
        run_in(lb, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        run_in(cl, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000")
        run_in(cl, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1")

    def _spawn(self, ns: str, args: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
        out = open(log, "ab")  # noqa: SIM115 - the child holds it; closed right after
        try:
            proc = subprocess.Popen(
                [*exec_prefix(ns), *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=ROOT,
                env={**os.environ, **env},
            )
        finally:
            out.close()
        self._procs.append(proc)
        return proc

    def _stop_all(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)

    # -- hosts --
    def start_agent(self, host: Host) -> None:
        args = [sys.executable, "-m", "bench.netbed.agent", "--control", str(host.control)]
        args += ["--listen", f"{host.addr}:{AGENT_PORT}", "--drain-file", str(host.drain_file)]
        self._spawn(host.ns, args, host.log.with_suffix(".agent.log"))

    def start_host(self, host: Host, wait: bool = True, stall_slot: int | None = None) -> None:
        """``portshard run`` on the host; ``stall_slot``: that slot's worker never becomes
        ready (it never accepts), so the host has part of its slots not ready."""
        host.drain_file.unlink(missing_ok=True)
        args = [sys.executable, "-m", "portshard", "run", "-w", str(self.workers), "--via", "fds"]
        args += ["--listen", f"tcp://{host.addr}:{PORT}", "--control", str(host.control)]
        env = {"NETBED_HOST": host.name}
        if stall_slot is not None:
            args += ["--ready-timeout", "300"]
            env["NETBED_STALL_SLOT"] = str(stall_slot)
        args += ["--", sys.executable, str(WORKER)]
        host.proc = self._spawn(host.ns, args, host.log, **env)
        if wait:
            self.wait_host(host)

    def wait_host(self, host: Host, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if host.proc is not None and host.proc.poll() is not None:
                raise NetnsError(f"{host.name}: portshard run exited:\n{self.log_of(host)}")
            res = self.ctl(host, "status", "--json", check=False)
            if res.returncode == 0 and json.loads(res.stdout).get("ready"):
                return
            time.sleep(0.1)
        raise NetnsError(f"{host.name}: not ready after {timeout}s:\n{self.log_of(host)}")

    def ctl(
        self, host: Host, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """A portshard command against the host's supervisor (its control socket is a file:
        reachable from any namespace)."""
        cmd = [sys.executable, "-m", "portshard", *args, "--control", str(host.control)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode:
            raise NetnsError(f"portshard {' '.join(args)} on {host.name}: {res.stderr}")
        return res

    def status(self, host: Host) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.ctl(host, "status", "--json").stdout)
        return result

    def reload_host(self, host: Host) -> None:
        self.ctl(host, "reload", "--wait", "--timeout", "60")

    def drain_host(self, host: Host) -> None:
        """What `portshard drain` will do first: health turns to draining (the stand-in agent
        reads this file), the host still serves."""
        host.drain_file.touch()

    def stop_host(self, host: Host, timeout: float = 30) -> None:
        self.ctl(host, "stop")
        assert host.proc is not None
        host.proc.wait(timeout)

    def log_of(self, host: Host) -> str:
        return host.log.read_text(errors="replace")[-3000:] if host.log.exists() else ""

    def agent_reply(self, host: Host) -> str:
        """The agent's answer, asked from the balancer's namespace (as HAProxy asks it)."""

        return call_in(self.lb, lambda: _ask_agent(host.addr))

    # -- balancers --
    def _start_haproxy(self) -> None:
        servers = "\n".join(f"    server {h.name} {h.addr}:{PORT}" for h in self.hosts)
        inter, agent = int(CHECK_INTER * 1000), int(AGENT_INTER * 1000)
        cfg = self.tmp / "haproxy.cfg"
        cfg.write_text(
            f"""global
    maxconn 4000
defaults
    mode tcp
    timeout connect 2s
    timeout client 20s
    timeout server 20s
frontend vip
    bind {VIP_HAPROXY}:{PORT}
    default_backend hosts
backend hosts
    balance roundrobin
    default-server check inter {inter}ms fall 2 rise 1 agent-check agent-port {AGENT_PORT} \
agent-send "agent\\n" \
agent-inter {agent}ms weight 100
{servers}
"""
        )
        self._spawn(self.lb, ["haproxy", "-db", "-f", str(cfg)], self.tmp / "haproxy.log")

    def _start_nft(self) -> None:
        rules = [
            "table ip netbed {",
            "  chain svc { }",
            *(
                f"  chain ep-{h.name} {{ meta l4proto tcp dnat to {h.addr}:{PORT}; }}"
                for h in self.hosts
            ),
            "  chain prerouting {",
            "    type nat hook prerouting priority dstnat; policy accept;",
            f"    ip daddr {VIP_NFT} tcp dport {PORT} jump svc",
            "  }",
            "}",
        ]
        run_in(self.lb, "nft", "-f", "-", input="\n".join(rules) + "\n")
        self.set_nft_endpoints([h.name for h in self.hosts])

    def set_nft_endpoints(self, names: list[str]) -> None:
        """Point the service at these hosts, in one transaction (as kube-proxy does)."""
        if names:
            arms = ", ".join(f"{i} : goto ep-{n}" for i, n in enumerate(names))
            rule = f"add rule ip netbed svc numgen random mod {len(names)} vmap {{ {arms} }}"
        else:
            rule = "add rule ip netbed svc reject with tcp reset"
        run_in(self.lb, "nft", "-f", "-", input=f"flush chain ip netbed svc\n{rule}\n")

    # -- clients --
    def load(self, vip: str, **kw: object) -> NsLoad:
        """A connection-per-request load from the client namespace to ``vip``:8080."""
        kw.setdefault("timeout", 5.0)
        return NsLoad(self.client, vip, PORT, **kw)

    def wait_serving(self, vip: str, timeout: float = 20) -> None:
        """Until every host has answered through ``vip``."""
        want = {h.name for h in self.hosts}
        seen: set[str] = set()
        deadline = time.monotonic() + timeout
        while seen != want:
            if time.monotonic() > deadline:
                raise NetnsError(f"through {vip}: only {sorted(seen)} answered in {timeout}s")
            seen |= call_in(self.client, lambda: _get(vip))
            time.sleep(0.02)


def _get(vip: str) -> set[str]:
    try:
        with socket.create_connection((vip, PORT), timeout=2) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
    except OSError:
        return set()
    body = data.partition(b"\r\n\r\n")[2].split()
    return {body[0].decode()} if body else set()


@dataclass
class Endpoints:
    """The endpoints controller: every AGENT_INTER s it asks each host's agent and keeps in the
    nftables service the hosts that answer ``ready`` with a weight above 0%."""

    bed: Bed
    changes: list[tuple[float, list[str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.current = [h.name for h in self.bed.hosts]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        enter(self.bed.lb)
        while not self._stop.wait(AGENT_INTER):
            ready = [h.name for h in self.bed.hosts if _ready(_ask_agent(h.addr))]
            if ready != self.current:
                with contextlib.suppress(NetnsError):
                    self.bed.set_nft_endpoints(ready)
                    self.current = ready
                    self.changes.append((time.monotonic(), ready))


def _ask_agent(addr: str) -> str:
    try:
        with socket.create_connection((addr, AGENT_PORT), timeout=1) as s:
            data = b""
            while chunk := s.recv(100):
                data += chunk
            return data.decode()
    except OSError:
        return ""


def _ready(reply: str) -> bool:
    words = reply.split()
    return "ready" in words and not any(w in ("0%", "drain", "maint") for w in words)


@contextlib.contextmanager
def bed(tmp: Path, hosts: int = 3, workers: int = 2) -> Iterator[Bed]:
    with Bed(tmp, hosts, workers) as b:
        yield b
