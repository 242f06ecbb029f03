"""The README's recipes, for real: each server under `portshard run -w 2` on loopback, a bounded
connection-per-request load, 3 `reload --wait`s and a `stop`: 0 failed, and the application's
own shutdown hook seen for every process retired (ASGI lifespan shutdown, gunicorn's
worker_exit/on_exit, aiohttp's on_shutdown, node's server.close(), Go's Shutdown(), nginx's
graceful exit).

`test_recipe` runs each recipe as the README writes it. Most need no flag: tree-wide readiness
sees a pre-fork master's children wait on the socket, and the default retirement runs the
server's shutdown once the frozen tree holds nothing and no new connection can reach its slot.
`test_recipe_with_defaults` runs the servers whose recipe has flags (gunicorn, nginx, Go) and
hypercorn's own pre-fork mode with portshard's defaults (no --ready, no --drain).
`test_recipe_without_steering_runs_the_shutdown_hook`: one slot, or --steering off, where
nothing but a hold on the slot's socket keeps new connections off the retiring worker.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from bench.load.loadgen import Load

from portshard.control.client import request
from portshard.errors import ControlError
from tests.conftest import ROOT, wait_until
from tests.integration.conftest import need
from tests.supervisor_fixture import Running, Start

APPS = ROOT / "tests" / "workers" / "recipes"
BIN = Path(sys.executable).parent


def python_tool(name: str) -> str:
    """A server installed in this venv (the `recipes` extra), else skip/fail like need()."""
    path = BIN / name
    return str(path) if path.exists() else need(name)


@dataclass
class Recipe:
    argv: list[str]  # the program, after `--`
    flags: list[str]  # what portshard run needs today, besides -w and --listen
    hooks: dict[str, int]  # per process retired: {marker or log event: how many}
    keep: list[str] = field(default_factory=list)  # flags that stay with the defaults
    env: dict[str, str] = field(default_factory=dict)


# The stop signal and --grace at once (--drain signal): only for servers whose graceful stop
# serves every connection they accepted. Most asyncio servers (uvicorn, hypercorn, aiohttp) and
# node close a connection they accepted but have not read yet as "idle": measured here, 1-3
# empty or reset replies in 2-9k requests over 3 reloads (hypercorn, aiohttp). Those use the
# default retirement, which signals a worker only once it is frozen holding nothing and no new
# connection can reach its slot: their hooks run and nothing is lost.
GRACEFUL_STOP = ["--drain", "signal"]
ASYNC_HOOK = {"shutdown": 1}


def recipe(name: str, request: pytest.FixtureRequest) -> Recipe:
    """The command line each README recipe gives (port 0 here: {port} is the one chosen)."""
    if name in ("gunicorn", "gunicorn-w2"):
        # gunicorn takes the slot's socket from LISTEN_FDS whatever --bind says (the -w 2
        # recipe writes one, as many do); it says READY=1 (sd_notify) from its master.
        inner = 2 if name == "gunicorn-w2" else 1
        argv = [python_tool("gunicorn"), "-c", str(APPS / "gunicorn_conf.py")]
        argv += ["--no-control-socket", "--chdir", str(APPS), "-w", str(inner)]
        if inner == 2:
            argv += ["--bind", "127.0.0.1:{port}"]
        return Recipe(
            [*argv, "wsgi_app:app"],
            ["--ready", "notify", *GRACEFUL_STOP],  # the sync worker serves what it accepted
            {"on_exit": 1, "worker_exit": inner},
        )
    if name == "uvicorn":
        argv = [python_tool("uvicorn"), "--app-dir", str(APPS), "asgi_app:app"]
        argv += ["--port", "{port}", "--no-access-log"]
        return Recipe(argv, [], ASYNC_HOOK)
    if name.startswith("hypercorn"):
        # --workers 0: no pre-fork master of its own (portshard is the master).
        workers = ["--workers", "0"] if name == "hypercorn" else []
        argv = [python_tool("hypercorn"), "--bind", "127.0.0.1:{port}", *workers]
        argv += ["--graceful-timeout", "5", "asgi_app:app"]
        return Recipe(argv, [], ASYNC_HOOK, env={"PYTHONPATH": str(APPS)})
    if name == "granian":
        # Binds its own address (interposed); its master handles SIGTERM in its main thread
        # only, which waits in native code while the Rust runtime's threads run.
        argv = [python_tool("granian"), "--interface", "asgi", "--host", "127.0.0.1"]
        argv += ["--port", "{port}", "asgi_app:app"]
        return Recipe(argv, [], ASYNC_HOOK, env={"PYTHONPATH": str(APPS)})
    if name == "aiohttp":
        # aiohttp's shutdown closes what it accepted and has not read: the default retirement
        # signals it only when nothing can reach its slot (was --drain freeze-kill, which
        # skipped on_shutdown: 3 empty replies in 8k requests over 3 reloads before that).
        argv = [sys.executable, str(APPS / "aiohttp_app.py")]
        return Recipe(argv, [], ASYNC_HOOK)
    if name == "node":
        argv = [need("node"), str(APPS / "server.js"), "{port}"]
        return Recipe(argv, [], ASYNC_HOOK)
    if name == "go":
        binary = request.getfixturevalue("go_recipe_server")
        # Go's Shutdown() waits for connections that have not sent a request yet (up to 5 s).
        return Recipe([binary, "{port}"], GRACEFUL_STOP, {"shutdown": 1})
    if name == "waitress":
        # Binds its own address (interposed); dies on SIGTERM, having served what it read.
        argv = [python_tool("waitress-serve"), "--host", "127.0.0.1", "--port", "{port}"]
        return Recipe([*argv, "wsgi_app:app"], [], {}, env={"PYTHONPATH": str(APPS)})
    if name == "twisted":
        # Twisted's own systemd endpoint takes fd 3 (LISTEN_FDS index 0): no interposition.
        argv = [python_tool("twistd"), "-n", "--pidfile=", "web", "--wsgi", "wsgi_app.app"]
        argv += ["--listen", "systemd:domain=INET:index=0"]
        return Recipe(argv, ["--via", "fds"], {}, keep=["--via", "fds"],
                      env={"PYTHONPATH": str(APPS)})  # fmt: skip
    if name == "uwsgi":
        # uWSGI serves the LISTEN_FDS socket in its default protocol: --protocol http (its
        # --http-socket would serve the same socket a second time: refused, test below).
        # SIGTERM is uWSGI 2.0's "brutal reload" (the master never exits; SIGKILL at
        # --grace): the hook makes it the graceful stop.
        argv = [need("uwsgi"), "--plugin", "python3", "--protocol", "http", "--master"]
        argv += ["--processes", "2", "--module", "wsgi_app:app", "--chdir", str(APPS)]
        argv += ["--hook-master-start", "unix_signal:15 gracefully_kill_them_all"]
        return Recipe(argv, ["--via", "fds"], {"clean exit": 1}, keep=["--via", "fds"])
    if name == "haproxy":
        # haproxy as the backend server (it answers "pid N" itself); SIGUSR1 is its soft stop
        # (TERM its hard one).
        script = (
            f'sed "s/BIND/127.0.0.1:$1/" {APPS / "haproxy.cfg"} >"$PS_MARKERS/h.$$.cfg" && '
            f'exec {need("haproxy")} -db -f "$PS_MARKERS/h.$$.cfg"'
        )
        flags = ["--stop-signal", "USR1"]
        return Recipe(["sh", "-c", script, "sh", "{port}"], flags, {"clean exit": 1}, keep=flags)
    assert name in ("nginx", "nginx-fds")
    # nginx needs its port in its configuration: written from the template with {port}.
    # QUIT is nginx's graceful stop (TERM is its fast one); its workers get it too and finish,
    # closing only keep-alive connections between requests, never a new one.
    # nginx-fds: no interposition; nginx's own inherited-socket variable (its binary upgrade)
    # names fd 3, and its `listen` matches the socket's address, so it binds nothing. nginx
    # takes an inherited socket to be non-blocking: without --nonblocking a worker that lost
    # the race for a connection blocked in accept() (2 timeouts and a SIGKILL, 1-2 runs in 6).
    nginx = need("nginx")
    fds = ["--via", "fds", "--nonblocking"]
    inherit, via = ('NGINX="3;" ', fds) if name == "nginx-fds" else ("", [])
    script = (
        f'sed "s/PORT/127.0.0.1:$1/" {APPS / "nginx.conf"} >"$PS_MARKERS/nginx.$$.conf" && '
        f'{inherit}exec {nginx} -p "$PS_MARKERS" -c "$PS_MARKERS/nginx.$$.conf" -e stderr '
        f'-g "pid $PS_MARKERS/nginx.$$.pid;"'
    )
    return Recipe(
        ["sh", "-c", script, "sh", "{port}"],
        [*via, "--ready", "delay:1", "--stop-signal", "QUIT", "--drain", "signal"],
        {"clean exit": 1, "gracefully shutting down": 2},
        keep=[*via, "--stop-signal", "QUIT"],
    )


@pytest.fixture(scope="session")
def go_recipe_server(build_dir: Path) -> str:
    """server.go (graceful Shutdown on SIGTERM) built with CGO_ENABLED=0."""
    out = build_dir / "recipe_server"
    env = {**os.environ, "CGO_ENABLED": "0", "GO111MODULE": "off"}
    if not env.get("HOME") and not env.get("GOCACHE"):
        env["GOCACHE"] = str(build_dir / "gocache")
        env["GOPATH"] = str(build_dir / "gopath")
    subprocess.run(
        [need("go"), "build", "-o", str(out), str(APPS / "server.go")],
        check=True,
        timeout=300,
        env=env,
        cwd=build_dir,
    )
    return str(out)


def observed(markers: Path, log: str) -> dict[str, int]:
    """Shutdown hooks seen: marker files (EVENT.PID), clean exits and nginx's own lines."""
    counts: dict[str, int] = {}
    for path in markers.iterdir():
        event, _, pid = path.name.partition(".")
        if pid.isdigit():
            counts[event] = counts.get(event, 0) + 1
    counts["clean exit"] = log.count("retired (exit status 0)")
    counts["gracefully shutting down"] = log.count("gracefully shutting down")
    return counts


