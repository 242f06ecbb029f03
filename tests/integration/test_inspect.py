"""portshard.linux (tcpinfo, sockdiag, waiting, proc) against the real kernel: loopback sockets
on port 0, real child processes."""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from portshard import errors
from portshard.address import Proto
from portshard.linux import proc as linux_proc
from portshard.linux import sockdiag, tcpinfo, waiting
from tests.conftest import Procs, needs_root, wait_until

PYTHON = sys.executable

# A child that takes its sockets as inherited fd numbers in argv[1:], says "ready", then does
# what its code says. (Children are tiny `python -c` programs, killed by the procs fixture.)
PRELUDE = """
import os, select, selectors, socket, sys, time
socks = [socket.socket(fileno=int(fd)) for fd in sys.argv[1:]]
def ready():
    sys.stdout.write("ready\\n"); sys.stdout.flush()
"""


def talk(procs: Procs, code: str, *args: str, **kw: Any) -> subprocess.Popen[bytes]:
    """A python child with pipes to talk to. Unbuffered, so that select() in readline() sees
    every line that has not been read yet."""
    return procs.python(code, *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, **kw)


def readline(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> str:
    """One line of the child's stdout, or fail after ``timeout`` (never hang on a dead child)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"pid {proc.pid} wrote nothing in {timeout}s (exit status {proc.poll()})"
    line = proc.stdout.readline().decode()
    assert line, f"pid {proc.pid} closed stdout (exit status {proc.poll()})"
    return line.strip()


def child(procs: Procs, code: str, *socks: socket.socket) -> subprocess.Popen[bytes]:
    fds = [str(s.fileno()) for s in socks]
    proc = talk(procs, PRELUDE + code, *fds, pass_fds=[s.fileno() for s in socks])
    assert readline(proc) == "ready"
    return proc


def command(proc: subprocess.Popen[bytes], line: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(line.encode() + b"\n")
    proc.stdin.flush()


def wchan(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return ""


@pytest.fixture
def other_listener() -> Iterator[socket.socket]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock


@pytest.fixture
def udp() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock


def connect(sock: socket.socket) -> socket.socket:
    return socket.create_connection(sock.getsockname()[:2], timeout=5)


# --- queue_depth -------------------------------------------------------------------------------


def somaxconn() -> int:
    return int(Path("/proc/sys/net/core/somaxconn").read_text())


def test_queue_depth_counts_connections_nobody_accepts(listener: socket.socket) -> None:
    assert tcpinfo.queue_depth(listener) == tcpinfo.QueueDepth(queued=0, backlog=16)
    clients = [connect(listener) for _ in range(3)]
    try:
        wait_until(lambda: tcpinfo.queue_depth(listener).queued == 3, what="3 queued")
        assert tcpinfo.queue_depth_fd(listener.fileno()) == tcpinfo.QueueDepth(3, 16)
        conn, _ = listener.accept()
        conn.close()
        assert tcpinfo.queue_depth(listener).queued == 2
    finally:
        for c in clients:
            c.close()


@pytest.mark.parametrize("requested", [1, 7, 128, "somaxconn+100"])
def test_backlog_is_the_requested_one_capped_at_somaxconn(requested: int | str) -> None:
    limit = somaxconn()
    n = limit + 100 if requested == "somaxconn+100" else int(requested)
    with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET) as sock:
        sock.bind(("::1" if socket.has_ipv6 else "127.0.0.1", 0))
        sock.listen(n)
        assert tcpinfo.queue_depth(sock).backlog == min(n, limit)
        assert tcpinfo.queue_depth_fd(sock.fileno()).backlog == min(n, limit)


def test_queue_depth_refuses_sockets_without_an_accept_queue(
    listener: socket.socket, udp: socket.socket
) -> None:
    with (
        socket.socket() as fresh,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix,
        connect(listener) as client,
    ):
        for sock, why in [
            (udp, "not a TCP socket"),
            (unix, "not a TCP socket"),
            (fresh, "state CLOSE"),
            (client, "state ESTABLISHED"),
        ]:
            with pytest.raises(errors.NotListening, match=why):
                tcpinfo.queue_depth(sock)
            with pytest.raises(errors.NotListening, match=why):
                tcpinfo.queue_depth_fd(sock.fileno())


def test_queue_depth_sees_a_listener_that_was_shut_down() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        sock.shutdown(socket.SHUT_RDWR)
        with pytest.raises(errors.NotListening, match="replace it"):
            tcpinfo.queue_depth(sock)


# --- socket_inode, listening_sockets_of ---------------------------------------------------------


def test_socket_inode_is_the_name_in_proc(listener: socket.socket, udp: socket.socket) -> None:
    fd = listener.fileno()
    inode = tcpinfo.socket_inode(listener)
    assert inode == tcpinfo.socket_inode(fd) == os.stat(f"/proc/self/fd/{fd}").st_ino
    assert os.readlink(f"/proc/self/fd/{fd}") == f"socket:[{inode}]"
    mine = sockdiag.listening_sockets_of(os.getpid())
    assert {inode, tcpinfo.socket_inode(udp)} <= mine
    with socket.socket() as fresh, connect(listener) as client:
        assert tcpinfo.socket_inode(fresh) not in sockdiag.listening_sockets_of(os.getpid())
        assert tcpinfo.socket_inode(client) not in sockdiag.listening_sockets_of(os.getpid())
    r, w = os.pipe()
    try:
        with pytest.raises(errors.InspectError, match="not a socket"):
            tcpinfo.socket_inode(r)
    finally:
        os.close(r)
        os.close(w)


# --- connections_of, alive ----------------------------------------------------------------------

HOLD = """
listener = socket.socket(); listener.bind(("127.0.0.1", 0)); listener.listen()
print(listener.getsockname()[1], flush=True)
ready()
conns = []
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "accept":
        conns.append(listener.accept()[0])
    elif cmd[0] == "dial":  # an outgoing connection, as to a database
        conns.append(socket.create_connection(("127.0.0.1", int(cmd[1]))))
    elif cmd[0] == "close":
        for c in conns:
            c.close()
        conns = []
    elif cmd[0] == "send":  # an answer (or a banner) on connection N
        conns[int(cmd[1])].sendall(b"answer")
    elif cmd[0] == "recv":  # what has come on connection N (its FIN unread)
        conns[int(cmd[1])].recv(4096)
    elif cmd[0] == "read":  # everything up to the client's FIN on connection N
        while conns[int(cmd[1])].recv(4096):
            pass
    print("done", flush=True)
"""


def test_connections_of_counts_held_connections(
    procs: Procs, other_listener: socket.socket
) -> None:
    proc = talk(procs, PRELUDE + HOLD)
    port = int(readline(proc))
    assert readline(proc) == "ready"
    assert sockdiag.connections_of(proc.pid) == 0
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    try:
        for _ in clients:
            command(proc, "accept")
            assert readline(proc) == "done"
        assert sockdiag.connections_of(proc.pid) == 2
        assert sockdiag.connections_of(proc.pid, ports={port}) == 2
        # Our own ends of the two connections are ours, not the child's.
        both = sockdiag.connections_by_pid([proc.pid, os.getpid()], ports={port})
        assert both == {proc.pid: 2, os.getpid(): 0}
        assert sockdiag.connections_by_pid([proc.pid, os.getpid()])[os.getpid()] == 2

        # A client that half-closes leaves the server in CLOSE_WAIT: still a connection.
        clients[0].shutdown(socket.SHUT_WR)
        wait_until(lambda: b"\x08" in _states_of(proc.pid), what="CLOSE_WAIT")
        assert sockdiag.connections_of(proc.pid) == 2

        # The worker's own outgoing connection counts, unless we ask about the served port.
        command(proc, f"dial {other_listener.getsockname()[1]}")
        assert readline(proc) == "done"
        assert sockdiag.connections_of(proc.pid) == 3
        assert sockdiag.connections_of(proc.pid, ports={port}) == 2

        command(proc, "close")
        assert readline(proc) == "done"
        assert sockdiag.connections_of(proc.pid) == 0
        assert linux_proc.alive(proc.pid)
    finally:
        for c in clients:
            c.close()


def test_readiness_walks_the_connection_table_only_for_sockets_it_has_not_seen(
    procs: Procs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A starting worker whose tree holds sockets besides its listeners (node cluster's IPC
    channels: Unix sockets) made every readiness look walk the host's connection hash (60 ms
    each with ~120k TIME_WAIT sockets). Sockets a walk found not to be connections on the
    served ports are not walked for again; a connection it accepts later is a new socket,
    and is found."""
    proc = talk(procs, PRELUDE + "pair = socket.socketpair()\n" + HOLD)
    port = int(readline(proc))
    assert readline(proc) == "ready"
    listeners = sockdiag.listening_sockets_of(proc.pid, ports={port})
    assert len(listeners) == 1
    others = set(linux_proc.socket_fds(proc.pid).values()) - listeners
    assert len(others) == 2  # the socketpair
    walks = []
    real = sockdiag._tables

    def counted(*args: Any) -> Any:
        walks.append(args)
        return real(*args)

    monkeypatch.setattr(sockdiag, "_tables", counted)
    seen: set[int] = set()

    def ready() -> bool:
        return waiting.tree_waiting_for_work(proc.pid, listeners, ports={port}, seen=seen)

    assert not ready()  # blocked on stdin, not on its listener, and holding no connection
    assert (len(walks), seen) == (1, others)
    assert not ready()
    assert not ready()
    assert len(walks) == 1  # nothing new: no walk
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        command(proc, "accept")
        assert readline(proc) == "done"
        assert ready()  # it holds what it accepted: a new socket, walked for and found
        assert len(walks) == 2
        assert seen == others
        command(proc, "close")
        assert readline(proc) == "done"
    assert not ready()
    assert len(walks) == 2
    for _ in range(2):  # without what it saw: a walk every look, as before
        assert not waiting.tree_waiting_for_work(proc.pid, listeners, ports={port})
    assert len(walks) == 4


def test_the_freeze_check_walks_only_for_sockets_it_has_not_seen(
    procs: Procs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for the freeze-check (it walks once per look, the worker frozen meanwhile): a
    connection held since the last look is a new socket, walked for and found, and counts
    until it is closed."""
    proc = talk(procs, PRELUDE + "pair = socket.socketpair()\n" + HOLD)
    port = int(readline(proc))
    assert readline(proc) == "ready"
    listeners = sockdiag.listening_sockets_of(proc.pid, ports={port})
    walks = []
    real = sockdiag._held_less_leftovers

    def counted(*args: Any) -> Any:
        walks.append(args)
        return real(*args)

    monkeypatch.setattr(sockdiag, "_held_less_leftovers", counted)
    seen: set[int] = set()

    def held() -> int:
        return sockdiag.held_connections(proc.pid, listeners, {port}, seen=seen)

    assert (held(), held(), len(walks)) == (0, 0, 1)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        command(proc, "accept")
        assert readline(proc) == "done"
        assert (held(), held(), len(walks)) == (1, 1, 3)  # held: walked each look
        client.sendall(b"request")
        client.shutdown(socket.SHUT_WR)
        command(proc, "read 0")  # its client half-closed and waits for its answer
        assert readline(proc) == "done"
        assert held() == 1
        command(proc, "close")
        assert readline(proc) == "done"
    assert (held(), len(walks)) == (0, 4)


def test_the_freeze_check_leaves_out_answered_keep_alive_leftovers(procs: Procs) -> None:
    """A CLOSE_WAIT connection whose server answered after the last request (hypercorn keeps
    these until its keep-alive timeout) is not held for the freeze-check; one whose client
    half-closed and still waits for its answer is, before and after a banner."""
    proc = talk(procs, PRELUDE + HOLD)
    port = int(readline(proc))
    assert readline(proc) == "ready"

    def do(cmd: str) -> None:
        command(proc, cmd)
        assert readline(proc) == "done"

    def held() -> tuple[int, int]:  # (every connection, what a retiring worker could lose)
        return (
            sockdiag.held_by_members([proc.pid], set(), {port}),
            sockdiag.held_connections(proc.pid, set(), {port}),
        )

    waiting = socket.create_connection(("127.0.0.1", port), timeout=5)  # nc -N
    answered = socket.create_connection(("127.0.0.1", port), timeout=5)
    banner = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        for _ in range(3):
            do("accept")
        waiting.sendall(b"request")
        waiting.shutdown(socket.SHUT_WR)
        do("read 0")
        answered.sendall(b"request")
        do("recv 1")
        assert held() == (3, 3)  # connection 2 is ESTABLISHED: its client may still ask
        do("send 1")
        assert answered.recv(100) == b"answer"
        assert held() == (3, 3)  # answered, and its client may still ask again
        answered.shutdown(socket.SHUT_WR)  # it will not: CLOSE_WAIT, its FIN not read
        wait_until(lambda: _states_of(proc.pid).count(b"\x08") == 2, what="CLOSE_WAIT")
        assert held() == (3, 2)  # the answered leftover cannot lose anything
        do("send 2")  # the server speaks first
        assert banner.recv(100) == b"answer"
        time.sleep(0.05)  # beyond the kernel's tick (4 ms at HZ=250)
        banner.sendall(b"request")
        banner.shutdown(socket.SHUT_WR)
        do("read 2")
        assert held() == (3, 2)  # received after it last sent: waits for its answer
        do("send 2")
        assert held() == (3, 1)
        assert sockdiag.connections_of(proc.pid) == 3
    finally:
        for c in (waiting, answered, banner):
            c.close()


def _states_of(pid: int) -> bytes:
    """TCP states (as bytes) of the connections in pid's fd table, read independently."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            inodes.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:  # the listing's own fd, closed by now
            continue
    states = bytearray()
    for name in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]:
            cols = line.split()
            if f"socket:[{cols[9]}]" in inodes:
                states.append(int(cols[3], 16))
    return bytes(states)


def test_an_exited_process_holds_nothing_and_is_not_alive(
    procs: Procs, listener: socket.socket
) -> None:
    proc = child(procs, "ready(); conn = socks[0].accept()[0]; sys.stdin.readline()", listener)
    client = connect(listener)
    try:
        wait_until(lambda: sockdiag.connections_of(proc.pid) == 1, what="1 connection")
        assert linux_proc.alive(proc.pid)
        proc.kill()
        # Not reaped yet: a zombie, which holds no fd.
        wait_until(lambda: not linux_proc.alive(proc.pid), what="the child to die")
        assert sockdiag.connections_of(proc.pid) == 0
        assert sockdiag.connections_by_pid([proc.pid, os.getpid()]) == {proc.pid: 0, os.getpid(): 1}
        assert sockdiag.listening_sockets_of(proc.pid) == set()
        assert not waiting.waiting_for_work(proc.pid, {tcpinfo.socket_inode(listener)})
        proc.wait(timeout=10)
        assert not linux_proc.alive(proc.pid)
        assert sockdiag.connections_of(proc.pid) == 0
        assert not waiting.waiting_for_work(proc.pid, {tcpinfo.socket_inode(listener)})
    finally:
        client.close()


def test_a_process_is_dying_once_killed_even_before_it_is_reaped(procs: Procs) -> None:
    # A retired worker's reap names what of its tree still ran: not what is already going.
    proc = procs.python("import sys; sys.stdin.readline()", stdin=subprocess.PIPE)
    wait_until(lambda: linux_proc.stat(proc.pid) is not None, what="the child")
    assert not linux_proc.dying(proc.pid)
    proc.kill()
    wait_until(lambda: linux_proc.dying(proc.pid), what="the child dying")  # a zombie now
    proc.wait(timeout=10)
    assert linux_proc.dying(proc.pid)  # gone


# --- waiting_for_work ---------------------------------------------------------------------------


def waits(proc: subprocess.Popen[bytes], sock: socket.socket) -> bool:
    return waiting.waiting_for_work(proc.pid, {tcpinfo.socket_inode(sock)})


def test_a_sleeping_holder_is_not_waiting(procs: Procs, listener: socket.socket) -> None:
    proc = child(procs, "ready(); time.sleep(600)", listener)
    wait_until(lambda: "nanosleep" in wchan(proc.pid), what="the child to sleep")
    assert not waits(proc, listener)


@pytest.mark.parametrize(
    "code",
    [
        "ready(); socks[0].accept()",
        "sel = selectors.EpollSelector(); sel.register(socks[0], selectors.EVENT_READ)\n"
        "ready(); sel.select()",
        "sel = selectors.DefaultSelector(); sel.register(socks[0], selectors.EVENT_READ)\n"
        "ready(); sel.select()",
        "sel = selectors.PollSelector(); sel.register(socks[0], selectors.EVENT_READ)\n"
        "ready(); sel.select()",
        "ready(); select.select([sys.stdin, socks[0]], [], [])",
        # epoll inside epoll, the socket registered in the inner one only
        "inner = select.epoll(); inner.register(socks[0], select.EPOLLIN)\n"
        "outer = select.epoll(); outer.register(inner.fileno(), select.EPOLLIN)\n"
        "ready(); outer.poll()",
        # the waiting thread is not the main thread
        "import threading; t = threading.Thread(target=socks[0].accept); t.start()\n"
        "ready(); time.sleep(600)",
    ],
    ids=["accept", "epoll", "default-selector", "poll", "select", "nested-epoll", "thread"],
)
def test_a_process_blocked_on_its_socket_is_waiting(
    procs: Procs, listener: socket.socket, code: str
) -> None:
    proc = child(procs, code, listener)
    wait_until(lambda: waits(proc, listener), what="waiting_for_work")


@pytest.mark.parametrize(
    "code",
    [
        "ready(); socks[1].accept()",
        "sel = selectors.EpollSelector(); sel.register(socks[1], selectors.EVENT_READ)\n"
        "ready(); sel.select()",
        "sel = selectors.PollSelector(); sel.register(socks[1], selectors.EVENT_READ)\n"
        "ready(); sel.select()",
        "ready(); select.select([socks[1]], [], [])",
        # registered, but with EPOLLIN switched off (a server that paused accepting)
        "ep = select.epoll(); ep.register(socks[0], 0); ep.register(socks[1], select.EPOLLIN)\n"
        "ready(); ep.poll()",
    ],
    ids=["accept", "epoll", "poll", "select", "epoll-paused"],
)
def test_waiting_on_a_different_socket_is_not_waiting_on_ours(
    procs: Procs, listener: socket.socket, other_listener: socket.socket, code: str
) -> None:
    proc = child(procs, code, listener, other_listener)
    wait_until(lambda: waits(proc, other_listener), what="the child to wait on the other socket")
    assert not waits(proc, listener)
    assert sockdiag.listening_sockets_of(proc.pid) == {
        tcpinfo.socket_inode(listener),
        tcpinfo.socket_inode(other_listener),
    }


def test_a_udp_receiver_is_waiting(procs: Procs, udp: socket.socket) -> None:
    proc = child(procs, "ready(); socks[0].recvfrom(2048)", udp)
    wait_until(lambda: waits(proc, udp), what="waiting in recvfrom")
    assert sockdiag.listening_sockets_of(proc.pid) == {tcpinfo.socket_inode(udp)}


def idle_frozen(proc: subprocess.Popen[bytes], sock: socket.socket, settle: str) -> bool:
    """Wait until the child is in ``settle`` (a wchan word), stop it, and ask whether its
    stopped tree holds no datagram."""
    wait_until(lambda: settle in wchan(proc.pid), what=f"the child in {settle}")
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: linux_proc.tree_stopped(proc.pid, None), what="stopped")
        return waiting.tree_idle_for_datagrams(proc.pid, {tcpinfo.socket_inode(sock)})
    finally:
        os.kill(proc.pid, signal.SIGCONT)


