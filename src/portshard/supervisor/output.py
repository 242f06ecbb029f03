"""The workers' own stdout/stderr as log records (``--log-format json``).

Design note: in JSON mode each worker gets a pipe for stdout and one for stderr (made here,
the write ends placed on 1 and 2 in the child by ``spawn``, closed in the supervisor right
after); the read ends are non-blocking and sit in the supervisor's selector. Each readable
event reads at most ``_READS_PER_EVENT`` chunks, so a worker that writes faster than we read
only fills its pipe (and then blocks in write(2), its own affair) and never holds the loop.
Lines are split on newlines and capped at ``MAX_LINE`` bytes (the rest of an overlong line is
cut, with a marker); a partial last line is flushed at EOF. A read end closes at EOF, which
comes once the worker and every child that inherited the pipe have exited. Each line becomes
a record of the ``portshard.worker`` logger: INFO for stdout, WARNING for stderr, with
``slot``, ``pid`` and ``stream`` fields (the JSON formatter writes them). In text mode none
of this exists: workers inherit the supervisor's stdout and stderr.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
from dataclasses import dataclass

__all__ = ["CUT_MARKER", "MAX_LINE", "LineSplitter", "Pipes", "WorkerOutput"]

log = logging.getLogger("portshard.worker")

MAX_LINE = 16 * 1024  # bytes of one line kept; the rest is cut
CUT_MARKER = " [cut: line longer than 16 KiB]"
_CHUNK = 65536
_READS_PER_EVENT = 4  # then back to the loop; the selector reports the pipe again


class LineSplitter:
    """Bytes in, complete lines out (without the newline), each at most ``limit`` bytes; a
    longer line is cut there, marked, and the rest up to its newline dropped."""

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._dropping = False  # inside the tail of a line already cut

    def feed(self, data: bytes) -> list[str]:
        lines: list[str] = []
        start = 0
        while start < len(data):
            end = data.find(b"\n", start)
            piece = data[start:] if end < 0 else data[start:end]
            if not self._dropping:
                room = self.limit - len(self._buf)
                self._buf += piece[:room]
                if len(piece) > room:
                    lines.append(self._take() + CUT_MARKER)
                    self._dropping = True
            if end < 0:
                break
            if self._dropping:
                self._dropping = False
            else:
                lines.append(self._take())
            start = end + 1
        return lines

    def flush(self) -> str | None:
        """The partial last line (at EOF), if any."""
        self._dropping = False
        return self._take() if self._buf else None

    def _take(self) -> str:
        text = self._buf.decode(errors="replace")
        self._buf.clear()
        return text


@dataclass(frozen=True)
class Pipes:
    """The child's ends (placed on 1 and 2) and ours."""

    stdout_w: int
    stderr_w: int
    stdout_r: int
    stderr_r: int

    @classmethod
    def create(cls) -> Pipes:
        out_r, out_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        err_r, err_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        # Only our ends are non-blocking: the worker's writes block when the pipe is full.
        os.set_blocking(out_w, True)
        os.set_blocking(err_w, True)
        return cls(out_w, err_w, out_r, err_r)

    def close_child_ends(self) -> None:
        os.close(self.stdout_w)
        os.close(self.stderr_w)

    def close_all(self) -> None:
        for fd in (self.stdout_w, self.stderr_w, self.stdout_r, self.stderr_r):
            with contextlib.suppress(OSError):
                os.close(fd)


class WorkerOutput:
    """Every open read end, with its reader; ``close`` at supervisor exit."""

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self.sel = selector
        self.open: dict[int, _Reader] = {}

    def watch(self, pipes: Pipes, slot: int, pid: int) -> None:
        self.adopt(pipes.stdout_r, slot, pid, "stdout")
        self.adopt(pipes.stderr_r, slot, pid, "stderr")

    def adopt(self, fd: int, slot: int, pid: int, stream: str) -> None:
        """Read ``fd`` (a read end of a worker's ``stream``) from now on: a new worker's, or
        one a previous supervisor read (issue 15: an upgrade, an adoption)."""
        level = logging.INFO if stream == "stdout" else logging.WARNING
        reader = _Reader(self, fd, {"slot": slot, "pid": pid, "stream": stream}, level)
        self.sel.register(fd, selectors.EVENT_READ, reader.on_readable)
        self.open[fd] = reader

    def keys(self) -> dict[str, int]:
        """Every read end by its handoff key (``out:PID:STREAM``)."""
        return {f"out:{r.fields['pid']}:{r.fields['stream']}": fd for fd, r in self.open.items()}

    def done(self, fd: int) -> None:
        self.sel.unregister(fd)
        del self.open[fd]
        os.close(fd)

    def close(self) -> None:
        """At supervisor exit: log what is still in the pipes (a last line written just
        before the worker exited may not have been read yet), then close them."""
        for fd, reader in list(self.open.items()):
            with contextlib.suppress(OSError):
                reader.on_readable(0)  # reads up to EOF or EAGAIN
            if fd in self.open:
                tail = reader.lines.flush()
                if tail is not None:
                    reader.emit(tail)
                self.done(fd)


class _Reader:
    def __init__(self, owner: WorkerOutput, fd: int, fields: dict[str, object], level: int) -> None:
        self.owner = owner
        self.fd = fd
        self.fields = fields
        self.level = level
        self.lines = LineSplitter()

    def on_readable(self, _mask: int) -> None:
        for _ in range(_READS_PER_EVENT):
            try:
                data = os.read(self.fd, _CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                tail = self.lines.flush()
                if tail is not None:
                    self.emit(tail)
                self.owner.done(self.fd)
                return
            for line in self.lines.feed(data):
                self.emit(line)

    def emit(self, line: str) -> None:
        log.log(self.level, "%s", line, extra=self.fields)
