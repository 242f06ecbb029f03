"""Put fds at hostile numbers, then place them as a worker's spawn does; print what landed.

usage: fdplace.py N SEED LAYOUT      (LAYOUT: crossing | high | reversed)

Sources are N sockets moved to chosen numbers: ``crossing`` = a random permutation of the
target range 3..N+2 itself plus the two fds in the way (an "error pipe" and a "seccomp
channel") at the leftover numbers just above it; ``high`` = where the old code moved things
(3+N+16 ..), ``reversed`` = 3..N+2 backwards. Mode ``place``: a forked child calls
place_fds(sources, keep=[pipe, channel]) and reports over the kept pipe copy. Mode ``exec``:
fork_exec() of this python with the sources, which reports its fd table on stdout.
Prints one JSON object: {"want": [...inodes], "got": [...inodes at 3..], "extra": [...]}.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import socket
import sys

from portshard.linux.exec import ExecSpec, fork_call, fork_exec, place_fds


def inode(fd: int) -> int:
    return os.fstat(fd).st_ino


def open_fds() -> list[int]:
    """Open fds, without the one listdir used to read /proc/self/fd."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue
        found.append(int(name))
    return sorted(found)


def arrange(n: int, seed: int, layout: str) -> tuple[list[int], int, int]:
    """N sockets at the layout's numbers, plus a pipe's write end and a socket in the way."""
    socks = [socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(n + 1)]
    r, w = os.pipe()
    high = [fcntl.fcntl(s.detach(), fcntl.F_DUPFD, 2000) for s in socks]
    high.append(fcntl.fcntl(w, fcntl.F_DUPFD, 2000))
    os.close(w)
    for fd in range(3, 1000):  # free every low number except the read end we keep
        if fd not in (r,) and fd < 2000:
            with contextlib.suppress(OSError):
                os.close(fd)
    r = fcntl.fcntl(r, fcntl.F_DUPFD, 3000)
    numbers = list(range(3, 3 + n + 2))
    if layout == "crossing":
        random.Random(seed).shuffle(numbers)
    elif layout == "reversed":
        numbers.reverse()
    elif layout == "high":
        numbers = [3 + n + 16 + i for i in range(n + 2)]
    placed = []
    for fd, number in zip(high, numbers, strict=True):
        os.dup2(fd, number)
        os.close(fd)
        placed.append(number)
    sources, chan, pipe_w = placed[:n], placed[n], placed[n + 1]
    os.environ["FDPLACE_R"] = str(r)
    return sources, chan, pipe_w


def main() -> None:
    n, seed, layout, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    sources, chan, pipe_w = arrange(n, seed, layout)
    want = [inode(fd) for fd in sources]
    r = int(os.environ["FDPLACE_R"])
    if mode == "place":
        expect_kept = [inode(pipe_w), inode(chan)]

        def body() -> int:
            kept = place_fds(sources, [pipe_w, chan])
            fds = open_fds()
            report = {
                "got": [inode(3 + i) for i in range(n)],
                "inheritable": [os.get_inheritable(3 + i) for i in range(n)],
                "kept": [inode(fd) for fd in kept],
                "kept_cloexec": [not os.get_inheritable(fd) for fd in kept],
                "extra": [fd for fd in fds if fd > 2 + n and fd not in kept],
            }
            os.write(kept[0], json.dumps(report).encode())
            return 0

        pid = fork_call(body)
        os.close(pipe_w)
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
        os.waitpid(pid, 0)
        report = json.loads(data)
        report["want"] = want
        report["want_kept"] = expect_kept
        print(json.dumps(report))
        return
    os.close(r)
    code = (
        "import json, os; n = int(os.environ['N']);"
        "fds = [int(x) for x in os.listdir('/proc/self/fd')];"
        "fds = [fd for fd in fds if os.path.exists(f'/proc/self/fd/{fd}')];"
        "print(json.dumps({'got': [os.fstat(3 + i).st_ino for i in range(n)],"
        "'extra': [fd for fd in fds if fd > 2 + n],"
        "'listen_pid': int(os.environ['LISTEN_PID']) == os.getpid()}))"
    )
    spec = ExecSpec(
        argv=[sys.executable, "-c", code],
        env={**os.environ, "N": str(n)},
        fds=sources,
        pid_env=("LISTEN_PID",),
    )
    sys.stdout.flush()
    pid = fork_exec(spec)
    _, status = os.waitpid(pid, 0)
    sys.stdout.flush()
    print(json.dumps({"want": want, "status": status}))


if __name__ == "__main__":
    main()
