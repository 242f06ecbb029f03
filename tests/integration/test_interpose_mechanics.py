"""How the shim and the seccomp trap behave, one property at a time: errno, options and flags
carried over, wildcard and dual-stack matching, what is left alone, failure modes, the
libreuseport mode (`portshard preload`), and `--via auto` on a LISTEN_FDS program."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from bench.load.loadgen import Load
from bench.load.rawload import RawLoad

import portshard
from portshard.interpose import elf, seccomp, shim
from portshard.linux import sockdiag, syscalls, tcpinfo
from tests.conftest import ROOT, Procs, wait_until
from tests.integration._util import read_line
from tests.integration.conftest import need
from tests.supervisor_fixture import FDWORKER, PORTSHARD, Start, no_process_left

PROBE = ROOT / "tests" / "workers" / "bind_probe.c"


@pytest.fixture(scope="session")
def probes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("probes")
    built = {}
    for kind, flags in (("dynamic", []), ("static", ["-static"])):
        path = out / f"bind_probe_{kind}"
        subprocess.run([need("gcc"), *flags, "-O2", "-o", str(path), str(PROBE)], check=True)
        built[kind] = str(path)
    return built


def parse_probe(line: str) -> dict[str, int]:
    assert line.startswith("probe "), line
    return {k: int(v) for k, v in (item.split("=") for item in line.split()[1:])}


_AT_FD_3 = "import os, sys; os.dup2(int(sys.argv[1]), 3); os.execv(sys.argv[2], sys.argv[2:])"


def run_probe(
    procs: Procs, binary: str, address: str, port: int, sock: socket.socket, env: dict[str, str]
) -> tuple[dict[str, int], subprocess.Popen[bytes]]:
    """Run the probe with ``sock`` at fd 3, as a supervisor's worker has it."""
    fd = sock.fileno()
    proc = procs.start(
        [sys.executable, "-c", _AT_FD_3, str(fd), binary, address, str(port)],
        pass_fds=[fd],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )
    return parse_probe(read_line(proc)), proc


def shim_env(sock: socket.socket) -> dict[str, str]:
    env = {"LD_PRELOAD": shim.shim_path(), "PROBE_SHUTDOWN": "1"}
    env.update(shim.inherit_env([os.fstat(sock.fileno()).st_ino]))
    return env


def stderr_of(proc: subprocess.Popen[bytes]) -> str:
    proc.kill()
    proc.wait(5)
    assert proc.stderr is not None
    return proc.stderr.read().decode(errors="replace")


def test_shim_hands_over_the_socket_keeping_errno_options_flags_and_backlog(
    procs: Procs, probes: dict[str, str]
) -> None:
    with portshard.listen("tcp://127.0.0.1:0", backlog=128) as sock:
        port = sock.getsockname()[1]
        got, proc = run_probe(procs, probes["dynamic"], "0.0.0.0", port, sock, shim_env(sock))
        assert got["same"] == 1, got  # the program's fd is now the supervisor's socket
        assert (got["bind"], got["listen"], got["shutdown"]) == (0, 0, 0), got
        # errno preserved across bind, listen and shutdown
        assert got["bind_errno"] == got["listen_errno"] == got["shutdown_errno"] == errno.EDOM
        assert got["nonblock"] == 1 and got["cloexec"] == 1, got
        assert got["keepalive"] == 1 and got["defer"] > 0 and got["rcvbuf"] == 131072, got
        # ...and on our side: options and O_NONBLOCK arrived, the backlog and LISTEN stayed.
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) > 0
        assert fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
        assert tcpinfo.queue_depth(sock).backlog == 128  # not the program's listen(fd, 5)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"x")  # TCP_DEFER_ACCEPT: accepted once data arrives
            c.settimeout(5)
            # The probe accepted it and closed it, unread (so possibly with a reset).
            with contextlib.suppress(ConnectionResetError):
                assert c.recv(10) == b""
        assert "portshard-shim" not in stderr_of(proc)


def test_shim_gives_a_wildcard_bind_of_the_other_family_the_managed_socket(
    procs: Procs, probes: dict[str, str]
) -> None:
    with portshard.listen("tcp://127.0.0.1:0") as sock:
        port = sock.getsockname()[1]
        got, _ = run_probe(procs, probes["dynamic"], "::", port, sock, shim_env(sock))
        assert got["same"] == 1 and got["bind"] == 0, got


