"""The worker of steering_bench.py: a blocking accept loop answering "SLOT PID" over HTTP/1.0.

Its listening socket is fd 3 (portshard run, LISTEN_FDS) or the fd in $BENCH_FD (the bench's
own shared-queue and plain-reuseport set-ups). Its slot is $PORTSHARD_SLOT or $BENCH_SLOT.

- BENCH_SLOW=sleep|spin and BENCH_SLOW_SLOT=N: the worker of slot N sleeps (or burns the CPU)
  for BENCH_SLOW_MS (50) on every BENCH_SLOW_EVERY-th (20th) request.
- BENCH_SLOW=x3: that worker is always 3x slower (it burns twice the time each request took).
- BENCH_SLOW=hog: that worker pins itself to CPU BENCH_HOG_CPU (1), where the benchmark runs a
  CPU hog beside it.
- BENCH_BOOT=S: sleep S seconds before accepting (a slow boot: a respawn takes that long).
- BENCH_SLOW_AFTER=S: the slow worker is as fast as the others until S seconds after its first
  request (a worker that turns slow mid-run).
- BENCH_WORK_US=N: every worker burns N µs of its own CPU on each request (a request that
  does some work, so a fixed cost a connection weighs what it would in a real service).
- BENCH_HOLD=1 (steering_sweep.py --keepalive): a connection whose first message is not an
  HTTP request is kept open and each message on it answered with the slot (a long-lived
  connection, served from a selector between accepts); HTTP requests are served as above.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import time


def main() -> None:
    slot = os.environ.get("PORTSHARD_SLOT") or os.environ.get("BENCH_SLOT", "0")
    boot = float(os.environ.get("BENCH_BOOT", "0"))
    mode = os.environ.get("BENCH_SLOW", "")
    slow = bool(mode) and os.environ.get("BENCH_SLOW_SLOT") == slot
    every = int(os.environ.get("BENCH_SLOW_EVERY", "20"))
    pause = float(os.environ.get("BENCH_SLOW_MS", "50")) / 1000
    after = float(os.environ.get("BENCH_SLOW_AFTER", "0"))
    work = float(os.environ.get("BENCH_WORK_US", "0")) / 1e6
    turn = 0.0  # when it turns slow (BENCH_SLOW_AFTER after its first request)
    slow_kind = mode
    if boot:
        time.sleep(boot)
    sock = socket.socket(fileno=int(os.environ.get("BENCH_FD", "3")))
    sock.setblocking(True)
    body = f"{slot} {os.getpid()}\n".encode()
    reply = b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    served = 0
    base = 0.0  # x3: the average time a request takes this worker, without the extra burn
    if slow and mode == "hog":
        os.sched_setaffinity(0, {int(os.environ.get("BENCH_HOG_CPU", "1"))})
    hold = os.environ.get("BENCH_HOLD") == "1"
    held = selectors.DefaultSelector()
    kept: set[socket.socket] = set()  # hold: connections known to be long-lived
    if hold:
        sock.setblocking(False)
        held.register(sock, selectors.EVENT_READ)
    while True:
        if hold:  # one readable connection at a time, from the selector (never blocks)
            conn = None
            for key, _ in held.select():
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                if ready is sock:
                    with contextlib.suppress(BlockingIOError):
                        new, _ = sock.accept()
                        held.register(new, selectors.EVENT_READ)
                elif ready in kept:
                    answer_held(held, kept, ready, slot)
                elif conn is None:  # a new connection's first message (others: next turn)
                    conn = ready
            if conn is None:
                continue
            first = conn.recv(4096)
            if first and not first.startswith(b"GET"):
                conn.sendall(f"{slot}\n".encode())
                kept.add(conn)
                continue
            held.unregister(conn)
            conn.setblocking(True)
        else:
            conn, _ = sock.accept()
        began, burnt = time.monotonic(), 0.0
        if after and slow:
            turn = turn or began + after
            mode = slow_kind if began >= turn else ""
        try:
            if not hold:
                conn.recv(4096)
            served += 1
            if work:  # thread CPU, so time spent waiting for a CPU is not counted as work
                until = time.thread_time() + work
                while time.thread_time() < until:
                    pass
            if slow and mode == "x3" and base:
                burnt = 2 * base
                until = time.monotonic() + burnt
                while time.monotonic() < until:
                    pass
            if slow and mode in ("sleep", "spin") and served % every == 0:
                if mode == "spin":
                    until = time.monotonic() + pause
                    while time.monotonic() < until:
                        pass
                else:
                    time.sleep(pause)
            conn.sendall(reply)
        except OSError:
            pass
        finally:
            conn.close()
        took = time.monotonic() - began - burnt
        base = took if not base else 0.95 * base + 0.05 * took


def answer_held(
    held: selectors.BaseSelector, kept: set[socket.socket], conn: socket.socket, slot: str
) -> None:
    """A message on a long-lived connection: answer with the slot; EOF: let it go."""
    try:
        data = conn.recv(4096)
        if data:
            conn.sendall(f"{slot}\n".encode())
            kept.add(conn)
            return
    except OSError:
        pass
    held.unregister(conn)
    kept.discard(conn)
    conn.close()


if __name__ == "__main__":
    main()