@pytest.mark.parametrize(
    ("code", "settle", "idle"),
    [
        ("ready(); socks[0].recvfrom(2048)", "wait", True),
        # asyncio with nothing pending waits with no timeout; with a task's timer it has one
        ("sel = selectors.EpollSelector(); sel.register(socks[0], selectors.EVENT_READ)\n"
         "ready(); sel.select()", "epoll_wait", True),
        ("sel = selectors.EpollSelector(); sel.register(socks[0], selectors.EVENT_READ)\n"
         "ready()\nwhile True: sel.select(0.5)", "epoll_wait", False),
        ("sel = selectors.EpollSelector(); sel.register(socks[0], selectors.EVENT_READ)\n"
         "ready(); sel.select(600)", "epoll_wait", True),
        ("ready(); select.select([socks[0]], [], [])", "poll_schedule", True),
        # a datagram in hand: computing (sleeping) or waiting elsewhere
        ("ready(); time.sleep(600)", "nanosleep", False),
        ("ready(); sys.stdin.read()", "pipe_read", False),
        # one thread waits, another holds one
        ("import threading; threading.Thread(target=socks[0].recvfrom, args=(9,)).start()\n"
         "ready(); time.sleep(600)", "nanosleep", False),
    ],
    ids=["recvfrom", "epoll", "epoll-timer", "epoll-far-timer", "select", "sleep", "stdin",
         "thread"],
)  # fmt: skip
def test_a_frozen_udp_receiver_is_idle_only_waiting_for_a_datagram(
    procs: Procs, udp: socket.socket, code: str, settle: str, idle: bool
) -> None:
    proc = child(procs, code, udp)
    assert idle_frozen(proc, udp, settle) is idle


