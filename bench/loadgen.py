"""A bounded loopback load generator: HTTP/1.0, connection per request, concurrent clients.

Used by the tests, the demo and the benchmarks.

Runs an asyncio loop in a thread until stopped, or until ``max_requests`` or ``max_seconds``.
Every request is classified, so a test can tell a refused connect (never accepted) from a
connection the kernel accepted and then lost (reset or empty reply).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Result:
    ok: bool
    kind: str  # ok | refused | connect_timeout | reset | empty | timeout | error
    latency: float
    body: str = ""


@dataclass
class Load:
    host: str
    port: int
    concurrency: int = 16
    max_requests: int = 200_000
    max_seconds: float = 60.0
    timeout: float = 5.0
    results: list[Result] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> Load:
        self._stop.set()
        self._thread.join(self.max_seconds + self.timeout + 5)
        assert not self._thread.is_alive(), "load generator did not stop"
        return self

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- summaries --
    def count(self, kind: str | None = None) -> int:
        return sum(1 for r in self.results if kind is None or r.kind == kind)

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if not r.ok]

    def by_kind(self) -> dict[str, int]:
        return dict(collections.Counter(r.kind for r in self.results))

    def served_by(self) -> collections.Counter[str]:
        return collections.Counter(r.body.split()[1] for r in self.results if r.ok and r.body)

    def wait_for(self, n: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.results) < n:
            assert time.monotonic() < deadline, f"load reached only {len(self.results)} requests"
            time.sleep(0.01)

    # -- the client --
    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        await asyncio.gather(*(self._client(deadline) for _ in range(self.concurrency)))

    async def _client(self, deadline: float) -> None:
        while (
            not self._stop.is_set()
            and time.monotonic() < deadline
            and len(self.results) < self.max_requests
        ):
            self.results.append(await self._one())

    async def _one(self) -> Result:
        t0 = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self.timeout
            )
        except ConnectionRefusedError:
            await asyncio.sleep(0.01)
            return Result(False, "refused", time.monotonic() - t0)
        except TimeoutError:
            return Result(False, "connect_timeout", time.monotonic() - t0)
        except OSError:
            return Result(False, "error", time.monotonic() - t0)
        try:
            writer.write(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            data = await asyncio.wait_for(reader.read(), self.timeout)
        except ConnectionResetError:
            return Result(False, "reset", time.monotonic() - t0)
        except TimeoutError:
            return Result(False, "timeout", time.monotonic() - t0)
        except OSError:
            return Result(False, "error", time.monotonic() - t0)
        finally:
            writer.close()
        if not data:
            return Result(False, "empty", time.monotonic() - t0)
        body = data.split(b"\r\n\r\n", 1)[-1].decode(errors="replace").strip()
        return Result(True, "ok", time.monotonic() - t0, body)
