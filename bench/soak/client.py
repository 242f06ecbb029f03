"""The soak's load: asyncio clients, a new connection per request, every outcome recorded with
whose hands the connection was in.

The chaos worker (tests/workers/chaosworker.py) writes ``X-Served: PID WORKER`` as soon as it
accepts, so even a connection lost halfway names the process that held it and the worker
(the process `portshard run` started) whose tree it belongs to. Successes are counted (per
second and per worker); failures are kept whole, to be judged against the kills.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field

__all__ = ["Failure", "Load", "served_by"]


@dataclass(frozen=True)
class Failure:
    start: float  # time.monotonic()
    end: float
    kind: str  # refused | connect_timeout | connect_error | reset | timeout | short | error
    pid: int | None  # the process that held it (from X-Served), if it said
    worker: int | None  # its worker (the tree's root)
    detail: str = ""


@dataclass
class Load:
    host: str
    port: int
    concurrency: int = 8
    timeout: float = 5.0
    max_seconds: float = 3600.0
    ok: int = 0
    failures: list[Failure] = field(default_factory=list)
    per_second: collections.Counter[int] = field(default_factory=collections.Counter)
    by_worker: collections.Counter[int] = field(default_factory=collections.Counter)
    last_served: dict[int, float] = field(default_factory=dict)  # worker -> monotonic time

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-load", daemon=True)
        self.started = 0.0

    def start(self) -> Load:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.timeout * 2 + 5)
        if self._thread.is_alive():
            raise RuntimeError("the soak's load did not stop")

    @property
    def total(self) -> int:
        return self.ok + len(self.failures)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        await asyncio.gather(*(self._client(deadline) for _ in range(self.concurrency)))

    async def _client(self, deadline: float) -> None:
        while not self._stop.is_set() and time.monotonic() < deadline:
            failure = await self._one()
            if failure is not None:
                self.failures.append(failure)
                if failure.kind == "refused":
                    await asyncio.sleep(0.01)

    async def _one(self) -> Failure | None:
        t0 = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self.timeout
            )
        except ConnectionRefusedError:
            return Failure(t0, time.monotonic(), "refused", None, None)
        except TimeoutError:
            return Failure(t0, time.monotonic(), "connect_timeout", None, None)
        except OSError as exc:
            return Failure(t0, time.monotonic(), "connect_error", None, None, str(exc))
        data = b""
        kind = ""
        try:
            writer.write(b"GET / HTTP/1.0\r\nHost: soak\r\n\r\n")
            async with asyncio.timeout(self.timeout):
                while chunk := await reader.read(4096):
                    data += chunk
        except ConnectionResetError:
            kind = "reset"
        except TimeoutError:
            kind = "timeout"
        except OSError as exc:
            kind = f"error: {exc}"
        finally:
            writer.close()
        pid, worker = served_by(data)
        head, _, body = data.partition(b"\r\n\r\n")
        if not kind and head.startswith(b"HTTP/1.0 200") and body.endswith(b"\n"):
            self.ok += 1
            self.per_second[int(t0 - self.started)] += 1
            if worker is not None:
                self.by_worker[worker] += 1
                self.last_served[worker] = t0
            return None
        return Failure(t0, time.monotonic(), kind or "short", pid, worker, repr(data[:80]))


def served_by(data: bytes) -> tuple[int | None, int | None]:
    """(pid, worker) from an answer's ``X-Served`` line, if it has one."""
    for line in data.split(b"\r\n"):
        if line.startswith(b"X-Served: "):
            parts = line[len(b"X-Served: ") :].split()
            if len(parts) == 2 and all(p.isdigit() for p in parts):
                return int(parts[0]), int(parts[1])
    return None, None