def test_a_stopped_process_is_not_waiting(procs: Procs, listener: socket.socket) -> None:
    proc = child(procs, "ready(); socks[0].accept()", listener)
    wait_until(lambda: waits(proc, listener), what="waiting in accept")
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: not waits(proc, listener), what="stopped")
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    wait_until(lambda: waits(proc, listener), what="waiting again after SIGCONT")


def test_a_poll_restarted_after_sigstop_is_still_waiting(
    procs: Procs, listener: socket.socket
) -> None:
    code = "p = select.poll(); p.register(socks[0], select.POLLIN); ready(); p.poll(600_000)"
    proc = child(procs, code, listener)
    wait_until(lambda: waits(proc, listener), what="waiting in poll")
    os.kill(proc.pid, signal.SIGSTOP)
    wait_until(lambda: "do_signal_stop" in wchan(proc.pid), what="stopped")
    os.kill(proc.pid, signal.SIGCONT)
    restart = {"x86_64": "219", "aarch64": "128"}.get(os.uname().machine)
    if restart is not None:
        syscall = Path(f"/proc/{proc.pid}/syscall")
        wait_until(lambda: syscall.read_text().split()[0] == restart, what="restart_syscall")
    wait_until(lambda: waits(proc, listener), what="waiting in the restarted poll")