def test_shim_leaves_other_addresses_and_ports_alone(procs: Procs, probes: dict[str, str]) -> None:
    with portshard.listen("tcp://127.0.0.1:0") as sock, socket.socket() as free:
        port = sock.getsockname()[1]
        # A specific address that is not the managed one: the program's own bind, and a note.
        got, proc = run_probe(procs, probes["dynamic"], "127.0.0.2", port, sock, shim_env(sock))
        assert got["same"] == 0 and got["bind"] == 0, got
        err = stderr_of(proc)
        assert f"to 127.0.0.2:{port} does not match portshard's socket on 127.0.0.1:{port}" in err
        # Another port: untouched, and its listen() names the port once (a program serving
        # the wrong port would otherwise only time out).
        free.bind(("127.0.0.1", 0))
        other = free.getsockname()[1]
        free.close()
        got, proc = run_probe(procs, probes["dynamic"], "127.0.0.1", other, sock, shim_env(sock))
        assert got["same"] == 0 and got["bind"] == 0 and got["listen"] == 0, got
        err = stderr_of(proc)
        assert err.count("portshard-shim") == 1, err
        assert f"listens on port {other}, which portshard does not manage (it serves {port})" in err
        # A client socket (bound to port 0, never listening) gets no note.
        got, proc = run_probe(procs, probes["dynamic"], "127.0.0.1", 0, sock, shim_env(sock))
        assert "portshard-shim" not in stderr_of(proc)


def test_shim_with_a_bad_environment_says_so_and_stays_out_of_the_way(
    procs: Procs, probes: dict[str, str]
) -> None:
    with portshard.listen("tcp://127.0.0.1:0") as sock:
        port = sock.getsockname()[1]
        env = {**shim_env(sock), "PORTSHARD_SHIM_FDS": "3:12x"}
        got, proc = run_probe(procs, probes["dynamic"], "0.0.0.0", port, sock, env)
        assert got["same"] == 0 and got["bind"] == -1 and got["bind_errno"] == errno.EADDRINUSE
        assert "PORTSHARD_SHIM_FDS=3:12x is not FD:INODE" in stderr_of(proc)
        # fd 3 is another socket in a descendant: the entry is ignored, silently.
        env = {**shim_env(sock), "PORTSHARD_SHIM_FDS": "3:1"}
        got, proc = run_probe(procs, probes["dynamic"], "0.0.0.0", port, sock, env)
        assert got["same"] == 0, got
        assert "portshard-shim" not in stderr_of(proc)


def test_shim_exports_only_the_interposed_symbols() -> None:
    out = subprocess.run(
        ["nm", "-D", "--defined-only", shim.shim_path()], capture_output=True, text=True, check=True
    ).stdout
    assert sorted(line.split()[-1] for line in out.splitlines()) == [
        "bind",
        "listen",
        "setsockopt",
        "shutdown",
    ]


def test_seccomp_hands_over_the_socket_with_its_options(
    start: Start, probes: dict[str, str]
) -> None:
    sup = start(
        "-w", "2", "--listen", "tcp://127.0.0.1:0", "--", probes["static"], "0.0.0.0", "{port}"
    )
    st = sup.status()
    assert [s["mode"] for s in st["slots"]] == ["seccomp", "seccomp"]
    lines = [line for line in sup.text().splitlines() if line.startswith("probe ")]
    assert len(lines) == 2
    for line in lines:
        got = parse_probe(line)
        assert got["same"] == 1 and got["bind"] == 0 and got["bind_errno"] == errno.EDOM, got
        assert got["nonblock"] == 1 and got["cloexec"] == 1, got
        assert got["keepalive"] == 1 and got["defer"] > 0 and got["rcvbuf"] == 131072, got
    # Only bind() is trapped: the program's listen(fd, 5) ran for real; the supervisor put
    # its backlog back once the worker was ready.
    assert all(s["queue"]["tcp0"]["backlog"] > 5 for s in st["slots"]), st["slots"]
    assert "now has the slot's socket" in sup.text()


@pytest.mark.parametrize("via", ["auto", "seccomp"])
def test_a_listen_fds_program_is_untouched_by_the_shim_and_the_trap(start: Start, via: str) -> None:
    """auto is safe for programs that use LISTEN_FDS: they never bind a managed address."""
    sup = start("-w", "2", "--via", via, "--listen", "tcp://127.0.0.1:0", "--", *FDWORKER)
    modes = [s["mode"] for s in sup.status()["slots"]]
    assert modes == (["preload"] * 2 if via == "auto" else ["seccomp"] * 2)
    with Load("127.0.0.1", sup.port, concurrency=4, max_requests=100) as load:
        load.wait_for(100)
    assert not load.failed and len(load.served_by()) == 2
    sup.ctl("reload", "--wait")
    assert "now has the slot's socket" not in sup.text()


