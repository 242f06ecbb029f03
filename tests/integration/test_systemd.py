"""The supervisor under systemd: socket activation, sd_notify, the fd store, restarts."""

from __future__ import annotations

import array
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bench.load.loadgen import Load

from tests.conftest import wait_until
from tests.supervisor_fixture import FDWORKER, PORTSHARD, Control

ACTIVATE = shutil.which("systemd-socket-activate")


def free_port() -> int:
    """systemd-socket-activate cannot bind port 0: bind 0 here and pass the port on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(ACTIVATE is None, reason="systemd-socket-activate is not installed")
def test_systemd_socket_activate(short_tmp: Path) -> None:
    control = short_tmp / "sa.sock"
    for _attempt in range(3):
        port = free_port()
        log = open(short_tmp / "sa.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [
                str(ACTIVATE),
                "-l",
                f"127.0.0.1:{port}",
                *PORTSHARD,
                "run",
                "-w",
                "3",
                "--control",
                str(control),
                "--",
                *FDWORKER,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_until(
                lambda p=proc: (  # type: ignore[misc]
                    b"Listening on" in (short_tmp / "sa.log").read_bytes() or p.poll() is not None
                ),
                10,
                "systemd-socket-activate to listen",
            )
            if proc.poll() is not None:
                continue  # the port was taken between our bind and its: try another
            # It execs the supervisor on the first connection; that one is served too.
            with socket.create_connection(("127.0.0.1", port), timeout=20) as first:
                first.sendall(b"GET / HTTP/1.0\r\n\r\n")
                assert first.recv(100).startswith(b"HTTP/1.0 200")
            st = Control(control, proc).wait_ready()
            assert st["listen"][0]["port"] == port
            assert [s["state"] for s in st["slots"]] == ["ready"] * 3
            with Load("127.0.0.1", port, concurrency=8, max_requests=300) as load:
                load.wait_for(300)
            assert not load.failed and len(load.served_by()) >= 2
            text = (short_tmp / "sa.log").read_text()
            assert "using the socket passed by systemd" in text
            return
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(20)
            log.close()
    pytest.fail("could not start systemd-socket-activate on a free port in 3 attempts")


class MiniSystemd:
    """Enough of systemd to test the protocol for real: holds a listening socket (without
    SO_REUSEPORT, as systemd-socket-activate does), passes it and the fd store as LISTEN_FDS,
    and records sd_notify messages, including FDSTORE=1 with the fd attached."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = int(self.listener.getsockname()[1])
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(tmp / "notify"))
        self.notify.settimeout(0.1)
        self.messages: list[list[str]] = []
        self.store: dict[str, socket.socket] = {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, workers: int) -> Control:
        names = ["http", *self.store]
        fds = [self.listener.fileno(), *(s.fileno() for s in self.store.values())]

        def place_fds() -> None:
            moved = [os.dup(fd) for fd in fds]
            for i, fd in enumerate(moved):
                os.dup2(fd, 3 + i)

        env = {
            **os.environ,
            "LISTEN_FDS": str(len(fds)),
            "LISTEN_FDNAMES": ":".join(names),
            "NOTIFY_SOCKET": str(self.tmp / "notify"),
        }
        control = self.tmp / "ctl.sock"
        log = open(self.tmp / "sup.log", "ab")  # noqa: SIM115 - closed when the process is
        self.proc = subprocess.Popen(
            [*PORTSHARD, "run", "-w", str(workers), "--control", str(control), "--", *FDWORKER],
            env=env,
            preexec_fn=place_fds,
            pass_fds=tuple(range(3, 3 + len(fds))),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return Control(control, self.proc, self.tmp / "sup.log")

    def receive(self, until: str, timeout: float = 20) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data, anc, _flags, _addr = self.notify.recvmsg(4096, socket.CMSG_SPACE(64))
            except TimeoutError:
                continue
            fields = data.decode().split("\n")
            self.messages.append(fields)
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    name = next(f[7:] for f in fields if f.startswith("FDNAME="))
                    self.store[name] = socket.socket(fileno=fds[0])
            if until in fields:
                return fields
        raise AssertionError(f"no {until} from the supervisor; got {self.messages}")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        for s in [self.listener, self.notify, *self.store.values()]:
            s.close()


@pytest.fixture
def systemd(short_tmp: Path) -> Iterator[MiniSystemd]:
    mini = MiniSystemd(short_tmp)
    try:
        yield mini
    finally:
        mini.close()


def test_notify_fdstore_and_restart_keep_every_queue(systemd: MiniSystemd) -> None:
    sup = systemd.start(workers=3)
    ready = systemd.receive("READY=1")
    assert any(f.startswith("STATUS=3 of 3 workers ready") for f in ready)
    st = sup.status()
    assert st["listen"][0]["port"] == systemd.port
    while len(systemd.store) < 2:
        systemd.receive("FDSTORE=1", 10)
    assert sorted(systemd.store) == ["portshard.http.1", "portshard.http.2"]

    assert systemd.proc is not None
    systemd.proc.send_signal(signal.SIGHUP)  # what Type=notify-reload sends
    systemd.receive("RELOADING=1")
    systemd.receive("READY=1")

    systemd.proc.send_signal(signal.SIGTERM)
    systemd.receive("STOPPING=1")
    assert systemd.proc.wait(30) == 0

    # No supervisor now: clients connect anyway. A connection that hashes to slot 0 waits in
    # systemd's queue; one that hashes to a stored socket has its SYN dropped (the first
    # supervisor could not know the store would keep it) and is retried by the client until the
    # next supervisor clears the filter. Either way it is served, nothing is refused or reset.
    replies: list[bytes] = []

    def client() -> None:
        with socket.create_connection(("127.0.0.1", systemd.port), timeout=30) as c:
            c.sendall(b"GET / HTTP/1.0\r\n\r\n")
            replies.append(c.recv(200))

    clients = [threading.Thread(target=client) for _ in range(6)]
    for t in clients:
        t.start()
    time.sleep(0.3)  # let them reach the kernel while no supervisor runs
    sup = systemd.start(workers=3)
    systemd.receive("READY=1")
    for t in clients:
        t.join(40)
    assert len(replies) == 6 and all(r.startswith(b"HTTP/1.0 200") for r in replies), replies
    log = (systemd.tmp / "sup.log").read_text()
    assert log.count("using the socket passed by systemd") >= 3  # slot 0 + 2 from the store
    with Load("127.0.0.1", systemd.port, concurrency=8, max_requests=300) as load:
        load.wait_for(300)
    assert not load.failed and len(load.served_by()) == 3
    systemd.proc.send_signal(signal.SIGTERM)
    systemd.receive("STOPPING=1")
    assert systemd.proc.wait(30) == 0
    del sup


# ---- the example units (examples/systemd/), checked by systemd's own parser ----------------

ANALYZE = shutil.which("systemd-analyze")
UNITS = Path(__file__).resolve().parents[2] / "examples" / "systemd"
PORTSHARD_BIN = Path(sys.executable).with_name("portshard")


def systemd_version() -> int:
    out = subprocess.run([str(ANALYZE), "--version"], capture_output=True, text=True).stdout
    return int(out.split()[1])


def verify(unit_dir: Path) -> tuple[int, str]:
    """`systemd-analyze verify` on the example service copied to ``unit_dir``. The bare
    `portshard` the unit runs is looked up in systemd's fixed search path, where this test's
    portshard is not: its full path is written in for the check (the rest is as shipped)."""
    service = unit_dir / "portshard-hello.service"
    text = (UNITS / "portshard-hello.service").read_text()
    # By name (systemd's search path), and the reload reaches the supervisor it started.
    assert "ExecStart=portshard run " in text and "--name hello " in text
    assert "ExecReload=portshard reload --wait --name hello\n" in text
    service.write_text(text.replace("=portshard ", f"={PORTSHARD_BIN} "))
    shutil.copy(UNITS / "portshard-hello.socket", unit_dir)
    res = subprocess.run(
        [str(ANALYZE), "verify", str(service)], capture_output=True, text=True, timeout=60
    )
    return res.returncode, (res.stdout + res.stderr).strip()


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed (package systemd)")
def test_example_unit_passes_systemd_analyze_verify(short_tmp: Path) -> None:
    code, out = verify(short_tmp)
    assert code == 0 and out == "", out


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed (package systemd)")
def test_notify_reload_drop_in_is_for_systemd_253_and_later(short_tmp: Path) -> None:
    """The drop-in sets Type=notify-reload: clean on systemd >= 253; on 252 (Debian 12) it is
    the very warning the issue saw, which is why it is a separate, optional file."""
    drop_in = short_tmp / "portshard-hello.service.d"
    drop_in.mkdir()
    conf = UNITS / "notify-reload" / "portshard-hello.service.d" / "notify-reload.conf"
    shutil.copy(conf, drop_in)
    code, out = verify(short_tmp)
    assert code == 0, out
    if systemd_version() >= 253:
        assert out == "", out
    else:
        assert "Failed to parse service type, ignoring: notify-reload" in out, out
