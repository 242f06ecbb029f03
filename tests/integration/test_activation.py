"""LISTEN_FDS with real fds passed to real children, and sd_notify on real AF_UNIX sockets."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import portshard
from portshard import ActivationError
from tests.conftest import Procs, needs_root

from ._util import (
    AS_NOBODY,
    launch_with_fds,
    nobody_uid,
    notify_receiver,
    read_line,
    receive_with_pid,
)

# Print what inherited() returned, what is left of the environment, and the state of fds 3, 4.
REPORT = """
import json, os, socket, portshard
def fd_state(fd):
    try:
        os.fstat(fd)
    except OSError:
        return "closed"
    return "inheritable" if os.get_inheritable(fd) else "cloexec"
try:
    socks = portshard.inherited(*ARGS, **KW)
except portshard.ActivationError as exc:
    print(json.dumps({"error": str(exc), "fds": [fd_state(3), fd_state(4)]}), flush=True)
    raise SystemExit(0)
print(json.dumps({
    "socks": [
        {"fd": s.fileno(), "type": int(s.type), "port": s.getsockname()[1],
         "inheritable": s.get_inheritable()}
        for s in socks
    ],
    "env": {k: v for k, v in os.environ.items() if k.startswith("LISTEN_")},
    "fds": [fd_state(3), fd_state(4)],
}), flush=True)
SERVE
"""


def report(
    procs: Procs, fds: list[int], env: dict[str, str], *args: str, **kw: object
) -> dict[str, Any]:
    """Run REPORT in a child that inherits ``fds``; calls ``inherited(*args, **kw)``."""
    code = REPORT.replace("ARGS", repr(args)).replace("KW", repr(kw)).replace("SERVE", "")
    child = launch_with_fds(procs, fds, code, env)
    result: dict[str, Any] = json.loads(read_line(child))
    assert child.wait(timeout=10) == 0
    return result


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A TCP listener and a UDP socket, both real and bound to loopback port 0."""
    with portshard.listen("tcp://127.0.0.1:0") as tcp, portshard.listen("udp://127.0.0.1:0") as udp:
        yield tcp, udp


def test_inherits_real_sockets_in_order_and_serves_on_them(
    procs: Procs, pair: tuple[socket.socket, socket.socket]
) -> None:
    tcp, udp = pair
    serve = """
conn, _ = socks[0].accept()
conn.sendall(b"tcp from %d" % os.getpid())
conn.close()
data, peer = socks[1].recvfrom(64)
socks[1].sendto(b"udp from %d" % os.getpid(), peer)
"""
    code = REPORT.replace("ARGS", "()").replace("KW", "{}").replace("SERVE", serve)
    env = {"LISTEN_FDS": "2", "LISTEN_PID": "self", "LISTEN_FDNAMES": "http:dns"}
    child = launch_with_fds(procs, [tcp.fileno(), udp.fileno()], code, env)
    got = json.loads(read_line(child))
    assert [s["fd"] for s in got["socks"]] == [3, 4]
    assert [s["type"] for s in got["socks"]] == [socket.SOCK_STREAM, socket.SOCK_DGRAM]
    assert [s["port"] for s in got["socks"]] == [tcp.getsockname()[1], udp.getsockname()[1]]
    assert not any(s["inheritable"] for s in got["socks"]), "inherited fds must be close-on-exec"
    assert got["env"] == {}, "LISTEN_* must be removed so the child's children don't see them"
    # A real round trip on each inherited socket.
    with socket.create_connection(tcp.getsockname(), timeout=5) as conn:
        assert conn.recv(64) == b"tcp from %d" % child.pid
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(5)
        client.sendto(b"hi", udp.getsockname())
        assert client.recvfrom(64)[0] == b"udp from %d" % child.pid
    assert child.wait(timeout=10) == 0


def test_filter_by_name(procs: Procs, pair: tuple[socket.socket, socket.socket]) -> None:
    tcp, udp = pair
    env = {"LISTEN_FDS": "2", "LISTEN_PID": "self", "LISTEN_FDNAMES": "http:dns"}
    got = report(procs, [tcp.fileno(), udp.fileno()], env, "dns")
    assert [(s["fd"], s["port"]) for s in got["socks"]] == [(4, udp.getsockname()[1])]
    # The other one is left open but no longer leaks into programs this one runs.
    assert got["fds"] == ["cloexec", "cloexec"]
    got = report(procs, [tcp.fileno(), udp.fileno()], env, "nope")
    assert got["socks"] == []


