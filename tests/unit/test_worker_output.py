"""The line splitter of the workers' output (--log-format json) and its pipe reader."""

from __future__ import annotations

import logging
import os
import selectors

import pytest

from portshard.supervisor.output import CUT_MARKER, LineSplitter, Pipes, WorkerOutput


def test_lines_split_across_chunks_and_partial_last_line_flushed() -> None:
    s = LineSplitter()
    assert s.feed(b"one\ntw") == ["one"]
    assert s.feed(b"o\n\nthr") == ["two", ""]
    assert s.feed(b"ee") == []
    assert s.flush() == "three"
    assert s.flush() is None


def test_a_long_line_is_cut_with_a_marker_and_its_tail_dropped() -> None:
    s = LineSplitter(limit=8)
    assert s.feed(b"0123456789abc") == ["01234567" + CUT_MARKER]
    assert s.feed(b"still the same line\nnext\n") == ["next"]
    assert s.feed(b"12345678\n") == ["12345678"]  # exactly the limit: not cut
    assert s.feed(b"123456789") == ["12345678" + CUT_MARKER]
    assert s.flush() is None  # the cut tail is not a line of its own


def test_undecodable_bytes_are_replaced() -> None:
    assert LineSplitter().feed(b"a\xffb\n") == ["a\ufffdb"]


def test_reader_logs_lines_with_slot_pid_stream_and_closes_at_eof(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sel = selectors.DefaultSelector()
    out = WorkerOutput(sel)
    pipes = Pipes.create()
    out.watch(pipes, 3, 4242)
    os.write(pipes.stdout_w, b"hello\npart")
    os.write(pipes.stderr_w, b"oops\n")
    pipes.close_child_ends()
    with caplog.at_level(logging.INFO, logger="portshard.worker"):
        for _ in range(10):
            if not out.open:
                break
            for key, mask in sel.select(1.0):
                key.data(mask)
    assert not out.open and not sel.get_map()
    got = {(r.getMessage(), r.levelname, r.stream, r.slot, r.pid) for r in caplog.records}  # type: ignore[attr-defined]
    assert got == {
        ("hello", "INFO", "stdout", 3, 4242),
        ("part", "INFO", "stdout", 3, 4242),
        ("oops", "WARNING", "stderr", 3, 4242),
    }
    sel.close()
