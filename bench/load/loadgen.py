"""A bounded loopback load generator: HTTP/1.0, connection per request, concurrent clients.

Used by the tests, the demo and the benchmarks.

Runs an asyncio loop in a thread until stopped, or until ``max_requests`` or ``max_seconds``.
Every request is classified, so a test can tell a refused connect (never accepted) from a
connection the kernel accepted and then lost (reset or empty reply).

``close_first=True`` sends HTTP/1.1 and closes from the client's side once answered (curl).
For the benchmarks: ``keepalive=True`` sends HTTP/1.1 requests on one connection per client
(reconnecting when the server closes it), ``pause`` makes each client wait between requests
(a latency probe at a bounded rate beside a throughput tool), and every result records when
it started (``Result.start``, time.monotonic()), so a run can be cut to a time window.
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
    start: float = 0.0  # time.monotonic() when the request began


@dataclass
class Load:
    host: str
    port: int
    concurrency: int = 16
    max_requests: int = 200_000
    max_seconds: float = 60.0
    timeout: float = 5.0
    keepalive: bool = False  # HTTP/1.1, one persistent connection per client
    pause: float = 0.0  # seconds each client waits after each request
    # HTTP/1.1, one request per connection, closed by the client once it has the answer (as
    # curl does): a server that keeps answered connections until its keep-alive timeout
    # (hypercorn) holds them in CLOSE_WAIT meanwhile
    close_first: bool = False
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

    def _going(self, deadline: float) -> bool:
        return (
            not self._stop.is_set()
            and time.monotonic() < deadline
            and len(self.results) < self.max_requests
        )

    async def _client(self, deadline: float) -> None:
        if self.keepalive:
            await self._client_keepalive(deadline)
            return
        while self._going(deadline):
            self.results.append(await self._one())
            if self.pause:
                await asyncio.sleep(self.pause)

    async def _client_keepalive(self, deadline: float) -> None:
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while self._going(deadline):
                t0 = time.monotonic()
                if conn is None:
                    try:
                        conn = await asyncio.wait_for(
                            asyncio.open_connection(self.host, self.port), self.timeout
                        )
                    except ConnectionRefusedError:
                        self.results.append(Result(False, "refused", time.monotonic() - t0, "", t0))
                        await asyncio.sleep(0.01)
                        continue
                    except TimeoutError:
                        self.results.append(
                            Result(False, "connect_timeout", time.monotonic() - t0, "", t0)
                        )
                        continue
                    except OSError:
                        self.results.append(Result(False, "error", time.monotonic() - t0, "", t0))
                        continue
                result, keep = await self._one_keepalive(*conn, t0)
                self.results.append(result)
                if not keep:
                    conn[1].close()
                    conn = None
                if self.pause:
                    await asyncio.sleep(self.pause)
        finally:
            if conn is not None:
                conn[1].close()

    async def _one_keepalive(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, t0: float
    ) -> tuple[Result, bool]:
        """One request on a persistent connection: (result, whether the connection stays)."""
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(self.timeout):
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.lower().split(b"\r\n"):
                    if line.startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            kind = "empty" if not exc.partial else "error"
            return Result(False, kind, time.monotonic() - t0, "", t0), False
        except ConnectionResetError:
            return Result(False, "reset", time.monotonic() - t0, "", t0), False
        except TimeoutError:
            return Result(False, "timeout", time.monotonic() - t0, "", t0), False
        except (OSError, ValueError, asyncio.LimitOverrunError):
            return Result(False, "error", time.monotonic() - t0, "", t0), False
        keep = b"connection: close" not in head.lower()
        text = body.decode(errors="replace").strip()
        return Result(True, "ok", time.monotonic() - t0, text, t0), keep

    async def _one(self) -> Result:
        t0 = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self.timeout
            )
        except ConnectionRefusedError:
            await asyncio.sleep(0.01)
            return Result(False, "refused", time.monotonic() - t0, "", t0)
        except TimeoutError:
            return Result(False, "connect_timeout", time.monotonic() - t0, "", t0)
        except OSError:
            return Result(False, "error", time.monotonic() - t0, "", t0)
        if self.close_first:
            try:
                return (await self._one_keepalive(reader, writer, t0))[0]
            finally:
                writer.close()
        try:
            writer.write(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            data = await asyncio.wait_for(reader.read(), self.timeout)
        except ConnectionResetError:
            return Result(False, "reset", time.monotonic() - t0, "", t0)
        except TimeoutError:
            return Result(False, "timeout", time.monotonic() - t0, "", t0)
        except OSError:
            return Result(False, "error", time.monotonic() - t0, "", t0)
        finally:
            writer.close()
        if not data:
            return Result(False, "empty", time.monotonic() - t0, "", t0)
        body = data.split(b"\r\n\r\n", 1)[-1].decode(errors="replace").strip()
        return Result(True, "ok", time.monotonic() - t0, body, t0)