def test_fds_mode_sets_no_preload(start: Start) -> None:
    sup = start("-w", "1", "--via", "fds", "--listen", "tcp://127.0.0.1:0", "--", *FDWORKER)
    pid = sup.pids()[0]
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = f.read()
    assert sup.status()["slots"][0]["mode"] == "fds"
    assert b"LD_PRELOAD=" not in env and b"PORTSHARD_SHIM" not in env


@pytest.mark.parametrize("nonblocking", [False, True])
def test_nonblocking_hands_the_sockets_over_non_blocking(
    start: Start, short_tmp: Path, nonblocking: bool
) -> None:
    """--nonblocking (systemd's NonBlocking=): nginx under --via fds takes its inherited
    socket to be non-blocking, and a worker that lost the race for a connection hung in
    accept(). Each worker's first process records the flags of the fds it got, before the
    test worker makes them non-blocking itself."""
    marker = short_tmp / "flags"
    record = 'for fd in 3 4; do grep ^flags: /proc/self/fdinfo/$fd >>"$0"; done; exec "$@"'
    wanted = ["--nonblocking"] if nonblocking else []
    sup = start(
        "-w", "2", "--via", "fds", *wanted,
        "--listen", "tcp://127.0.0.1:0", "--listen", "udp://127.0.0.1:0",
        "--", "sh", "-c", record, str(marker), *FDWORKER,
    )  # fmt: skip
    wait_until(lambda: marker.exists() and len(marker.read_text().splitlines()) == 4, what="4 fds")
    flags = [int(line.split()[1], 8) for line in marker.read_text().splitlines()]
    assert [bool(f & os.O_NONBLOCK) for f in flags] == [nonblocking] * 4
    with Load("127.0.0.1", sup.port, concurrency=4, max_requests=100) as load:
        load.wait_for(100)
    assert not load.failed and len(load.served_by()) == 2


EPOLL_LOOP = """
import selectors, socket
sock = socket.socket(fileno=3)  # as it is: blocking unless --nonblocking
sel = selectors.EpollSelector()
sel.register(sock, selectors.EVENT_READ)
while True:
    sel.select()
    try:
        sock.accept()[0].close()
    except BlockingIOError:
        pass
"""


@pytest.mark.parametrize("nonblocking", [False, True])
def test_an_event_loop_on_a_blocking_socket_is_warned_about(
    start: Start, nonblocking: bool
) -> None:
    """tornado or gevent given fd 3 as it is wait in epoll, then accept until EAGAIN, which a
    blocking socket never says: after 16 requests over 4 workers none answered again, while
    each counted as ready. The supervisor sees the epoll wait on a blocking socket when the
    worker becomes ready and says so once, with the fix; not with --nonblocking."""
    wanted = ["--nonblocking"] if nonblocking else []
    sup = start(
        "-w", "2", "--via", "fds", *wanted, "--listen", "tcp://127.0.0.1:0",
        "--", sys.executable, "-c", EPOLL_LOOP,
    )  # fmt: skip
    said = sup.text().count("waits for its socket with epoll (an event loop), but the socket")
    assert said == (0 if nonblocking else 1), sup.text()
    assert nonblocking or "use --nonblocking" in sup.text()


def test_seccomp_workers_die_with_the_supervisor(start: Start, probes: dict[str, str]) -> None:
    """The kernel fails a trapped bind() with ENOSYS once the listener is gone, which
    happens only when the supervisor is gone: its workers have been killed by then."""
    sup = start(
        "-w",
        "2",
        "--orphan-timeout",
        "0",  # no warden keeps them (the default: test_upgrade.py)
        "--listen",
        "tcp://127.0.0.1:0",
        "--",
        probes["static"],
        "0.0.0.0",
        "{port}",
    )
    port = sup.port
    assert sup.proc is not None
    sup.proc.kill()
    sup.wait_exit(5)
    wait_until(lambda: no_process_left(f"{probes['static']} 0.0.0.0 {port}"), 10, "workers gone")


def test_a_trapped_bind_with_nobody_listening_fails_with_enosys() -> None:
    """What the docs promise about the failure mode, shown on this kernel."""
    arch = syscalls.native_arch()
    assert arch is not None
    theirs, ours = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 2
        try:
            ours.close()
            seccomp.child_install(theirs.fileno(), as_root=False)
            theirs.recv(1)  # wait until the parent closed the listener
            try:
                socket.socket().bind(("127.0.0.1", 0))
                code = 0
            except OSError as exc:
                code = 10 if exc.errno == errno.ENOSYS else 3
        finally:
            os._exit(code)
    theirs.close()
    listener = seccomp.receive_listener(ours)
    os.close(listener)
    ours.send(b"x")
    _, status = os.waitpid(pid, 0)
    ours.close()
    assert os.waitstatus_to_exitcode(status) == 10