def test_poll_on_a_pipe_while_holding_the_socket_is_not_waiting(
    procs: Procs, listener: socket.socket
) -> None:
    code = "p = select.poll(); p.register(sys.stdin, select.POLLIN); ready(); p.poll()"
    proc = child(procs, code, listener)
    wait_until(lambda: "poll" in wchan(proc.pid), what="the child to poll")
    # /proc/PID/mem shows the pollfd array: the socket is held but not polled.
    assert not waits(proc, listener)


def test_python_http_server(procs: Procs, tmp_path: Path) -> None:
    proc = procs.start(
        [PYTHON, "-m", "http.server", "0", "--bind", "127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    inodes = wait_until(lambda: sockdiag.listening_sockets_of(proc.pid), what="http.server")
    assert len(inodes) == 1
    wait_until(lambda: waiting.waiting_for_work(proc.pid, inodes), what="http.server ready")
    (inode,) = inodes
    port = _port_of(proc.pid, inode)
    assert [h.pid for h in sockdiag.port_holders(Proto.TCP, port)] == [proc.pid]
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        wait_until(lambda: sockdiag.connections_of(proc.pid) == 1, what="1 connection")
    wait_until(lambda: sockdiag.connections_of(proc.pid) == 0, what="the connection to close")


def _port_of(pid: int, inode: int) -> int:
    """The local port of socket ``inode``, read from /proc/PID/net/tcp."""
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if int(cols[9]) == inode:
            return int(cols[1].rsplit(":", 1)[1], 16)
    raise AssertionError(f"inode {inode} of pid {pid} not in /proc/{pid}/net/tcp")


NODE_SERVER = "require('http').createServer((q, r) => r.end('ok')).listen(0, '127.0.0.1')"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_http_server(procs: Procs) -> None:
    node = shutil.which("node")
    assert node is not None
    proc = procs.start([node, "-e", NODE_SERVER], stdout=subprocess.DEVNULL)
    inodes = wait_until(lambda: sockdiag.listening_sockets_of(proc.pid), what="node to listen")
    wait_until(lambda: waiting.waiting_for_work(proc.pid, inodes), what="node ready", timeout=20)
    with socket.socket() as elsewhere:
        elsewhere.bind(("127.0.0.1", 0))
        elsewhere.listen()
        assert not waiting.waiting_for_work(proc.pid, {tcpinfo.socket_inode(elsewhere)})


# --- port_holders -------------------------------------------------------------------------------

BIND = """
import socket, sys
family = socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET
kind = socket.SOCK_DGRAM if sys.argv[2] == "udp" else socket.SOCK_STREAM
sock = socket.socket(family, kind)
sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
if kind == socket.SOCK_STREAM:
    sock.listen()
print(sock.getsockname()[1], flush=True)
sys.stdin.readline()
"""


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("proto", [Proto.TCP, Proto.UDP])
@pytest.mark.parametrize("version", ["4", "6"])
def test_port_holders_finds_the_child(procs: Procs, version: str, proto: Proto) -> None:
    if version == "6" and not _ipv6_loopback():
        pytest.skip("no IPv6 loopback")
    proc = talk(procs, BIND, version, proto.value)
    port = int(readline(proc))
    (holder,) = sockdiag.port_holders(proto, port)
    assert holder.pid == proc.pid
    assert holder.program == os.path.basename(PYTHON)[:15]
    assert holder.uid == os.geteuid()
    assert holder.local == (f"[::1]:{port}" if version == "6" else f"127.0.0.1:{port}")
    assert holder.inode in sockdiag.listening_sockets_of(proc.pid)
    assert f"pid {proc.pid}" in holder.describe()


def test_port_sockets_from_sock_diag_match_proc_net(monkeypatch: pytest.MonkeyPatch) -> None:
    """port_sockets asks sock_diag (the listening hash alone, not every TIME_WAIT socket of
    /proc/net/tcp); its answer must be the /proc fallback's: inodes, uids, addresses in both
    families, dual-stack and IPv6-only, TCP listeners and unconnected UDP sockets."""
    six = _ipv6_loopback()
    socks: list[socket.socket] = []

    def bound(family: int, kind: int, host: str, port: int, v6only: int | None = None) -> int:
        sock = socket.socket(family, kind)
        socks.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if v6only is not None:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen()
        port: int = sock.getsockname()[1]
        return port

    try:
        tcp = bound(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", 0)
        bound(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.2", tcp)
        client = socket.create_connection(("127.0.0.1", tcp))  # a connection: not listed
        socks.append(client)
        udp = bound(socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1", 0)
        if six:
            bound(socket.AF_INET6, socket.SOCK_STREAM, "::1", tcp, v6only=1)
            bound(socket.AF_INET6, socket.SOCK_DGRAM, "::", udp, v6only=0)
        diag = {
            proto: sorted(sockdiag._diag_port_sockets(proto, port))
            for proto, port in [(Proto.TCP, tcp), (Proto.UDP, udp)]
        }

        def no_diag(*_: object) -> list[tuple[int, int, str]]:
            raise sockdiag._NoDiag("the test's fallback")

        monkeypatch.setattr(sockdiag, "_diag_port_sockets", no_diag)
        proc_net = {
            proto: sorted(sockdiag.port_sockets(proto, port))
            for proto, port in [(Proto.TCP, tcp), (Proto.UDP, udp)]
        }
        assert diag == proc_net
        me = os.geteuid()
        mine = {tcpinfo.socket_inode(s) for s in socks}
        assert {(uid, local) for inode, uid, local in diag[Proto.TCP] if inode in mine} == {
            (me, f"127.0.0.1:{tcp}"),
            (me, f"127.0.0.2:{tcp}"),
            *([(me, f"[::1]:{tcp}")] if six else []),
        }
        assert {(uid, local) for inode, uid, local in diag[Proto.UDP] if inode in mine} == {
            (me, f"127.0.0.1:{udp}"),
            *([(me, f"[::]:{udp}")] if six else []),
        }
    finally:
        for sock in socks:
            sock.close()


# --- the two socket tables ----------------------------------------------------------------------


def test_sock_diag_and_proc_net_agree(listener: socket.socket, udp: socket.socket) -> None:
    """connections_of and listening_sockets_of read sock_diag in our own network namespace and
    /proc/PID/net in another one: both must tell the same story."""
    client = connect(listener)
    server, _ = listener.accept()
    client.shutdown(socket.SHUT_WR)  # server side: CLOSE_WAIT
    try:
        wait_until(lambda: b"\x08" in _states_of(os.getpid()), what="CLOSE_WAIT")
        mine = {tcpinfo.socket_inode(s) for s in (listener, udp, client, server)}
        for proto, states in [
            (socket.IPPROTO_TCP, sockdiag._TCPF_LISTEN | sockdiag._TCPF_CONNECTED),
            (socket.IPPROTO_UDP, sockdiag._TCPF_CLOSE),
        ]:
            diag = {row for row in sockdiag._diag_dump(proto, states) if row[2] in mine}
            proc = {row for row in sockdiag._proc_net(os.getpid(), proto, states) if row[2] in mine}
            assert diag == proc
            assert diag
    finally:
        client.close()
        server.close()


NETNS_CHILD = """
import socket, sys
tcp = socket.socket(); tcp.bind(("127.0.0.1", 0)); tcp.listen()
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind(("127.0.0.1", 0))
client = socket.create_connection(tcp.getsockname())
server, _ = tcp.accept()
print(tcp.fileno(), udp.fileno(), flush=True)
sys.stdin.readline()
"""


@needs_root
@pytest.mark.skipif(not (shutil.which("unshare") and shutil.which("ip")), reason="no unshare/ip")
def test_a_process_in_another_network_namespace(procs: Procs) -> None:
    script = 'ip link set lo up && exec "$0" -c "$1"'
    proc = procs.start(
        ["unshare", "--net", "sh", "-c", script, PYTHON, NETNS_CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        bufsize=0,
    )
    tcp_fd, udp_fd = (int(fd) for fd in readline(proc).split())
    inodes = {
        int(os.readlink(f"/proc/{proc.pid}/fd/{fd}")[len("socket:[") : -1])
        for fd in (tcp_fd, udp_fd)
    }
    assert sockdiag.listening_sockets_of(proc.pid) == inodes
    assert sockdiag.connections_of(proc.pid) == 2  # both ends of its own connection


NOSY = """
import os, pwd, sys
from portshard import errors  # import first: nobody may not read the venv
from portshard.linux import sockdiag, waiting
nobody = pwd.getpwnam("nobody")
os.setgroups([])
os.setresgid(nobody.pw_gid, nobody.pw_gid, nobody.pw_gid)
os.setresuid(nobody.pw_uid, nobody.pw_uid, nobody.pw_uid)
pid, inode = int(sys.argv[1]), int(sys.argv[2])
for call in (lambda: sockdiag.connections_of(pid), lambda: waiting.waiting_for_work(pid, {inode})):
    try:
        call()
    except errors.NoAccess as exc:
        assert isinstance(exc, PermissionError)
        print("refused:", exc)
    else:
        print("answered")
"""


@needs_root
def test_a_process_we_may_not_look_into_raises_instead_of_lying(
    procs: Procs, listener: socket.socket
) -> None:
    """As nobody, looking into a root process must fail loudly: "0 connections" or "not
    waiting" would let a supervisor stop a busy worker or wait forever."""
    target = child(procs, "ready(); socks[0].accept()", listener)
    wait_until(lambda: waits(target, listener), what="waiting in accept")
    nosy = talk(procs, NOSY, str(target.pid), str(tcpinfo.socket_inode(listener)))
    first, second = readline(nosy), readline(nosy)
    assert first.startswith("refused:") and "ptrace" in first, first
    assert second.startswith("refused:") and "ptrace" in second, second


ZOMBIE_AS_NOBODY = """
import os, pwd, sys, time
from portshard.linux import proc, sockdiag, waiting  # import first: nobody may not read the venv
nobody = pwd.getpwnam("nobody")
os.setgroups([])
os.setresgid(nobody.pw_gid, nobody.pw_gid, nobody.pw_gid)
os.setresuid(nobody.pw_uid, nobody.pw_uid, nobody.pw_uid)
pid = os.fork()
if pid == 0:
    os._exit(0)
deadline = time.monotonic() + 10  # never reaped: a zombie of nobody's under nobody
while proc.alive(pid) and time.monotonic() < deadline:
    time.sleep(0.01)
inode = int(sys.argv[1])
print(os.access(f"/proc/{pid}/fd", os.R_OK), proc.socket_fds(pid),
      waiting.waiting_for_work(pid, {inode}),
      sockdiag.held_connections(os.getpid(), {inode}, {1}), flush=True)
sys.stdin.readline()
"""


@needs_root
def test_a_zombie_holds_nothing_for_a_user_without_root(
    procs: Procs, listener: socket.socket
) -> None:
    """A zombie's /proc fd/ and syscall files are root's, so its own user gets EACCES there:
    it holds nothing and waits for nothing all the same. Before, a non-root supervisor took
    it as "cannot see what it holds; assuming it holds a connection", and every retirement
    of a tree with an unreaped child (`sh -c 'helper & exec server'`) waited --grace."""
    nosy = talk(procs, ZOMBIE_AS_NOBODY, str(tcpinfo.socket_inode(listener)))
    assert readline(nosy) == "False {} False 0"
