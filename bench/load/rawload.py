"""A bounded loopback load of raw TCP exchanges, for servers that do not speak HTTP (nc, echo).

Like loadgen.Load (connection per request, concurrent clients, every exchange classified), but
the request is any bytes (``request(n)`` builds the n-th, so each can carry a unique id), the
client may half-close after sending (``half_close``: nc waits for the client's EOF), and a
clean close with no reply can count as success (``reply_required=False``: nc answers nothing).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.load.loadgen import Result


def http_get(_n: int) -> bytes:
    return b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"


@dataclass
class RawLoad:
    host: str
    port: int
    request: Callable[[int], bytes] = http_get
    concurrency: int = 8
    max_requests: int = 200_000
    max_seconds: float = 60.0
    timeout: float = 5.0
    half_close: bool = False
    reply_required: bool = True
    results: list[Result] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)  # n of each exchange, parallel to results

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._numbers = itertools.count()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> RawLoad:
        self._thread.start()
        return self

    def stop(self) -> RawLoad:
        self._stop.set()
        self._thread.join(self.max_seconds + self.timeout + 5)
        assert not self._thread.is_alive(), "load generator did not stop"
        return self

    def __enter__(self) -> RawLoad:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def count(self) -> int:
        return len(self.results)

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if not r.ok]

    def by_kind(self) -> dict[str, int]:
        return dict(collections.Counter(r.kind for r in self.results))

    def wait_for(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.results) < n:
            assert time.monotonic() < deadline, f"load reached only {len(self.results)} requests"
            assert self._thread.is_alive(), "load generator stopped early"
            time.sleep(0.01)

    async def _main(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        await asyncio.gather(*(self._client(deadline) for _ in range(self.concurrency)))

    async def _client(self, deadline: float) -> None:
        while (
            not self._stop.is_set()
            and time.monotonic() < deadline
            and len(self.results) < self.max_requests
        ):
            n = next(self._numbers)
            result = await self._one(n)
            self.results.append(result)
            self.sent.append(n)

    async def _one(self, n: int) -> Result:
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
            writer.write(self.request(n))
            if self.half_close:
                await writer.drain()
                writer.write_eof()
            data = await asyncio.wait_for(reader.read(), self.timeout)
        except ConnectionResetError:
            return Result(False, "reset", time.monotonic() - t0)
        except TimeoutError:
            return Result(False, "timeout", time.monotonic() - t0)
        except OSError:
            return Result(False, "error", time.monotonic() - t0)
        finally:
            writer.close()
        if not data and self.reply_required:
            return Result(False, "empty", time.monotonic() - t0)
        body = data.split(b"\r\n\r\n", 1)[-1].decode(errors="replace").strip()
        return Result(True, "ok", time.monotonic() - t0, body)