def test_keep_environment_when_asked(
    procs: Procs, pair: tuple[socket.socket, socket.socket]
) -> None:
    tcp, _ = pair
    env = {"LISTEN_FDS": "1", "LISTEN_PID": "self"}
    got = report(procs, [tcp.fileno()], env, unset_environment=False)
    assert len(got["socks"]) == 1
    assert set(got["env"]) == {"LISTEN_FDS", "LISTEN_PID"}


def test_without_listen_pid_the_sockets_are_taken(
    procs: Procs, pair: tuple[socket.socket, socket.socket]
) -> None:
    tcp, _ = pair
    got = report(procs, [tcp.fileno()], {"LISTEN_FDS": "1"})
    assert [s["port"] for s in got["socks"]] == [tcp.getsockname()[1]]


def test_listen_pid_of_another_process_means_not_for_us(
    procs: Procs, pair: tuple[socket.socket, socket.socket]
) -> None:
    tcp, _ = pair
    env = {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid())}  # the parent's pid
    got = report(procs, [tcp.fileno()], env)
    assert got["socks"] == []
    assert got["fds"][0] == "inheritable", "fds meant for another process must be left alone"


def test_fd_not_open(procs: Procs, pair: tuple[socket.socket, socket.socket]) -> None:
    tcp, _ = pair
    got = report(procs, [tcp.fileno()], {"LISTEN_FDS": "2", "LISTEN_PID": "self"})
    assert got["error"].startswith("LISTEN_FDS=2 but fd 4 is not open; the parent did not pass it")
    assert got["fds"] == ["inheritable", "closed"], "on error no fd may be touched"


def test_fd_not_a_socket(procs: Procs, pair: tuple[socket.socket, socket.socket]) -> None:
    tcp, _ = pair
    read_end, write_end = os.pipe()
    try:
        env = {"LISTEN_FDS": "2", "LISTEN_PID": "self"}
        got = report(procs, [tcp.fileno(), read_end], env)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert got["error"].startswith("LISTEN_FDS=2 but fd 4 is a pipe, not a socket; ")
    assert "fds 3 to 4" in got["error"]
    assert got["fds"] == ["inheritable", "inheritable"]


# ------------------------------------------------------------- malformed, no fds needed


def test_absent_means_none() -> None:
    assert portshard.inherited(environ={}) == []
    assert portshard.inherited(environ={"LISTEN_PID": str(os.getpid())}) == []


def test_a_name_or_state_that_is_not_a_string_is_refused() -> None:
    # inherited(5) returned [] as if nothing was passed; notify(None) was an AttributeError
    # under a supervisor (NOTIFY_SOCKET set) and False without one.
    with pytest.raises(portshard.ActivationError, match=r"a LISTEN_FDNAMES name .* not 5"):
        portshard.inherited(5, environ={})  # type: ignore[arg-type]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(f"\0portshard-test-notify-{os.getpid()}")
        env = {"NOTIFY_SOCKET": f"@portshard-test-notify-{os.getpid()}"}
        for bad in (None, 5, b"READY=1"):
            with pytest.raises(portshard.ActivationError, match=r"as a string, e.g. 'READY=1'"):
                portshard.notify(bad, environ=env)  # type: ignore[arg-type]
            with pytest.raises(portshard.ActivationError):
                portshard.notify(bad, environ={})  # type: ignore[arg-type]
        with pytest.raises(portshard.ActivationError, match="send a shorter state"):
            portshard.notify("STATUS=" + "x" * 300_000, environ=env)
        assert portshard.notify("READY=1", environ=env)
        assert receiver.recv(64) == b"READY=1"


