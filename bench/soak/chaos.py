"""The chaos: one random operation at a time (seeded), each recorded with what came back.

Every operation goes through a public interface: the CLI (reload, scale, status), signals to
the supervisor or a worker, the served port (``/fork/...`` asks a chaos worker to grow its
tree), raw connections to the control socket and the metrics endpoint, and the TOML file the
supervisor re-reads on reload.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .client import served_by
from .target import Target, good_config

__all__ = ["BAD_CONFIGS", "Chaos", "Fork", "Kill", "Op"]


@dataclass(frozen=True)
class Op:
    kind: str
    t: float  # time.monotonic() when it began
    seconds: float
    outcome: str  # ok | refused (a clean error the operation may get) | violation
    detail: str = ""


@dataclass(frozen=True)
class Kill:
    t: float  # time.monotonic() of the SIGKILL
    pid: int
    slot: int


@dataclass(frozen=True)
class Fork:
    """A child a chaos worker forked on demand: whose tree it joined, and how. A lost request
    in its hands is traced back to its worker through this."""

    t: float  # time.monotonic() of the answer
    child: int
    mode: str  # serve | setsid | daemon
    parent: int | None  # the process that forked it (its X-Served), if it said
    worker: int | None  # ... and that process's worker


# Config files a reload must refuse with a one-line error, the service untouched. The last
# ones parse but cannot run: the reload fails, the old workers keep serving.
BAD_CONFIGS: dict[str, bytes] = {
    "syntax": b"command = [\n[[[\n",
    "non-utf8": b"command = ['\xff\xfe']\n",
    "command-int": b"command = 5\n",
    "command-empty": b"command = []\n",
    "grace-text": b'grace = "soon"\ncommand = ["true"]\n',
    "ready-timeout-negative": b"ready-timeout = -3\n",
    "surge-zero": b"surge = 0\n",
    "unknown-key": b"bogus-key = 1\n",
    "env-int": b"env = 5\n",
    "huge-number": b"grace = " + b"9" * 5000 + b"\n",
    "command-missing": b'command = ["/nonexistent/portshard-soak-worker"]\n',
}

SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGHUP)
FORK_MODES = ("serve", "setsid", "daemon")


@dataclass
class Chaos:
    target: Target
    rng: random.Random
    min_workers: int = 2
    max_workers: int = 5
    flood_max: int = 300  # connections per flood
    midway_kill_chance: float = 0.3  # a reload or scale also meets a worker SIGKILL
    ops: list[Op] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    forked: list[Fork] = field(default_factory=list)
    workers: int = 0  # the count last asked for
    probe_waits: list[tuple[str, float]] = field(default_factory=list)  # flood, s a real one waited
    opening: list[str] | None = None  # the kinds still to do once before chance decides

    def actions(self) -> dict[str, tuple[int, Callable[[], Op]]]:
        """Each operation and its weight."""
        return {
            "reload": (3, self.reload),
            "scale": (2, self.scale),
            "kill": (3, self.kill),
            "fork": (3, self.fork),
            "flood-control": (1, self.flood_control),
            "flood-metrics": (1, self.flood_metrics),
            "bad-config": (2, self.bad_config),
            "signal": (2, self.signal),
        }

    def step(self) -> Op:
        """One operation: each kind once first (in a seeded order), then at random by weight."""
        table = self.actions()
        names = sorted(table)
        if self.opening is None:
            self.opening = self.rng.sample(names, len(names))
        if self.opening:
            name = self.opening.pop()
        else:
            name = self.rng.choices(names, weights=[table[n][0] for n in names])[0]
        op = table[name][1]()
        self.ops.append(op)
        return op

    # ---- operations ----------------------------------------------------------------------

    def _cli_op(self, kind: str, *args: str, expect_ok: bool = True) -> Op:
        t0 = time.monotonic()
        res = self.target.cli(*args)
        err = res.err.strip()
        if res.traceback or res.rc < 0:
            return Op(kind, t0, res.seconds, "violation", f"{' '.join(args)}: {err[-400:]}")
        if res.rc == 0:
            if not expect_ok:
                return Op(kind, t0, res.seconds, "violation", f"{' '.join(args)} succeeded")
            return Op(kind, t0, res.seconds, "ok", " ".join(args))
        if not err or len(err.splitlines()) > 2:
            return Op(kind, t0, res.seconds, "violation", f"unclear error: {err[-400:]!r}")
        return Op(kind, t0, res.seconds, "refused", f"{' '.join(args)}: {err}")

    def reload(self) -> Op:
        with self._maybe_kill_midway():
            return self._cli_op("reload", "reload", "--wait", "--timeout", "60")

    def scale(self) -> Op:
        choices = [n for n in range(self.min_workers, self.max_workers + 1) if n != self.workers]
        n = self.rng.choice(choices)
        with self._maybe_kill_midway():
            op = self._cli_op("scale", "scale", str(n), "--timeout", "60")
        if op.outcome == "ok":
            self.workers = n
        return Op(op.kind, op.t, op.seconds, op.outcome, op.detail)

    def kill(self) -> Op:
        t0 = time.monotonic()
        st = self.target.status()
        slots = [s for s in (st or {}).get("slots", []) if s.get("pid")]
        if not slots:
            return Op("kill", t0, time.monotonic() - t0, "refused", "no worker to kill")
        slot = self.rng.choice(slots)
        t = time.monotonic()
        try:
            os.kill(slot["pid"], signal.SIGKILL)
        except ProcessLookupError:
            return Op("kill", t0, time.monotonic() - t0, "refused", f"pid {slot['pid']} gone")
        self.kills.append(Kill(t, slot["pid"], slot["slot"]))
        return Op("kill", t0, time.monotonic() - t0, "ok", f"slot {slot['slot']} pid {slot['pid']}")

    @contextlib.contextmanager
    def _maybe_kill_midway(self) -> Iterator[None]:
        """Now and then, SIGKILL one of the supervisor's children (old or new worker) while
        the operation runs: a reload or scale that meets a crash must still end cleanly."""
        if self.rng.random() >= self.midway_kill_chance:
            yield
            return
        delay = self.rng.uniform(0.05, 1.5)
        pick = self.rng.random()
        done = threading.Event()

        def kill_later() -> None:
            if done.wait(delay):
                return
            pids = children_of(self.target.pid)
            if not pids:
                return
            pid = pids[int(pick * len(pids))]
            t = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                self.kills.append(Kill(t, pid, -1))

        killer = threading.Thread(target=kill_later, name="soak-midway-kill", daemon=True)
        killer.start()
        try:
            yield
        finally:
            done.set()
            killer.join(5)

    def fork(self) -> Op:
        t0 = time.monotonic()
        mode = self.rng.choice(FORK_MODES)
        try:
            with socket.create_connection(("127.0.0.1", self.target.port), timeout=5) as s:
                s.sendall(f"GET /fork/{mode} HTTP/1.0\r\n\r\n".encode())
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
        except OSError as exc:
            # a connection in a worker killed a moment ago: not the fork's fault
            return Op("fork", t0, time.monotonic() - t0, "refused", f"{mode}: {exc}")
        body = data.partition(b"\r\n\r\n")[2].decode(errors="replace").strip()
        if body.startswith("forked "):
            parent, worker = served_by(data)
            child = int(body.split()[1])
            self.forked.append(Fork(time.monotonic(), child, mode, parent, worker))
            body += f" (by pid {parent}, worker {worker})"
        return Op("fork", t0, time.monotonic() - t0, "ok", f"{mode}: {body}")

    def signal(self) -> Op:
        t0 = time.monotonic()
        sig = self.rng.choice(SIGNALS)
        self.target.signal(sig)
        time.sleep(0.2)
        if not self.target.alive():
            return Op("signal", t0, time.monotonic() - t0, "violation", f"{sig.name} killed it")
        return Op("signal", t0, time.monotonic() - t0, "ok", sig.name)

    def bad_config(self) -> Op:
        t0 = time.monotonic()
        name = self.rng.choice(sorted(BAD_CONFIGS))
        by_signal = self.rng.random() < 0.3  # SIGHUP: nobody to answer, it must only survive
        self.target.config.write_bytes(BAD_CONFIGS[name])
        try:
            if by_signal:
                op = self._hup_bad_config()
            else:
                op = self._cli_op(
                    "bad-config", "reload", "--wait", "--timeout", "60", expect_ok=False
                )
        finally:
            self.target.config.write_text(good_config(self.target.marker))
        if op.outcome == "refused":  # the expected outcome: refused with a clear line
            return Op("bad-config", t0, time.monotonic() - t0, "ok", f"{name}: {op.detail}")
        return Op("bad-config", t0, time.monotonic() - t0, op.outcome, f"{name}: {op.detail}")

    def _hup_bad_config(self) -> Op:
        t0 = time.monotonic()
        self.target.signal(signal.SIGHUP)
        time.sleep(1.0)  # it reads the file (a reload of a command that is gone fails later)
        if not self.target.alive() or self.target.status() is None:
            return Op("bad-config", t0, time.monotonic() - t0, "violation", "SIGHUP: it died")
        return Op("bad-config", t0, time.monotonic() - t0, "refused", "SIGHUP: still serving")

    def flood_control(self) -> Op:
        return self._flood(
            "flood-control", self._control_conn, self._control_payload, self._control_answers
        )

    def flood_metrics(self) -> Op:
        return self._flood(
            "flood-metrics", self._metrics_conn, self._metrics_payload, self._metrics_answers
        )

    # ---- floods --------------------------------------------------------------------------

    def _flood(
        self,
        kind: str,
        connect: Callable[[], socket.socket | None],
        payload: Callable[[str], bytes],
        probe: Callable[[], str | None],
    ) -> Op:
        """Open many connections (idle, garbage, oversized, half requests) and hold them; a
        real request (``probe``) arrives behind them. The endpoint may make it wait (its
        connection cap and idle timeout are the design), but it must answer it, at the latest
        once the flood is gone; how long it waited is reported."""
        t0 = time.monotonic()
        count = self.rng.randint(self.flood_max // 4, self.flood_max)
        styles = [self.rng.choice(("idle", "garbage", "oversize", "half")) for _ in range(count)]
        hold = self.rng.uniform(0.5, 3.0)
        socks: list[tuple[socket.socket, str]] = []
        outcome: list[str | None] = []
        waited: list[float] = []

        def real_request() -> None:
            t = time.monotonic()
            outcome.append(probe())
            waited.append(time.monotonic() - t)

        checker = threading.Thread(target=real_request, name="soak-probe", daemon=True)
        try:
            for style in styles:
                sock = connect()
                if sock is not None:
                    socks.append((sock, style))
            time.sleep(0.05)  # loopback handshakes complete
            for sock, style in socks:
                _send_some(sock, payload(style))
            checker.start()
            time.sleep(hold)
        finally:
            for sock, _ in socks:
                sock.close()
        checker.join(60)
        self.probe_waits.append((kind, waited[0] if waited else -1.0))
        detail = f"{len(socks)}/{count} connections held {hold:.1f}s"
        if not outcome or outcome[0] is not None:
            problem = outcome[0] if outcome else "no answer in 60 s after the flood ended"
            return Op(kind, t0, time.monotonic() - t0, "violation", f"{detail}; {problem}")
        return Op(
            kind,
            t0,
            time.monotonic() - t0,
            "ok",
            f"{detail}; a real request waited {waited[0]:.2f}s",
        )

    def _control_payload(self, style: str) -> bytes:
        if style == "garbage":
            return self.rng.randbytes(self.rng.randint(1, 512))
        if style == "oversize":
            return b"x" * 70_000 + b"\n"
        if style == "half":
            return b'{"v": 1, "cmd": "sta'
        return b""

    def _metrics_payload(self, style: str) -> bytes:
        if style == "half":
            return b"GET /metrics HTTP/1.1\r\nHost: evil.example\r\n"
        if style == "oversize":
            return b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n"
        if style == "garbage":
            return self.rng.randbytes(self.rng.randint(1, 512))
        return b""

    def _control_conn(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(self.target.control)
        except OSError:
            sock.close()  # the queue is full: the flood has done its job
            return None
        return sock

    def _metrics_conn(self) -> socket.socket | None:
        sock = socket.socket()
        sock.setblocking(False)
        if sock.connect_ex(("127.0.0.1", self.target.metrics_port)) not in (0, errno.EINPROGRESS):
            sock.close()
            return None
        return sock

    def _control_answers(self) -> str | None:
        res = self.target.cli("status", "--json", timeout=60)
        if res.rc != 0:
            return f"status: rc {res.rc} {res.err.strip()[-300:]!r}"
        return None

    def _metrics_answers(self) -> str | None:
        body = metrics_get(self.target.metrics_port, timeout=60)
        if body is None or b"portshard_" not in body:
            return f"GET /metrics: {body[:200] if body else 'no answer'!r}"
        return None


def children_of(pid: int) -> list[int]:
    """The direct children of ``pid`` (a supervisor's: its workers), from /proc."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    raw = f.read()
            except OSError:
                continue
            if int(raw[raw.rindex(b")") + 2 :].split()[1]) == pid:
                out.append(int(name))
    return sorted(out)


def _send_some(sock: socket.socket, payload: bytes) -> None:
    """Send what fits now (a flood never blocks on its own sockets)."""
    if payload:
        with contextlib.suppress(OSError):  # full, refused, reset: the flood goes on
            sock.send(payload)


def metrics_get(port: int, timeout: float = 10) -> bytes | None:
    """One GET /metrics as Prometheus would do it; the body, or None."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    return body if head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0] else None


def summary(ops: list[Op]) -> dict[str, Any]:
    """Operations done per kind and outcome."""
    out: dict[str, dict[str, int]] = {}
    for op in ops:
        out.setdefault(op.kind, {}).setdefault(op.outcome, 0)
        out[op.kind][op.outcome] += 1
    return out
