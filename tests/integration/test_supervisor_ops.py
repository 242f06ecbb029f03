"""`portshard run` operations: users, failed reloads, readiness modes, signals, control socket."""

from __future__ import annotations

import json
import os
import pty
import pwd
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from bench.load.loadgen import Load

from tests.conftest import ROOT, default_signals, needs_root, wait_until
from tests.integration._util import write_config
from tests.supervisor_fixture import FDWORKER, PORTSHARD, Running, Start, no_process_left


def tag() -> str:
    return f"--tag={uuid.uuid4().hex[:12]}"


def uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[2])
    raise AssertionError("no Uid line")


@pytest.fixture
def world_readable_worker(short_tmp: Path) -> list[str]:
    """fdworker and portshard copied where `nobody` can read them, run by the system python."""
    system_python = "/usr/bin/python3"
    if not os.access(system_python, os.X_OK):
        pytest.skip("no /usr/bin/python3 for the unprivileged worker")
    os.chmod(short_tmp, 0o755)
    shutil.copytree(ROOT / "src" / "portshard", short_tmp / "lib" / "portshard")
    shutil.copy(FDWORKER[1], short_tmp / "fdworker.py")
    for path in short_tmp.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    return ["env", f"PYTHONPATH={short_tmp / 'lib'}", system_python, str(short_tmp / "fdworker.py")]


@needs_root
def test_workers_run_as_another_user_on_root_bound_sockets(
    start: Start, world_readable_worker: list[str]
) -> None:
    nobody = pwd.getpwnam("nobody")
    sup = start(
        "-w",
        "2",
        "--user",
        "nobody",
        "--listen",
        "tcp://127.0.0.1:0",
        "--",
        *world_readable_worker,
    )
    assert all(uid_of(pid) == nobody.pw_uid for pid in sup.pids())
    with Load("127.0.0.1", sup.port, concurrency=4, max_requests=100) as load:
        load.wait_for(100)
    assert not load.failed
    sup.ctl("reload", "--wait")
    assert all(uid_of(pid) == nobody.pw_uid for pid in sup.pids())


@needs_root
def test_a_user_who_cannot_reach_the_program_is_told_which_directory_is_closed(
    start: Start, short_tmp: Path
) -> None:
    # `--user nobody` with a virtualenv's python (a link into /root, mode 700) was told to
    # "chmod +x" a program that was executable; the closed directory was the reason.
    closed = short_tmp / "closed"
    closed.mkdir(mode=0o700)
    (closed / "sleep").symlink_to(shutil.which("sleep") or "/bin/sleep")
    short_tmp.chmod(0o755)
    link = short_tmp / "prog"
    link.symlink_to(closed / "sleep")
    sup = start(
        "-w",
        "1",
        "--user",
        "nobody",
        "--listen",
        "tcp://127.0.0.1:0",
        "--",
        str(link),
        "9",
        wait=False,
    )
    assert sup.wait_exit(30) != 0
    text = sup.text()
    assert f"{closed} is closed to other users (mode 700)" in text, text
    assert "chmod +x" not in text


def test_a_command_and_environment_over_the_kernels_limit_are_named_so(
    start: Start, short_tmp: Path
) -> None:
    # Each value under the kernel's 128 KiB per string (config.load refuses longer ones),
    # together 700 KB (a config file stays under 1 MiB), over the kernel's total for a
    # supervisor run with a 2 MiB stack limit (a quarter of it, 512 KiB): the spawn failed
    # with "Argument list too long" and nothing said which list or limit.
    config = short_tmp / "big.toml"
    big = "".join(f'V{i} = "{"x" * 100_000}"\n' for i in range(7))
    config.write_text(f'command = ["sleep", "9"]\n[env]\n{big}')
    stack = ["prlimit", f"--stack={2 << 20}", "--"]
    sup = start(
        "-w", "1", "--listen", "tcp://127.0.0.1:0", "-c", str(config), wait=False, wrap=stack
    )
    assert sup.wait_exit(30) != 0
    text = sup.text()
    assert "Argument list too long; its arguments and environment" in text, text
    assert "ulimit -s" in text and "Traceback" not in text