@dataclass
class Outcome:
    load: Load
    reloads: dict[str, int]
    took: list[float]  # seconds per reload --wait
    booted: list[float]  # seconds each new worker took to be ready (from the log)
    exit: int
    log: str

    workers: int = 2

    def handover(self) -> list[float]:
        """Per reload, what was not the new workers' start-up (one slot at a time): retiring
        the old ones."""
        n = self.workers
        per = self.booted[n:]
        return [t - sum(per[n * i : n * i + n]) for i, t in enumerate(self.took)]


def ask(sup: Running, cmd: str, **args: Any) -> dict[str, Any]:
    """What `portshard CMD` sends, from this process (no interpreter start per call: these
    servers' start-up already dominates the run time)."""
    return request(sup.control, cmd, timeout=120, **args)


def wait_ready(sup: Running, timeout: float) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        if sup.proc is not None and sup.proc.poll() is not None:
            raise AssertionError(f"supervisor exited {sup.proc.returncode}:\n{sup.text()}")
        try:
            st = ask(sup, "status")
        except (ControlError, OSError):
            return None
        return st if st["ready"] else None

    result: dict[str, Any] = wait_until(ready, timeout, "supervisor ready")
    return result


def serve_reload_stop(
    start: Start, rec: Recipe, flags: list[str], markers: Path, workers: int = 2
) -> Outcome:
    """`portshard run -w 2`, load, 3 `reload --wait`s (one slot at a time, the default: while
    a slot's old worker runs its shutdown, steering sends new connections to the other slot),
    then `stop`."""
    env = {**rec.env, "PS_MARKERS": str(markers)}
    args = ["-w", str(workers), "--listen", "tcp://127.0.0.1:0", *flags, "--", *rec.argv]
    sup = start(*args, env=env, wait=False)
    port = wait_ready(sup, 40)["listen"][0]["port"]
    took: list[float] = []
    with Load("127.0.0.1", port, concurrency=4, max_seconds=90) as load:
        load.wait_for(40)
        for _ in range(3):
            t0 = time.monotonic()
            ask(sup, "reload", wait=True)
            took.append(time.monotonic() - t0)
            load.wait_for(load.count() + 20)
    reloads = ask(sup, "status")["reloads"]
    ask(sup, "stop")
    code = sup.wait_exit(60)
    log = sup.text()
    booted = [float(s) for s in re.findall(r"ready (?:\(notify\) )?after ([\d.]+)s", log)]
    return Outcome(load, reloads, took, booted, code, log, workers)