def test_listen_pid_mismatch_in_process() -> None:
    env = {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid() + 1)}
    assert portshard.inherited(environ=env) == []
    assert "LISTEN_FDS" in env


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"LISTEN_FDS": "two"}, "LISTEN_FDS='two' is not a whole number"),
        ({"LISTEN_FDS": ""}, "LISTEN_FDS='' is not a whole number"),
        ({"LISTEN_FDS": "-1"}, "LISTEN_FDS='-1' is not a whole number"),
        ({"LISTEN_FDS": " 1"}, "LISTEN_FDS=' 1' is not a whole number"),
        ({"LISTEN_FDS": "1_0"}, "LISTEN_FDS='1_0' is not a whole number"),
        ({"LISTEN_FDS": "1", "LISTEN_PID": "init"}, "LISTEN_PID='init' is not a whole number"),
        ({"LISTEN_FDS": "5000"}, "LISTEN_FDS=5000 is out of range (0-4096)"),
        (
            {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "http"},
            "LISTEN_FDNAMES='http' names 1 sockets but LISTEN_FDS=2; they must match",
        ),
        (
            {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"},
            "LISTEN_FDNAMES='a:b' names 2 sockets but LISTEN_FDS=1",
        ),
    ],
)
def test_malformed_values(env: dict[str, str], says: str) -> None:
    env = {"LISTEN_PID": str(os.getpid()), **env}
    before = dict(env)
    with pytest.raises(ActivationError) as info:
        portshard.inherited(environ=env)
    assert says in str(info.value)
    assert env == before, "a failed call must leave the environment as it was"


def test_malformed_number_message_says_how_to_fix() -> None:
    with pytest.raises(ActivationError) as info:
        portshard.inherited(environ={"LISTEN_FDS": "x"})
    assert "whoever started this process set it wrong" in str(info.value)
    assert "unset LISTEN_FDS" in str(info.value)


# ----------------------------------------------------------------------------- sd_notify


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_notify_ready_reaches_a_real_socket(procs: Procs, short_tmp: Path, kind: str) -> None:
    if kind == "path":
        bind_to = str(short_tmp / "notify")
        env_value = bind_to
    else:
        name = f"portshard-test-{uuid.uuid4().hex}"
        bind_to = "\0" + name
        env_value = "@" + name
    with notify_receiver(bind_to) as receiver:
        child = procs.python(
            "import portshard; print(portshard.notify_ready(), flush=True)",
            env={**os.environ, "NOTIFY_SOCKET": env_value},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
        )
        assert read_line(child) == "True"
        assert receive_with_pid(receiver) == (b"READY=1", child.pid)
    assert child.wait(timeout=10) == 0


def test_notify_any_state(short_tmp: Path) -> None:
    path = str(short_tmp / "n")
    with notify_receiver(path) as receiver:
        assert portshard.notify("STATUS=warming up\nMAINPID=1", environ={"NOTIFY_SOCKET": path})
        assert receive_with_pid(receiver) == (b"STATUS=warming up\nMAINPID=1", os.getpid())


def test_without_notify_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert portshard.notify_ready() is False
    assert portshard.notify_ready(environ={}) is False
    assert portshard.notify_ready(environ={"NOTIFY_SOCKET": ""}) is False


