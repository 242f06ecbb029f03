"""The README's recipes, for real: each server under `portshard run -w 2` on loopback, a bounded
connection-per-request load, 3 `reload --wait`s and a `stop`: 0 failed, and the application's
own shutdown hook seen for every process retired (ASGI lifespan shutdown, gunicorn's
worker_exit/on_exit, aiohttp's on_shutdown, node's server.close(), Go's Shutdown(), nginx's
graceful exit).

Each recipe is tested as the README writes it today (the flags it needs now), and, where a
recipe will need no flags once portshard's defaults cover it, once more with the defaults,
marked xfail until then: tree-wide readiness (a pre-fork master never waits on the socket
itself) and graceful retirement (the default --drain freeze ends in SIGKILL, so no shutdown
hook runs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from bench.loadgen import Load

from tests.conftest import ROOT
from tests.integration.conftest import need
from tests.supervisor_fixture import Start

APPS = ROOT / "tests" / "workers" / "recipes"
BIN = Path(sys.executable).parent

NEEDS_TREE_READY = pytest.mark.xfail(
    strict=False, reason="needs tree-wide readiness (issue 12, kernel branch)"
)
NEEDS_GRACEFUL = pytest.mark.xfail(
    strict=False, reason="needs graceful retirement by default (issue 12, core branch)"
)
NEEDS_BOTH = pytest.mark.xfail(
    strict=False,
    reason="needs tree-wide readiness (issue 12, kernel branch) and graceful retirement by "
    "default (issue 12, core branch)",
)


def python_tool(name: str) -> str:
    """A server installed in this venv (the `recipes` extra), else skip/fail like need()."""
    path = BIN / name
    if path.exists():
        return str(path)
    return need(name)


@dataclass
class Recipe:
    argv: list[str]  # the program, after `--`
    flags: list[str]  # portshard run's flags besides -w and --listen
    hooks: Callable[[int], dict[str, int]]  # processes retired -> {marker: at least}
    env: dict[str, str] = field(default_factory=dict)


def one_each(event: str) -> Callable[[int], dict[str, int]]:
    return lambda retired: {event: retired}


def recipe(name: str, markers: Path, request: pytest.FixtureRequest) -> Recipe:
    """The command line each README recipe gives (port 0 here: {port} is the one chosen)."""
    if name.startswith("gunicorn"):
        inner = 2 if name == "gunicorn-w2" else 1
        argv = [python_tool("gunicorn"), "-c", str(APPS / "gunicorn_conf.py")]
        argv += ["--no-control-socket", "--chdir", str(APPS), "-w", str(inner), "wsgi_app:app"]
        return Recipe(
            argv,
            ["--ready", "notify", "--drain", "signal"],
            lambda retired: {"on_exit": retired, "worker_exit": retired * inner},
        )
    if name == "uvicorn":
        argv = [python_tool("uvicorn"), "--app-dir", str(APPS), "asgi_app:app"]
        argv += ["--port", "{port}", "--no-access-log"]
        return Recipe(argv, ["--drain", "signal"], one_each("shutdown"))
    if name == "hypercorn":
        argv = [python_tool("hypercorn"), "--bind", "127.0.0.1:{port}", "--workers", "0"]
        argv += ["--graceful-timeout", "5", "asgi_app:app"]
        return Recipe(argv, ["--drain", "signal"], one_each("shutdown"), {"PYTHONPATH": str(APPS)})
    if name == "aiohttp":
        argv = [sys.executable, str(APPS / "aiohttp_app.py")]
        return Recipe(argv, ["--drain", "signal"], one_each("shutdown"))
    if name == "node":
        argv = [need("node"), str(APPS / "server.js"), "{port}"]
        return Recipe(argv, ["--drain", "signal"], one_each("shutdown"))
    if name == "go":
        binary = request.getfixturevalue("go_recipe_server")
        return Recipe([binary, "{port}"], ["--drain", "signal"], one_each("shutdown"))
    assert name == "nginx"
    nginx = need("nginx")
    script = (
        f'sed "s/PORT/127.0.0.1:$1/" {APPS / "nginx.conf"} >"$PS_MARKERS/nginx.$$.conf" && '
        f'exec {nginx} -p "$PS_MARKERS" -c "$PS_MARKERS/nginx.$$.conf" -e stderr '
        f'-g "pid $PS_MARKERS/nginx.$$.pid;"'
    )
    return Recipe(
        ["sh", "-c", script, "sh", "{port}"],
        ["--ready", "delay:1", "--stop-signal", "QUIT", "--drain", "signal"],
        lambda _retired: {},
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


def count_markers(markers: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in markers.iterdir():
        event, _, pid = path.name.partition(".")
        if pid.isdigit():
            counts[event] = counts.get(event, 0) + 1
    return counts


def serve_reload_stop(start: Start, rec: Recipe, markers: Path) -> dict[str, object]:
    env = {**rec.env, "PS_MARKERS": str(markers)}
    sup = start("-w", "2", "--listen", "tcp://127.0.0.1:0", *rec.flags, "--", *rec.argv, env=env)
    port = sup.port
    took: list[float] = []
    with Load("127.0.0.1", port, concurrency=4, max_seconds=60) as load:
        load.wait_for(40)
        for _ in range(3):
            t0 = time.monotonic()
            sup.ctl("reload", "--wait")
            took.append(time.monotonic() - t0)
            load.wait_for(load.count() + 20)
    st = sup.status()
    sup.ctl("stop")
    code = sup.wait_exit(30)
    return {
        "requests": load.count(),
        "failed": load.by_kind() if load.failed else {},
        "pids": len(load.served_by()),
        "reloads": st["reloads"],
        "took": took,
        "exit": code,
        "log": sup.text(),
    }


def check(name: str, rec: Recipe, result: dict[str, object], markers: Path) -> None:
    took = result["took"]
    assert isinstance(took, list)
    print(
        f"{name}: {result['requests']} requests from {result['pids']} pids, reloads "
        f"{', '.join(f'{t:.2f}' for t in took)} s, failed {result['failed']}"
    )
    if os.environ.get("RECIPES_LOG"):
        print(result["log"])
    assert result["exit"] == 0, result["log"]
    assert result["reloads"] == {"ok": 3, "failed": 0}, result["log"]
    assert not result["failed"], result["failed"]
    assert isinstance(result["pids"], int) and result["pids"] >= 2
    retired = 2 * 4  # 2 slots: the first workers and 3 reloads' worth, all stopped by now
    seen = count_markers(markers)
    for event, want in rec.hooks(retired).items():
        assert seen.get(event, 0) >= want, (event, seen, result["log"])


RECIPES = ["gunicorn", "gunicorn-w2", "uvicorn", "hypercorn", "aiohttp", "nginx", "node", "go"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe(name: str, start: Start, short_tmp: Path, request: pytest.FixtureRequest) -> None:
    markers = short_tmp / "m"
    markers.mkdir()
    rec = recipe(name, markers, request)
    result = serve_reload_stop(start, rec, markers)
    check(name, rec, result, markers)
    if name == "nginx":
        log = str(result["log"])
        assert log.count("exit") >= 1
    shutil.rmtree(markers)