def test_supervisor_killed_takes_its_workers_with_it(start: Start) -> None:
    """--orphan-timeout 0: no warden keeps them (the default keeps them: test_upgrade.py)."""
    t = tag()
    sup = start(
        "-w", "2", "--orphan-timeout", "0", "--listen", "tcp://127.0.0.1:0", "--", *FDWORKER, t
    )
    pids = sup.pids()
    sup.proc.kill()
    sup.wait_exit(5)
    wait_until(lambda: no_process_left(t), 5, "workers to notice the supervisor died")
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        assert state == "Z", f"worker {pid} still running"


def test_failed_reload_keeps_the_old_workers_and_says_why(start: Start, short_tmp: Path) -> None:
    conf = short_tmp / "ps.toml"
    write_config(conf, FDWORKER, 2)
    sup = start("-c", str(conf))  # the default ready-timeout: a busy machine boots slowly
    old = sup.pids()
    write_config(conf, [sys.executable, "-c", "import time; time.sleep(30)"], 2)
    with conf.open("a") as f:
        f.write("ready-timeout = 1\n")  # the reload's workers never get ready: give up soon
    with Load("127.0.0.1", sup.port, concurrency=8, max_seconds=30) as load:
        load.wait_for(50)
        res = sup.ctl("reload", "--wait", check=False)
        load.wait_for(load.count() + 50)
    assert res.returncode != 0
    assert "did not become ready" in res.stderr and "old workers keep serving" in res.stderr
    assert "Traceback" not in res.stderr
    st = sup.status()
    assert [s["pid"] for s in st["slots"]] == old
    assert st["reloads"] == {"ok": 0, "failed": 1}
    assert not load.failed, load.by_kind()
    conf.write_text("command = [")  # a broken file: the reload is refused, nothing changes
    res = sup.ctl("reload", "--wait", check=False)
    assert res.returncode != 0 and "not valid TOML" in res.stderr
    write_config(conf, FDWORKER, 2)
    sup.ctl("reload", "--wait")
    assert sup.status()["reloads"] == {"ok": 1, "failed": 1}


def test_sighup_reloads(start: Start) -> None:
    sup = start("-w", "2", "--listen", "tcp://127.0.0.1:0", "--", *FDWORKER)
    old = set(sup.pids())
    sup.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: sup.status()["reloads"]["ok"] == 1, 20, "reload after SIGHUP")
    assert not old & set(sup.pids())


@pytest.mark.parametrize("mode", ["notify", "delay:0.2", "accept"])
def test_readiness_modes(start: Start, mode: str) -> None:
    sup = start("-w", "2", "--ready", mode, "--listen", "tcp://127.0.0.1:0", "--", *FDWORKER)
    assert "ready" in sup.text()
    sup.ctl("reload", "--wait")
    assert sup.status()["reloads"]["ok"] == 1


def test_notify_mode_waits_for_ready_1(start: Start) -> None:
    """Under --ready notify, a program that never sends READY=1 never counts as ready."""
    silent = [sys.executable, "-c", "import socket; socket.socket(fileno=3).accept()"]
    sup = start(
        "-w",
        "1",
        "--ready",
        "notify",
        "--ready-timeout",
        "1",
        "--listen",
        "tcp://127.0.0.1:0",
        "--",
        *silent,
        wait=False,
    )
    assert sup.wait_exit(20) != 0
    assert "not ready within 1s (--ready notify)" in sup.text()