def check(name: str, hooks: dict[str, int], out: Outcome, markers: Path, workers: int = 2) -> None:
    held = re.findall(r"held off its slot for ([\d.]+s)", out.log)
    print(
        f"{name}: {out.load.count()} requests from {len(out.load.served_by())} pids; "
        f"3 reloads took {', '.join(f'{t:.1f}' for t in out.took)} s, of which handing over "
        f"{', '.join(f'{t:.1f}' for t in out.handover())} s; failed {out.load.by_kind()}; "
        f"{sum(r.latency >= 1 for r in out.load.results)} took 1 s or more; held off "
        f"{', '.join(held) or 'never'}"
    )
    if os.environ.get("RECIPES_LOG"):
        print(out.log)
    assert out.exit == 0, out.log
    assert out.reloads == {"ok": 3, "failed": 0}, out.log
    assert not out.load.failed, out.load.by_kind()
    assert len(out.load.served_by()) >= 2
    retired = workers * 4  # slots x (the first workers + 3 reloads), all stopped by now
    seen = observed(markers, out.log)
    for event, each in hooks.items():
        assert seen.get(event, 0) >= each * retired, (event, seen, out.log)


RECIPES = [
    "gunicorn",
    "gunicorn-w2",
    "uvicorn",
    "hypercorn",
    "aiohttp",
    "granian",
    "nginx",
    "nginx-fds",
    "node",
    "go",
    "waitress",
    "twisted",
    "uwsgi",
    "haproxy",
]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe(name: str, start: Start, short_tmp: Path, request: pytest.FixtureRequest) -> None:
    rec = recipe(name, request)
    markers = short_tmp / "m"
    markers.mkdir()
    check(name, rec.hooks, serve_reload_stop(start, rec, rec.flags, markers), markers)


