"""Acceptance: unmodified programs under `portshard run` (--via auto: the LD_PRELOAD shim or the
seccomp trap), each binding the port itself. Real programs, bounded loopback load, port 0.

Each program: 3 workers on one port, answers from >= 2 pids, 3 rolling reloads under load
(9 handovers) with no failed exchange, then a SIGKILL of a worker that fails at most the
exchanges it held.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from bench.load.rawload import RawLoad, http_get

from portshard.linux import proc, sockdiag
from tests.conftest import ROOT, wait_until
from tests.integration.conftest import need
from tests.supervisor_fixture import Start

WORKERS = ROOT / "tests" / "workers"
RELOADS = 3  # each replaces all 3 workers: a program the shim or the trap mishandles fails at once


def pid_last_word(body: str) -> int | None:
    words = body.split()
    return int(words[-1]) if words and words[-1].isdigit() else None


def pid_first_word(body: str) -> int | None:
    words = body.split()
    return int(words[0]) if words and words[0].isdigit() else None


@dataclass
class Program:
    argv: list[str]
    mode: str  # what status must show for each worker
    marker: str  # a word in the program's command line (for "no process left")
    request: Callable[[int], bytes] = http_get
    half_close: bool = False
    reply_required: bool = True
    pid_of: Callable[[str], int | None] = pid_last_word
    check: Callable[[int, str], bool] = lambda _n, _body: True  # the reply fits the request
    out: Path | None = None  # nc: each worker writes what it receives to out/nc.PID
    env: dict[str, str] = field(default_factory=dict)


def programs(name: str, tmp: Path, request: pytest.FixtureRequest) -> Program:
    if name == "nc":
        need("nc")
        return Program(
            ["sh", "-c", 'exec nc -k -l {port} </dev/null >"$PS_OUT/nc.$$"'],
            "preload",
            "-k -l",
            request=lambda n: f"portshard:{n}\n".encode(),
            half_close=True,
            reply_required=False,
            pid_of=lambda _b: None,
            out=tmp,
            env={"PS_OUT": str(tmp)},
        )
    if name == "http.server":
        script = (
            'mkdir -p "$PS_OUT/$$" && echo $$ >"$PS_OUT/$$/index.html" && '
            f'exec {sys.executable} -m http.server -d "$PS_OUT/$$" {{port}}'
        )
        return Program(["sh", "-c", script], "preload", "http.server", env={"PS_OUT": str(tmp)})
    if name == "node":
        return Program([need("node"), str(WORKERS / "hello.js"), "{port}"], "preload", "hello.js")
    if name == "go":
        return Program([request.getfixturevalue("go_server"), "{port}"], "seccomp", "hello")
    if name == "static-c":
        binary = request.getfixturevalue("static_server")
        return Program([binary, "{port}"], "seccomp", "static_server")
    assert name == "ruby"
    return Program(
        [need("ruby"), str(WORKERS / "echo_server.rb"), "{port}"],
        "preload",
        "echo_server.rb",
        request=lambda n: f"hello {n}\n".encode(),
        pid_of=pid_first_word,
        check=lambda n, body: body.split()[1:] == ["hello", str(n)],
    )


def received_by_nc(out: Path) -> dict[int, set[int]]:
    """pid -> the exchange numbers that nc worker printed."""
    got: dict[int, set[int]] = {}
    for path in out.glob("nc.*"):
        numbers = {
            int(line.split(":", 1)[1])
            for line in path.read_text().splitlines()
            if line.startswith("portshard:")
        }
        got[int(path.name.split(".", 1)[1])] = numbers
    return got


def lost(prog: Program, load: RawLoad, first: int, last: int) -> list[str]:
    """Exchanges in results[first:last] that failed, or whose reply (or nc's output) is wrong."""
    bad = []
    delivered: set[int] = set()
    if prog.out is not None:
        for numbers in received_by_nc(prog.out).values():
            delivered |= numbers
    for result, n in zip(load.results[first:last], load.sent[first:last], strict=True):
        if not result.ok:
            bad.append(result.kind)
        elif prog.out is not None and n not in delivered:
            bad.append("not-delivered")
        elif prog.out is None and not prog.check(n, result.body):
            bad.append(f"wrong reply {result.body!r}")
    return bad


def none_left(marker: str, port: int) -> bool:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return not any(marker in line and str(port) in line.split() for line in out.splitlines())


def pids_seen(prog: Program, load: RawLoad) -> set[int]:
    if prog.out is not None:
        return {pid for pid, numbers in received_by_nc(prog.out).items() if numbers}
    return {p for r in load.results if r.ok and (p := prog.pid_of(r.body)) is not None}


@pytest.mark.parametrize("name", ["nc", "http.server", "node", "go", "static-c", "ruby"])
def test_unmodified_program_shares_reloads_and_survives_a_kill(
    name: str, start: Start, short_tmp: Path, request: pytest.FixtureRequest
) -> None:
    prog = programs(name, short_tmp, request)
    sup = start("-w", "3", "--listen", "tcp://127.0.0.1:0", "--", *prog.argv, env=prog.env)
    st = sup.status()
    port = st["listen"][0]["port"]
    assert [s["mode"] for s in st["slots"]] == [prog.mode] * 3, st["slots"]
    load = RawLoad(
        "127.0.0.1",
        port,
        prog.request,
        concurrency=6,
        max_seconds=100,
        half_close=prog.half_close,
        reply_required=prog.reply_required,
    )
    with load:
        load.wait_for(60)
        for _ in range(RELOADS):
            sup.reload()
        load.wait_for(load.count() + 30)
        reloaded = load.count()
        # Freeze one worker, count the connections it holds (it cannot take more while
        # stopped), then SIGKILL it: those are the exchanges in flight that may fail.
        victim = sup.status()["slots"][1]["pid"]
        os.kill(victim, signal.SIGSTOP)
        # kill() returns before the victim has stopped: one running on the other CPU can
        # still accept a connection, which the count below would miss.
        wait_until(lambda: getattr(proc.stat(victim), "state", "T") == "T", 10, "stopped")
        held = sockdiag.connections_of(victim, ports={port})
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: (
                (s := sup.status()["slots"][1])["pid"] not in (None, victim)
                and s["state"] == "ready"
            ),
            20,
            "the killed worker's respawn",
        )
        load.wait_for(load.count() + 30)
    total = load.count()
    st = sup.status()
    reload_losses = lost(prog, load, 0, reloaded)
    kill_losses = lost(prog, load, reloaded, total)
    print(
        f"{name}: {total} exchanges, {len(pids_seen(prog, load))} pids, {RELOADS} reloads "
        f"({reloaded} exchanges): {len(reload_losses)} lost; SIGKILL with {held} in flight: "
        f"{len(kill_losses)} lost {kill_losses}"
    )
    assert st["reloads"] == {"ok": RELOADS, "failed": 0}
    assert [s["mode"] for s in st["slots"]] == [prog.mode] * 3
    assert len(pids_seen(prog, load)) >= 2
    assert not reload_losses, reload_losses
    assert len(kill_losses) <= held, (held, kill_losses)
    sup.close()
    assert sup.proc is not None and sup.proc.returncode == 0, sup.text()
    wait_until(lambda: none_left(prog.marker, port), 10, "every worker gone")


def test_via_preload_on_a_static_program_says_why_it_cannot_work(
    start: Start, static_server: str
) -> None:
    # The shim cannot reach a static program's bind(): it got EADDRINUSE and the boot said
    # "run it by hand to see why", where it works. The spawn line now says so, as a warning.
    sup = start(
        "-w",
        "1",
        "--via",
        "preload",
        "--listen",
        "tcp://127.0.0.1:0",
        "--",
        static_server,
        "{port}",
        wait=False,
    )
    sup.wait_exit(30)
    text = sup.text()
    assert "WARNING" in text and "--via preload, but" in text, text
    assert "use --via seccomp or auto" in text, text