def nc_listening_port(proc: subprocess.Popen[bytes]) -> int:
    line = read_line(proc, stderr=True)
    match = re.search(r"Listening on \S+ (\d+)", line)
    assert match, line
    return int(match.group(1))


def test_libreuseport_netcat_demo_with_portshard_preload(procs: Procs, short_tmp: Path) -> None:
    """The libreuseport README's demo: two `nc -k -l PORT`, clients spread over both."""
    need("nc")
    outs = [short_tmp / "nc1", short_tmp / "nc2"]
    # The first binds port 0 (every port gets SO_REUSEPORT); the second the port it got.
    with open(outs[0], "wb") as out:
        first = procs.start(
            [*PORTSHARD, "preload", "--", "nc", "-v", "-k", "-l", "0"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.PIPE,
            bufsize=0,
        )
    port = nc_listening_port(first)
    with open(outs[1], "wb") as out:
        procs.start(
            [*PORTSHARD, "preload", "--ports", str(port), "--", "nc", "-k", "-l", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=out,
        )
    wait_until(lambda: len(sockdiag.port_holders(portshard.Proto.TCP, port)) >= 2, 10, "two nc")
    load = RawLoad(
        "127.0.0.1",
        port,
        lambda n: f"test:{n}\n".encode(),
        concurrency=1,
        max_requests=60,
        half_close=True,
        reply_required=False,
    )
    with load:
        load.wait_for(60)
    received = [set(path.read_text().split()) for path in outs]
    assert not load.failed, load.by_kind()
    assert all(received), received  # both copies served
    assert set().union(*received) == {f"test:{n}" for n in load.sent}


def test_portshard_preload_runs_a_static_program_through_seccomp(
    procs: Procs, probes: dict[str, str], short_tmp: Path
) -> None:
    """LD_PRELOAD cannot reach a static binary; preload traps its bind() instead."""
    need("gcc")
    server = short_tmp / "static_server"
    subprocess.run(
        ["gcc", "-static", "-O2", "-o", str(server), str(ROOT / "tests/workers/static_server.c")],
        check=True,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    copies = [
        procs.start([*PORTSHARD, "preload", "--ports", str(port), "--", str(server), str(port)])
        for _ in range(2)
    ]
    wait_until(lambda: len(sockdiag.port_holders(portshard.Proto.TCP, port)) >= 2, 10, "2 copies")
    with Load("127.0.0.1", port, concurrency=2, max_requests=60) as load:
        load.wait_for(60)
    assert not load.failed and len({r.body for r in load.results}) == 2
    for proc in copies:  # SIGTERM reaches the program; preload exits with its status
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 128 + signal.SIGTERM
    assert no_process_left(f"{server} {port}")


def test_auto_reads_the_program(probes: dict[str, str], short_tmp: Path) -> None:
    env = dict(os.environ)
    assert elf.inspect_file(probes["static"]).kind == "static"
    assert elf.inspect_file(probes["dynamic"]).kind == "dynamic"
    assert elf.inspect_command([sys.executable], env).kind == "dynamic"
    script = short_tmp / "script"
    script.write_text(f"#!/usr/bin/env {Path(probes['static']).name}\n")
    script.chmod(0o755)
    env["PATH"] = f"{Path(probes['static']).parent}:{env['PATH']}"
    assert elf.inspect_command([str(script)], env).kind == "static"
    assert elf.inspect_command(["no-such-program-here"], env).kind == "unknown"


_REUSEPORT_PROBE = """
import socket, sys
listed, other = int(sys.argv[1]), int(sys.argv[2])
def reuseport(s):
    return s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
a = socket.socket()
a.bind(("127.0.0.1", listed))  # bind() to a listed port: set before the bind
b = socket.socket()
b.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # unbound: nothing yet
early = reuseport(b)
b.bind(("127.0.0.1", other))  # not listed: untouched
c = socket.socket()
c.bind(("127.0.0.2", listed))
c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # bound to a listed port: set again
print(reuseport(a), early, reuseport(b), reuseport(c))
"""


def test_portshard_preload_sets_so_reuseport_only_for_listed_ports() -> None:
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    probe = [sys.executable, "-c", _REUSEPORT_PROBE, str(ports[0]), str(ports[1])]
    out = subprocess.run(
        [*PORTSHARD, "preload", "--ports", str(ports[0]), "--", *probe],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert out.split() == ["1", "0", "0", "1"]