@pytest.mark.parametrize("name", ["gunicorn", "hypercorn-prefork", "nginx", "go"])
def test_recipe_with_defaults(
    name: str, start: Start, short_tmp: Path, request: pytest.FixtureRequest
) -> None:
    """The same servers with no --ready and no --drain: what issue 12 makes the default."""
    rec = recipe(name, request)
    markers = short_tmp / "m"
    markers.mkdir()
    check(name, rec.hooks, serve_reload_stop(start, rec, rec.keep, markers), markers)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("uvicorn", "one slot"),
        ("aiohttp", "one slot"),
        ("node", "one slot"),
        ("gunicorn", "one slot"),
        ("uvicorn", "steering off"),
        ("aiohttp", "steering off"),
    ],
)
def test_recipe_without_steering_runs_the_shutdown_hook(
    name: str, shape: str, start: Start, short_tmp: Path, request: pytest.FixtureRequest
) -> None:
    """One slot, or `--steering off`: nothing keeps new connections off the retiring worker's
    slot, so its socket drops new SYNs (clients retry) while the signalled old worker stops
    listening; its shutdown runs and nothing is lost."""
    rec = recipe(name, request)
    markers = short_tmp / "m"
    markers.mkdir()
    workers, flags = (1, []) if shape == "one slot" else (2, ["--steering", "off"])
    flags += rec.keep
    out = serve_reload_stop(start, rec, flags, markers, workers)
    check(f"{name}, {shape}", rec.hooks, out, markers, workers)
    assert "killing it frozen" not in out.log, out.log


def test_gunicorn_bind_to_an_inherited_fd_is_refused_with_the_recipe(start: Start) -> None:
    """`gunicorn --bind fd://3` under --via fds would crash with EBADF (gunicorn takes fd 3
    from LISTEN_FDS too): refused before any worker starts, naming the form that works."""
    gunicorn = python_tool("gunicorn")
    sup = start(
        "-w", "1", "--via", "fds", "--listen", "tcp://127.0.0.1:0", "--",
        gunicorn, "--bind", "fd://{fd}", "--chdir", str(APPS), "wsgi_app:app",
        wait=False,
    )  # fmt: skip
    assert sup.wait_exit(30) != 0
    log = sup.text()
    assert "gunicorn --bind fd://3" in log and "EBADF" in log, log
    assert "Drop --bind fd://3" in log and "-- gunicorn app:app" in log
    assert "Traceback" not in log and "started" not in log


def test_uwsgi_http_socket_beside_the_inherited_socket_is_refused_with_the_recipe(
    start: Start,
) -> None:
    """uWSGI serves LISTEN_FDS's socket in its default (binary uwsgi) protocol *and* binds
    --http-socket, which is the same slot socket again: every answer after the first reload
    was empty. Refused before any worker starts, naming the form that works."""
    sup = start(
        "-w", "1", "--listen", "tcp://127.0.0.1:0", "--",
        need("uwsgi"), "--plugin", "python3", "--http-socket", "127.0.0.1:{port}",
        "--module", "wsgi_app:app", "--chdir", str(APPS),
        wait=False,
    )  # fmt: skip
    assert sup.wait_exit(30) != 0
    log = sup.text()
    assert "uwsgi --http-socket: uWSGI serves the slot's socket from LISTEN_FDS" in log, log
    assert "add --protocol http" in log and "Traceback" not in log and "started" not in log
