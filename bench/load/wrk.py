"""wrk (the Debian package, 4.x) for HTTP throughput, with a Lua script that counts the
responses by body (each worker answers with its pid) and prints one JSON line.

wrk's latency percentiles are reported after its coordinated-omission correction, which can
inflate a tail several times over (a 4.6 ms raw p99 showed as ~26 ms in a bimodal case): the
bench keeps them only for reference (``wrk_*`` keys) and takes latencies from raw timings.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.procs import BenchError, spawn, stop

LUA = """\
-- Count responses by body (the serving worker's pid) in each thread; merge them in done().
counts = {}
local threads = {}
function setup(thread) table.insert(threads, thread) end
function response(status, headers, body)
  counts[body] = (counts[body] or 0) + 1
end
function done(summary, latency, requests)
  local merged = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("counts")) do merged[k] = (merged[k] or 0) + v end
  end
  local parts = {}
  for k, v in pairs(merged) do
    table.insert(parts, string.format("%q:%d", (k:gsub("%s+$", "")), v))
  end
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests":%d,"duration_us":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p99":%d,"max":%d},"bodies":{%s}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max, table.concat(parts, ",")))
end
"""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    errors: dict[str, int]
    bodies: dict[str, int]  # response body (worker pid) -> responses
    corrected_ms: dict[str, float]  # wrk's own percentiles (coordinated-omission corrected)
    cpu: float  # CPU seconds per second wrk used (1.0 = one CPU)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def failed(self) -> int:
        return sum(self.errors.values())


class Wrk:
    """One wrk run in the background: `start`, then `wait` for its result."""

    def __init__(
        self,
        port: int,
        *,
        seconds: float,
        connections: int,
        threads: int,
        keepalive: bool,
        script_dir: Path,
        host: str = "127.0.0.1",
    ) -> None:
        if shutil.which("wrk") is None:
            raise BenchError("wrk is not installed (Debian: apt-get install wrk; make bench does)")
        script = script_dir / "count.lua"
        if not script.exists():
            script.write_text(LUA)
        self.seconds = seconds
        args = [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "5s",
            "-s",
            str(script),
        ]
        if not keepalive:
            args += ["-H", "Connection: close"]  # wrk then opens a new connection per request
        self.args = [*args, f"http://{host}:{port}/"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.t0 = 0.0

    def start(self) -> Wrk:
        self.t0 = time.monotonic()
        self.proc = spawn(self.args)
        return self

    def wait(self) -> WrkResult:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = self.t0 + self.seconds + 20  # wrk is bounded by -d; this bounds a hang
        out = b""
        os.set_blocking(self.proc.stdout.fileno(), False)
        rusage = None
        while time.monotonic() < deadline:
            try:
                chunk = self.proc.stdout.read()
            except BlockingIOError:
                chunk = None
            if chunk:
                out += chunk
            pid, status, rusage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                break
            time.sleep(0.02)
        else:
            stop(self.proc)
            raise BenchError(f"wrk did not finish in {self.seconds + 20:.0f}s")
        rest = self.proc.stdout.read()
        out += rest or b""
        wall = time.monotonic() - self.t0
        stop(self.proc)
        text = out.decode(errors="replace")
        line = next((x for x in text.splitlines() if x.startswith("WRKJSON ")), None)
        if line is None:
            raise BenchError(f"wrk failed ({self.proc.returncode}): {text.strip()[-300:]}")
        data = json.loads(line.removeprefix("WRKJSON "))
        cpu = (rusage.ru_utime + rusage.ru_stime) / wall if rusage else 0.0
        lat = data["latency_us"]
        return WrkResult(
            requests=int(data["requests"]),
            seconds=data["duration_us"] / 1e6,
            errors={k: int(v) for k, v in data["errors"].items()},
            bodies={str(k): int(v) for k, v in data["bodies"].items()},
            corrected_ms={k: v / 1000 for k, v in lat.items()},
            cpu=cpu,
        )
