"""`portshard run` as a new user types it (issue 12): the program's options stay the program's,
and a port that something already serves is refused, naming it, unless --join-existing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.supervisor_fixture import FDWORKER, PORTSHARD, Running, Start


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def get(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_the_programs_w_is_the_programs(start: Start) -> None:
    # `portshard run -w 2 --listen ... gunicorn -w 4 app:app` ran 4 slots.
    sup = start("-w", "2", "--listen", "tcp://127.0.0.1:0", *FDWORKER, "-w", "4")
    st = sup.status()
    assert st["workers"] == 2 and len(st["slots"]) == 2
    assert cmdline(st["slots"][0]["pid"])[-2:] == ["-w", "4"]


def test_status_json_prints_what_the_control_socket_answers(shared_sup: Running) -> None:
    # The fixture asks the control socket in-process (Running.status); this is the CLI's side.
    sup = shared_sup
    res = sup.ctl("status", "--json")
    printed, asked = json.loads(res.stdout), sup.status()
    assert res.returncode == 0 and "Traceback" not in res.stderr
    assert printed.keys() == asked.keys() and printed["ready"] is True
    assert printed["listen"] == asked["listen"] and printed["pid"] == asked["pid"]
    assert [s["pid"] for s in printed["slots"]] == [s["pid"] for s in asked["slots"]]


def test_python_m_runs_as_written(start: Start) -> None:
    # `... python3 -m http.server` said "No such option '-m'".
    sup = start(
        "-w", "1", "--listen", "tcp://127.0.0.1:0",
        sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "{port}",
    )  # fmt: skip
    assert get(sup.port).startswith(b"HTTP/1.0 200")


def test_a_served_port_is_refused_naming_its_holder_unless_joining(
    start: Start, short_tmp: Path
) -> None:
    first = start("-w", "1", "--listen", "tcp://127.0.0.1:0", "--", *FDWORKER)
    port = first.port
    assert first.proc is not None
    holders = {first.proc.pid, *first.pids()}
    args = ["-w", "1", "--listen", f"tcp://127.0.0.1:{port}", "--", *FDWORKER]
    res = subprocess.run(
        [*PORTSHARD, "run", "--control", str(short_tmp / "second.sock"), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 1, res.stderr
    assert f"tcp://127.0.0.1:{port} is already served by pid " in res.stderr
    named = int(res.stderr.split(" is already served by pid ")[1].split()[0])
    assert named in holders and "a portshard supervisor or its worker" in res.stderr
    assert "--join-existing" in res.stderr and "Traceback" not in res.stderr
    assert not (short_tmp / "second.sock").exists()
    second = start("--join-existing", *args)  # asked for: it shares the port
    assert second.port == port and second.status()["ready"]
    seen = {get(port).split(b"\r\n\r\n")[1].split()[1] for _ in range(40)}
    # (its steering program now decides for the whole reuseport group: all go to its slots)
    assert {str(p).encode() for p in second.pids()} <= seen, "the joined supervisor serves"


def test_a_reload_says_which_file_changes_it_cannot_apply(start: Start, short_tmp: Path) -> None:
    # issue 14 item 8 / issue 12 item 8: a changed listen or workers was ignored without a word.
    conf = short_tmp / "ps.toml"
    quoted = ", ".join(f'"{arg}"' for arg in FDWORKER)
    conf.write_text(f'command = [{quoted}]\nlisten = ["tcp://127.0.0.1:0"]\nworkers = 1\n')
    sup = start("-c", str(conf))
    conf.write_text(f'command = [{quoted}]\nlisten = ["tcp://127.0.0.1:1"]\nworkers = 2\n')
    sup.ctl("reload")
    log = sup.text()
    assert "reload: listen changed in" in log and "the sockets are bound once" in log
    # the count: either the loop scales to it (plan_reload.scale_to) or the log says why not
    assert "scaling to it after the reload" in log and sup.status()["workers"] == 2
    assert sup.status()["listen"][0]["port"] != 1


def test_two_supervisors_started_together_on_one_port_leave_one(start: Start) -> None:
    # Both passed the "already served" check before either bound, and both ran: the kernel
    # split the port's connections between them (by hand 1 of 1 time, here 1 run of 3).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free now; nobody else binds a fixed port here
    args = ["-w", "1", "--listen", f"tcp://127.0.0.1:{port}", "--", *FDWORKER]
    both = [start(*args, wait=False), start(*args, wait=False)]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and all(s.proc and s.proc.poll() is None for s in both):
        time.sleep(0.1)
    refused = [s for s in both if s.proc and s.proc.poll() is not None]
    assert len(refused) == 1, [s.text()[-500:] for s in both]
    (kept,) = [s for s in both if s is not refused[0]]
    assert refused[0].wait_exit() == 1
    assert f"tcp://127.0.0.1:{port} is already served by pid " in refused[0].text()
    assert "Traceback" not in refused[0].text()
    assert kept.wait_ready()["ready"] and get(port).startswith(b"HTTP/1.0 200")


def _by_name(name: str, env: dict[str, str], *args: str) -> dict[str, object]:
    """`portshard run --name NAME` without --control (its socket by name), with ``env``: its
    status once ready, then it is stopped."""
    proc = subprocess.Popen(
        [*PORTSHARD, "run", "--name", name, *args], env={**os.environ, **env},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            res = subprocess.run(
                [*PORTSHARD, "status", "--json", "--name", name],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            if res.returncode == 0 and json.loads(res.stdout)["ready"]:
                return {"status": json.loads(res.stdout)}
            time.sleep(0.2)
        proc.terminate()
        return {"exited": proc.wait(15), "stderr": proc.communicate(timeout=15)[1]}
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(15)
        if proc.stderr is not None:
            proc.stderr.close()


def test_portshard_control_in_the_environment_is_not_the_run_s_own_socket(
    start: Start,
) -> None:
    # $PORTSHARD_CONTROL is for the client commands. Exported in the shell, `run --name hb`
    # looked for adoption at it: it refused to start while the supervisor it named lived
    # ("already running"), and adopted that one's 2 workers (and port) once it died.
    args = ["-w", "2", "--orphan-timeout", "60", "--listen", "tcp://127.0.0.1:0", *FDWORKER]
    first = start(*args)
    env = {"PORTSHARD_CONTROL": first.control}
    name = f"hb-test-{os.getpid()}"
    other = ["-w", "1", "--listen", "tcp://127.0.0.1:0", "--", *FDWORKER]
    beside = _by_name(name, env, *other)
    assert "status" in beside, beside
    orphans = first.pids()
    assert first.proc is not None
    first.proc.kill()  # its warden keeps the 2 workers for the next start of *its* socket
    first.proc.wait(10)
    after = _by_name(name, env, *other)
    assert "status" in after, after
    st = after["status"]
    assert isinstance(st, dict) and st["workers"] == 1
    assert not {s["pid"] for s in st["slots"]} & set(orphans)
    heir = Running(args, Path(first.control))  # the right heir adopts them, and stops them
    try:
        assert sorted(s["pid"] for s in heir.wait_ready()["slots"]) == sorted(orphans)
    finally:
        heir.close()


def test_a_port_that_cannot_be_shared_says_why_not_join_existing(short_tmp: Path) -> None:
    # A holder without SO_REUSEPORT: the refusal said "starting would share the port with it
    # ... pass --join-existing to share it on purpose", and --join-existing then failed
    # with the real reason. Now the first answer is the real reason.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        control = short_tmp / "n.sock"
        for address in (f"tcp://127.0.0.1:{port}", f"tcp://:{port}"):
            res = subprocess.run(
                [*PORTSHARD, "run", "--control", str(control), "-w", "1", "--listen", address,
                 "--", *FDWORKER],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
            lines = res.stderr.strip().splitlines()
            assert len(lines) == 1, lines
            assert f"pid {os.getpid()}" in lines[0] and "without SO_REUSEPORT" in lines[0]
            assert "--join-existing" not in lines[0] and "would share" not in lines[0]
            assert not control.exists()
        # the holder was not disturbed: it still gets every connection
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            conn, _ = held.accept()
            conn.close()


def test_metrics_without_its_package_is_refused_before_anything_opens(short_tmp: Path) -> None:
    # pip install portshard (no `metrics` extra), then --metrics: a ModuleNotFoundError
    # traceback once the sockets and steering were set up. The package is made absent in
    # that interpreter only (a None entry in sys.modules makes its import fail).
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "from portshard.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    control = str(short_tmp / "m.sock")
    args = ["run", "--control", control, "-w", "1", "--metrics", "127.0.0.1:0"]
    args += ["--listen", "tcp://127.0.0.1:0", "--", *FDWORKER]
    res = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    assert "pip install 'portshard[metrics]'" in res.stderr
    assert "listening on" not in res.stderr  # refused before any socket
    assert not Path(control).exists()


def test_a_script_whose_interpreter_is_missing_is_named_and_nothing_stays(
    short_tmp: Path,
) -> None:
    # exec's ENOENT said "check the path, or that it is on PATH" of a script that was there;
    # what is missing is its '#!' interpreter. A script with no '#!' line (ENOEXEC) said
    # only "Exec format error".
    control = short_tmp / "i.sock"
    for text, says in (
        ("#!/nonexistent/interp\n", "(the interpreter '/nonexistent/interp' of its '#!' line)"),
        ("echo hi\n", "Exec format error; it is not a program this machine can run"),
    ):
        script = short_tmp / "srv"
        script.write_text(text)
        script.chmod(0o755)
        res = subprocess.run(
            [*PORTSHARD, "run", "--control", str(control), "-w", "2", "--listen",
             "tcp://127.0.0.1:0", str(script)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert res.returncode == 1, res.stderr
        assert "Traceback" not in res.stderr
        errors = [line for line in res.stderr.splitlines() if "ERROR" in line]
        assert len(errors) == 1 and says in errors[0], res.stderr
        assert not control.exists()  # stopped, its socket removed