def test_notify_socket_neither_path_nor_abstract() -> None:
    with pytest.raises(ActivationError, match="NOTIFY_SOCKET='run/notify' is neither a path"):
        portshard.notify_ready(environ={"NOTIFY_SOCKET": "run/notify"})


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_notify_socket_with_nobody_listening_is_dropped_with_one_warning(
    short_tmp: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The supervisor is gone (an address it bound, then closed): the worker goes on.
    if kind == "path":
        bound = value = str(short_tmp / "gone")
    else:
        name = f"portshard-test-{uuid.uuid4().hex}"
        bound, value = "\0" + name, "@" + name
    with notify_receiver(bound):
        assert portshard.notify_ready(environ={"NOTIFY_SOCKET": value})
    if kind == "path":
        os.unlink(bound)
    with caplog.at_level("WARNING", logger="portshard"):
        assert portshard.notify_ready(environ={"NOTIFY_SOCKET": value}) is False
        assert portshard.notify("STATUS=x", environ={"NOTIFY_SOCKET": value}) is False
    (record,) = caplog.records
    why = "No such file or directory" if kind == "path" else "Connection refused"
    assert f"nobody listens on NOTIFY_SOCKET={value!r} ({why})" in record.getMessage()
    assert "--orphan-timeout 0" in record.getMessage()


def test_a_full_notify_queue_drops_status_after_a_wait_and_keeps_ready(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Nobody reads (a warden keeps the socket for the next supervisor): a `STATUS=` a second
    # from a serving loop blocked at the 12th send, for as long as nobody came.
    import threading
    import time

    from portshard import activation

    monkeypatch.setattr(activation, "NOTIFY_WAIT", 0.3)
    env = {"NOTIFY_SOCKET": str(short_tmp / "notify")}
    with notify_receiver(env["NOTIFY_SOCKET"]) as receiver, caplog.at_level("WARNING"):
        sent = 0
        while sent < 1000:  # the queue holds net.unix.max_dgram_qlen (10 here) at most
            began = time.monotonic()
            if not portshard.notify(f"STATUS={sent}", environ=env):
                break
            sent += 1
        waited = time.monotonic() - began
        assert 0 < sent < 1000, sent
        assert 0.25 <= waited < 3, waited  # it waited its NOTIFY_WAIT, then gave up
        began = time.monotonic()
        assert portshard.notify("STATUS=again", environ=env) is False
        assert time.monotonic() - began < 0.2  # still full: dropped at once
        assert [r.getMessage() for r in caplog.records if "full" in r.getMessage()] == [
            f"pid {os.getpid()}: NOTIFY_SOCKET={env['NOTIFY_SOCKET']!r} has been full for 0.3 s: "
            "nobody reads it (its supervisor is gone and the next one has not come, or it is "
            "stopped); this process goes on, and its notifications other than READY=1 are "
            "dropped while the queue stays full (said once a spell)"
        ]
        ready: list[bool] = []
        sender = threading.Thread(target=lambda: ready.append(portshard.notify_ready(environ=env)))
        sender.start()
        sender.join(1.0)
        assert sender.is_alive() and not ready  # READY=1 waits for room: the adopter needs it
        assert receiver.recv(64) == b"STATUS=0"  # one read makes room
        sender.join(5)
        assert ready == [True]
        received = [receiver.recv(64) for _ in range(sent)]
        assert received[-1] == b"READY=1"
        assert portshard.notify("STATUS=read", environ=env) is True  # read again: sent
        assert receiver.recv(64) == b"STATUS=read"
    assert env["NOTIFY_SOCKET"] not in activation._FULL


TWICE = """
import json, portshard
first = portshard.inherited(unset_environment=False)
again = portshard.inherited(unset_environment=False)
same = [a is b for a, b in zip(first, again)]
first[0].close()  # one close: two objects on fd 3 would close it twice
del first, again
try:
    portshard.inherited(unset_environment=False)
    error = None
except portshard.ActivationError as exc:
    error = str(exc)
print(json.dumps({"same": same, "error": error}), flush=True)
"""


def test_inherited_twice_returns_the_same_sockets_and_a_closed_one_is_named(
    procs: Procs, pair: tuple[socket.socket, socket.socket]
) -> None:
    tcp, udp = pair
    env = {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:dns"}
    child = launch_with_fds(procs, [tcp.fileno(), udp.fileno()], TWICE, env)
    result = json.loads(read_line(child))
    assert child.wait(timeout=10) == 0
    assert result["same"] == [True, True]
    assert "fd 3 of LISTEN_FDS was taken by an earlier inherited() call" in result["error"]
    assert "keep the sockets the first call returned" in result["error"]


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("/" + "x" * 120, ["121 bytes, longer than the 108 an AF_UNIX address holds"]),
        ("vsock:2:1234", ["is a VSOCK address", "unset NOTIFY_SOCKET"]),
    ],
)
def test_notify_socket_that_cannot_be_an_address_says_why(value: str, says: list[str]) -> None:
    with pytest.raises(ActivationError) as info:
        portshard.notify_ready(environ={"NOTIFY_SOCKET": value})
    for part in says:
        assert part in str(info.value), str(info.value)


def test_notify_socket_that_is_a_stream_socket_says_so(short_tmp: Path) -> None:
    path = str(short_tmp / "stream")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stream:
        stream.bind(path)
        stream.listen()
        with pytest.raises(ActivationError, match="not a datagram socket"):
            portshard.notify_ready(environ={"NOTIFY_SOCKET": path})


@needs_root
def test_notify_socket_another_user_cannot_write_says_who_must_fix_it(
    procs: Procs, short_tmp: Path
) -> None:
    nobody_uid()
    path = str(short_tmp / "notify")
    with notify_receiver(path):
        os.chmod(path, 0o600)  # the supervisor's, not the worker's user
        code = AS_NOBODY + (
            "try:\n"
            f"    portshard.notify_ready(environ={{'NOTIFY_SOCKET': {path!r}}})\n"
            "except portshard.ActivationError as exc:\n"
            "    print(exc, flush=True)\n"
        )
        child = procs.python(code, stdout=subprocess.PIPE, bufsize=0)
        line = read_line(child)
        assert child.wait(timeout=10) == 0
    assert "Permission denied" in line, line
    assert "may not write to it" in line
    assert "--user" in line