def test_worker_that_dies_on_sigterm_loses_nothing_in_a_reload(start: Start) -> None:
    sup = start(
        "-w",
        "2",
        "--listen",
        "tcp://127.0.0.1:0",
        "--",
        *FDWORKER,
        env={"WORK_MS": "20", "DIE_ON_TERM": "1"},
    )
    with Load("127.0.0.1", sup.port, concurrency=16, max_seconds=60) as load:
        load.wait_for(100)
        for _ in range(3):  # 6 workers that die at SIGTERM, each with requests in hand
            sup.reload()
    print(f"die-on-term reloads: {load.count()} requests, {load.by_kind()}")
    assert not load.failed, load.by_kind()


def test_fd_placeholder_and_slot_environment(start: Start) -> None:
    code = (
        "import os, socket, sys, portshard\n"
        "s = socket.socket(fileno=int(sys.argv[1]))\n"
        "assert os.environ['LISTEN_FDNAMES'] == 'web'\n"
        "while True:\n"
        "    c, _ = s.accept()\n"
        "    c.recv(100)\n"
        "    c.sendall(b'HTTP/1.0 200 OK\\r\\n\\r\\n%s %d' % "
        "(os.environ['PORTSHARD_SLOT'].encode(), os.getpid()))\n"
        "    c.close()\n"
    )
    sup = start(
        "-w", "2", "--listen", "web=tcp://127.0.0.1:0", "--", sys.executable, "-c", code, "{fd:web}"
    )
    with Load("127.0.0.1", sup.port, concurrency=4, max_requests=100) as load:
        load.wait_for(100)
    assert not load.failed and len(load.served_by()) == 2


def raw_control(path: str, payload: bytes, *, wait: float = 0) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(15)
        s.connect(path)
        s.sendall(payload)
        if wait:
            time.sleep(wait)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_control_socket_rejects_garbage_and_keeps_serving(shared_sup: Running) -> None:
    sup = shared_sup
    assert stat.S_IMODE(os.stat(sup.control).st_mode) == 0o600
    assert b"not JSON" in raw_control(sup.control, b"garbage\n")
    assert b"larger than" in raw_control(sup.control, b"x" * 70_000)
    assert b"unknown command" in raw_control(sup.control, b'{"v":1,"cmd":"boom"}\n')
    assert b"integer 'workers'" in raw_control(
        sup.control, b'{"v":1,"cmd":"scale","workers":"2"}\n'
    )
    assert b"no complete request" in raw_control(sup.control, b'{"v":1,', wait=0)
    assert sup.status()["slots"][0]["state"] == "ready"


def test_control_client_errors_are_clear(short_tmp: Path) -> None:
    res = subprocess.run(
        [*PORTSHARD, "status", "--control", str(short_tmp / "none.sock")],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0
    assert "no supervisor at" in res.stderr and "Traceback" not in res.stderr


@needs_root
def test_other_users_cannot_use_the_control_socket(shared_sup: Running) -> None:
    sup = shared_sup
    nobody = pwd.getpwnam("nobody").pw_uid
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\n"
    )
    res = subprocess.run(["/usr/bin/python3", "-c", probe, sup.control], user=nobody)
    assert res.returncode == 13
    assert sup.status()["slots"][0]["state"] == "ready"


