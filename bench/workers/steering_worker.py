"""The worker of steering_bench.py: a blocking accept loop answering "SLOT PID" over HTTP/1.0.

Its listening socket is fd 3 (portshard run, LISTEN_FDS) or the fd in $BENCH_FD (the bench's
own shared-queue and plain-reuseport set-ups). Its slot is $PORTSHARD_SLOT or $BENCH_SLOT.

- BENCH_SLOW=sleep|spin and BENCH_SLOW_SLOT=N: the worker of slot N sleeps (or burns the CPU)
  for BENCH_SLOW_MS (50) on every BENCH_SLOW_EVERY-th (20th) request.
- BENCH_SLOW=x3: that worker is always 3x slower (it burns twice the time each request took).
- BENCH_SLOW=hog: that worker pins itself to CPU BENCH_HOG_CPU (1), where the benchmark runs a
  CPU hog beside it.
- BENCH_BOOT=S: sleep S seconds before accepting (a slow boot: a respawn takes that long).
- BENCH_HOLD=1 (steering_sweep.py --keepalive): a connection whose first message is not an
  HTTP request is kept open and each message on it answered with the slot (a long-lived
  connection, served from a selector between accepts); HTTP requests are served as above.
"""

from __future__ import annotations

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
    if hold:
        sock.setblocking(False)
        held.register(sock, selectors.EVENT_READ)
    while True:
        if hold:
            conn = None
            for key, _ in held.select():
                if key.fileobj is not sock:
                    answer_held(held, key.fileobj, slot)  # type: ignore[arg-type]
                    continue
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    continue
            if conn is None:
                continue
            conn.setblocking(True)
        else:
            conn, _ = sock.accept()
        began, burnt = time.monotonic(), 0.0
        try:
            first = conn.recv(4096)
            if hold and not first.startswith(b"GET"):
                conn.sendall(f"{slot}\n".encode())
                held.register(conn, selectors.EVENT_READ)
                conn = None
                continue
            served += 1
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
            if conn is not None:
                conn.close()
        if conn is None:
            continue
        took = time.monotonic() - began - burnt
        base = took if not base else 0.95 * base + 0.05 * took


def answer_held(held: selectors.BaseSelector, conn: socket.socket, slot: str) -> None:
    """A message on a long-lived connection: answer with the slot; EOF: let it go."""
    try:
        data = conn.recv(4096)
        if data:
            conn.sendall(f"{slot}\n".encode())
            return
    except OSError:
        pass
    held.unregister(conn)
    conn.close()


if __name__ == "__main__":
    main()