def test_run_refuses_a_second_supervisor_on_the_same_control_socket(shared_sup: Running) -> None:
    sup = shared_sup
    res = subprocess.run(
        [
            *PORTSHARD,
            "run",
            "--control",
            sup.control,
            "--listen",
            "tcp://127.0.0.1:0",
            "--",
            *FDWORKER,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode != 0 and "already running" in res.stderr
    assert sup.status()["slots"][0]["state"] == "ready"


def test_status_watch_refreshes_in_place_and_json_logs(start: Start) -> None:
    sup = start("-w", "2", "--log-format", "json", "--listen", "tcp://127.0.0.1:0", "--", *FDWORKER)
    # On a terminal it redraws in place (and in colour); piped, it prints plain snapshots.
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [*PORTSHARD, "status", "--watch", "0.2", "--control", sup.control],
        stdout=slave,
        stderr=subprocess.PIPE,
        preexec_fn=default_signals,
    )
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 15
    while out.count(b"\x1b[H\x1b[2J") < 3 and time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            out += os.read(master, 65536)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    os.close(master)
    assert proc.returncode == 0 and b"Traceback" not in err
    assert out.count(b"\x1b[H\x1b[2J") >= 3, out[:500]  # redrawn in place several times
    assert b"\x1b[32mready" in out  # colour on a terminal
    lines = [json.loads(line) for line in sup.text().splitlines() if line.startswith("{")]
    assert any(e.get("slot") == 0 and e.get("pid") for e in lines)
    bad = subprocess.run(
        [*PORTSHARD, "status", "--watch", "0", "--control", sup.control],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "0 is not a refresh interval" in bad.stderr


def _watch_piped(sup: Running, *args: str) -> str:
    proc = subprocess.Popen(
        [*PORTSHARD, "status", "--watch", "0.2", *args, "--control", sup.control],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=default_signals,
    )
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    out = b""
    deadline = time.monotonic() + 15
    mark = b"\n" if "--json" in args else b"SLOT"
    while out.count(mark) < 3:
        assert time.monotonic() < deadline, out[:500]
        select.select([proc.stdout], [], [], 0.5)
        out += proc.stdout.read() or b""
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and b"Traceback" not in err, err
    return (out + rest).decode()


def test_status_watch_piped_is_json_lines_or_plain_snapshots(shared_sup: Running) -> None:
    # Before: --watch --json wrote pretty JSON between screen-clearing escapes and a
    # "every 1s; Ctrl-C to quit" footer, which no JSON reader takes; piped text had escapes.
    lines = [line for line in _watch_piped(shared_sup, "--json").splitlines() if line]
    assert len(lines) >= 3
    assert all(json.loads(line)["state"] == "running" for line in lines)
    text = _watch_piped(shared_sup)
    assert "\x1b" not in text and "SLOT" in text


@pytest.mark.parametrize("value", ["nan", "inf", "1e-9"])
def test_status_watch_refuses_intervals_it_cannot_sleep(shared_sup: Running, value: str) -> None:
    # Before: nan raised ValueError and inf OverflowError out of time.sleep(), 1e-9 spun.
    bad = subprocess.run(
        [*PORTSHARD, "status", f"--watch={value}", "--control", shared_sup.control],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2, bad.stderr
    assert "is not a refresh interval: give 0.1 to 86400 seconds" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_completion_script() -> None:
    res = subprocess.run([*PORTSHARD, "completion", "bash"], capture_output=True, text=True)
    assert res.returncode == 0 and "_PORTSHARD_COMPLETE" in res.stdout


def test_workers_get_their_sockets_and_nothing_else(start: Start) -> None:
    sup = start(
        "-w", "2", "--listen", "tcp://127.0.0.1:0", "--listen", "udp://127.0.0.1:0", "--", *FDWORKER
    )
    listeners = set()
    for pid in sup.pids():
        fds = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        inherited = {fd: link for fd, link in fds.items() if fd in (3, 4)}
        assert all(link.startswith("socket:[") for link in inherited.values())
        listeners.update(inherited.values())
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        assert env[b"LISTEN_FDS"] == b"2" and env[b"LISTEN_FDNAMES"] == b"tcp0:udp1"
        assert env[b"LISTEN_PID"] == str(pid).encode()
        assert env[b"PORTSHARD_SLOT"] in (b"0", b"1")
        # Whatever else the worker holds, it opened itself after exec (its wakeup
        # socketpair, epoll): nothing of the supervisor's (control, notify, pidfds).
        others = {link for fd, link in fds.items() if fd > 4}
        assert not any("pidfd" in link or link.endswith(".sock") for link in others)
    assert len(listeners) == 4  # each slot has its own TCP and UDP socket


def test_a_worker_that_never_waits_is_ready_once_it_holds_a_connection(start: Start) -> None:
    # Polls a non-blocking socket and naps in between: /proc never shows it waiting on the
    # socket (as under a saturating load, where accept() never blocks). It counts as ready
    # once it holds a connection it accepted, and not before.
    code = (
        "import os, socket, time\n"
        "s = socket.socket(fileno=3)\n"
        "s.setblocking(False)\n"
        "while True:\n"
        "    try:\n"
        "        c, _ = s.accept()\n"
        "    except BlockingIOError:\n"
        "        time.sleep(0.005)\n"
        "        continue\n"
        "    c.setblocking(True)\n"
        "    c.recv(100)\n"
        "    time.sleep(1.0)\n"
        "    c.sendall(b'HTTP/1.0 200 OK\\r\\n\\r\\n%d' % os.getpid())\n"
        "    c.close()\n"
    )
    sup = start(
        "-w", "1", "--listen", "tcp://127.0.0.1:0", "--", sys.executable, "-c", code, wait=False
    )
    wait_until(
        lambda: os.path.exists(sup.control) and sup.ctl("status", check=False).returncode == 0,
        20,
        "control",
    )
    time.sleep(1.0)
    assert not sup.status()["ready"], "it never waited and holds nothing: not ready yet"
    with socket.create_connection(("127.0.0.1", sup.port), timeout=10) as c:
        c.sendall(b"GET / HTTP/1.0\r\n\r\n")
        sup.wait_ready(timeout=5)  # while the worker holds the connection
        assert c.recv(100).startswith(b"HTTP/1.0 200 OK")
    assert "ready after" in sup.text()


def test_a_worker_that_keeps_crashing_stops_the_supervisor(start: Start) -> None:
    sup = start(
        "-w",
        "1",
        "--listen",
        "tcp://127.0.0.1:0",
        "--",
        *FDWORKER,
        env={"EXIT_AFTER": "0.3"},
        wait=False,
    )
    assert sup.wait_exit(30) == 1
    text = sup.text()
    assert "failed 5 times in a row" in text and "giving up instead of crash-looping" in text
    assert "exit status 7" in text and "Traceback" not in text


def test_surge_replaces_slots_in_pairs(start: Start) -> None:
    sup = start("-w", "4", "--surge", "2", "--listen", "tcp://127.0.0.1:0", "--", *FDWORKER)
    with Load("127.0.0.1", sup.port, concurrency=8, max_seconds=30) as load:
        load.wait_for(100)
        sup.ctl("reload", "--wait")
        load.wait_for(load.count() + 100)
    assert not load.failed
    started = [line for line in sup.text().splitlines() if "started (reload" in line]
    assert len(started) == 4
    assert "4 slots, 2 at a time" in sup.text()


# Answers each request line, then keeps the connection open whatever its client does (as
# hypercorn keeps closed keep-alive connections in CLOSE_WAIT until its timeout); a request
# "slow" (its client half-closed, as nc -N) is answered 1.5 s later. Dies on SIGTERM.
KEEPER = """
import os, socket, threading, time
s = socket.socket(fileno=3)
kept = []
def serve(c):
    line = c.makefile("rb").readline()
    if line.startswith(b"slow"):
        time.sleep(1.5)
    c.sendall(b"%d\\n" % os.getpid())
    while c.recv(4096):
        pass
    kept.append(c)  # never closed: CLOSE_WAIT until the process ends
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""


def test_a_reload_does_not_wait_for_answered_connections_left_in_close_wait(
    start: Start,
) -> None:
    sup = start(
        "-w", "2", "--grace", "20", "--listen", "tcp://127.0.0.1:0", "--",
        sys.executable, "-c", KEEPER,
    )  # fmt: skip
    olds = set(sup.pids())
    for _ in range(40):  # answered, then closed by their clients: leftovers in each worker
        with socket.create_connection(("127.0.0.1", sup.port), timeout=5) as c:
            c.sendall(b"hello\n")
            assert int(c.makefile("rb").readline()) in olds
    waiting = socket.create_connection(("127.0.0.1", sup.port), timeout=10)
    waiting.sendall(b"slow\n")
    waiting.shutdown(socket.SHUT_WR)  # still waits for its answer
    try:
        res = sup.ctl("reload", "--timeout", "15", check=False)
        assert res.returncode == 0, res.stderr + sup.text()
        assert int(waiting.makefile("rb").readline()) in olds  # answered, not reset
    finally:
        waiting.close()
    assert not olds & set(sup.pids())
    text = sup.text()
    assert "still holds connections" not in text, text


# Serves from a second thread while the main thread waits on a lock (a native wait that only
# a signal in the main thread interrupts); the SIGTERM handler, run by the main thread,
# says so and exits 0. granian's master works this way.
_SERVER = """
import os, signal, socket, sys, threading
def stop(*_):
    print("shutdown %d" % os.getpid(), flush=True)
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
def serve():
    s = socket.socket(fileno=3)
    while True:
        c = s.accept()[0]
        c.sendall(b"%d\\n" % os.getpid())
        c.close()
"""
THREADED = (
    _SERVER
    + """
threading.Thread(target=serve, daemon=True).start()
threading.Event().wait()
"""
)
# The same, but its signals are blocked in every thread and a third thread takes SIGTERM with
# sigwait() (a handler is installed too, so that portshard sees it handled).
SIGWAITER = (
    _SERVER
    + """
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it
def waiter():
    signal.sigwait({signal.SIGTERM})
    stop()
threading.Thread(target=serve, daemon=True).start()
threading.Thread(target=waiter, daemon=True).start()
threading.Event().wait()
"""
)


@pytest.mark.parametrize("program", [THREADED, SIGWAITER], ids=["main-thread", "sigwait"])
def test_the_stop_signal_reaches_a_program_whose_main_thread_waits_while_others_serve(
    start: Start, program: str
) -> None:
    # Signalled while frozen, a process-wide signal goes to whichever thread leaves the
    # freezer first: the serving thread half the time, where Python never runs the handler.
    # A program that blocks it in its main thread takes it elsewhere (sigwait).
    sup = start(
        "-w", "2", "--grace", "8", "--listen", "tcp://127.0.0.1:0", "--",
        sys.executable, "-c", program,
    )  # fmt: skip
    retired = []
    for _ in range(3):
        retired += sup.pids()
        sup.reload()
    text = sup.text()
    assert "did not stop within the grace time" not in text, text
    for pid in retired:
        assert f"shutdown {pid}" in text and f"pid {pid}: retired (exit status 0)" in text, text
        # and where its retirement went: the freeze-check, then its own shutdown
        assert re.search(
            rf"pid {pid}: retired \(exit status 0\); found idle [\d.]+s after its drain began, "
            r"exited [\d.]+s after its stop signal",
            text,
        ), text


def test_a_stop_signal_delivered_twice_at_once_still_stops_gracefully(start: Start) -> None:
    # GNU `timeout` sends SIGTERM to the program and then to its own process group: the
    # supervisor got it twice at once and took the second as "kill every worker now".
    sup = start(
        "-w", "2", "--listen", "tcp://127.0.0.1:0", "--", *FDWORKER, tag(),
        env={"STOP_DELAY": "0.5"},
    )  # fmt: skip
    assert sup.proc is not None
    os.kill(sup.proc.pid, signal.SIGTERM)
    time.sleep(0.02)  # delivered apart (two pending SIGTERMs would be one), well within 0.1 s
    os.kill(sup.proc.pid, signal.SIGTERM)
    assert sup.wait_exit(30) == 0
    text = sup.text()
    assert "killing every worker now" not in text, text
    assert "SIGTERM again" in text and text.count("retired (exit status 0)") == 2, text
